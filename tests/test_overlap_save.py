"""Overlap-save blocking of long 1D convs: exact against F.conv1d over generated
configurations (forward and backward, fp32 and fp64), chosen by the cost model where it
pays (wav2vec2's positional conv), and visible in the lowered graph and the report."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import example, given, settings
from hypothesis import strategies as st

import specfx
from conftest import assert_scaled_close, term_scales
from specfx.functional import apply_geometry
from specfx.geometry import overlap_save_geometry
from specfx.overlap_save import join_blocks, split_blocks


@st.composite
def blocked_convs(draw):
    k = draw(st.integers(1, 9))
    dilation = draw(st.integers(1, 3))
    span = dilation * (k - 1) + 1
    fft_size = draw(st.integers(span + 1, span + 24))
    groups = draw(st.sampled_from([1, 2]))
    return dict(k=k, dilation=dilation, fft_size=fft_size, groups=groups,
                channels=groups * draw(st.integers(1, 3)), out_channels=groups * draw(st.integers(1, 3)),
                length=draw(st.integers(span, 6 * fft_size)),
                padding=(draw(st.integers(0, span)), draw(st.integers(0, span))),
                batch=draw(st.integers(1, 3)), bias=draw(st.booleans()),
                dtype=draw(st.sampled_from([torch.float32, torch.float64])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=80, deadline=None)
@given(cfg=blocked_convs())
# A one-element weight gradient whose 381 products cancel to 0.06 (terms ~20).
@example(cfg=dict(k=1, dilation=1, fft_size=22, groups=1, channels=1, out_channels=1, length=127, padding=(1, 1),
                  batch=3, bias=False, dtype=torch.float32, seed=1))
def test_overlap_save_is_exact_forward_and_backward(cfg):
    geometry = overlap_save_geometry(cfg["length"], cfg["k"], cfg["padding"], cfg["dilation"], cfg["fft_size"])
    out = cfg["length"] + sum(cfg["padding"]) - cfg["dilation"] * (cfg["k"] - 1)
    if geometry is None:  # fewer than two blocks: nothing to block
        assert out <= cfg["fft_size"] - cfg["dilation"] * (cfg["k"] - 1)
        return
    torch.manual_seed(cfg["seed"])
    dtype = cfg["dtype"]
    x = torch.randn(cfg["batch"], cfg["channels"], cfg["length"], dtype=dtype, requires_grad=True)
    w = torch.randn(cfg["out_channels"], cfg["channels"] // cfg["groups"], cfg["k"], dtype=dtype, requires_grad=True)
    b = torch.randn(cfg["out_channels"], dtype=dtype, requires_grad=True) if cfg["bias"] else None
    y = apply_geometry(x, w, b, geometry, cfg["groups"])

    def reference(x, w, b):
        return F.conv1d(F.pad(x, list(cfg["padding"])), w, b, dilation=cfg["dilation"], groups=cfg["groups"])

    expected = reference(x, w, b)
    assert y.shape == expected.shape and y.is_contiguous()
    assert_scaled_close(y, expected)
    dy = torch.randn_like(expected)
    inputs = [t for t in (x, w, b) if t is not None]
    # Each gradient's error is relative to the magnitude of the products it sums.
    scales = [s for s in term_scales(reference, (x, w, b), dy) if s is not None]
    for actual, ref, scale in zip(torch.autograd.grad(y, inputs, dy), torch.autograd.grad(expected, inputs, dy),
                                  scales):
        assert_scaled_close(actual, ref, scale=scale)


def test_blocks_are_laid_end_to_end():
    x = torch.arange(2 * 10, dtype=torch.float32).reshape(1, 2, 10)
    windows = split_blocks(x, 1, 3, window=6, block=4)  # 3 blocks of 4 outputs, span 3
    assert windows.shape == (3, 2, 6)
    assert windows[1, 0].tolist() == [3, 4, 5, 6, 7, 8]  # padded positions 4..9
    assert join_blocks(windows[..., :4], count=3, out=11)[0, 0].tolist() == [0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]


def test_auto_blocks_wav2vec2s_positional_conv():
    """At batch 1 the full-signal weight spectrum is ~12x the weight; the cost model
    blocks the conv, and the lowered module is exact, forward and backward."""
    torch.manual_seed(0)
    conv = nn.Conv1d(768, 768, 128, padding=64, groups=16)
    x = torch.randn(1, 768, 1499)
    fast = specfx.optimize(conv, (x,))
    [decision] = fast.specfx_report.decisions
    assert decision.lowered and decision.cost.block is not None, str(fast.specfx_report)
    assert f"overlap-save blocks of {decision.cost.block}" in str(fast.specfx_report)
    targets = [n.target for n in fast.graph.nodes]
    assert split_blocks in targets and join_blocks in targets
    # The blocks (a temporary the size of the signal and more) are freed after the forward
    # transform, not held through a merged call (passes/merge_convs.py).
    assert torch.ops.specfx.to_spectrum.default in targets
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_fast, y_ref = fast(x_fast), conv(x_ref)
    assert_scaled_close(y_fast, y_ref)
    dy = torch.randn_like(y_ref)
    y_fast.backward(dy)
    y_ref.backward(dy)
    assert_scaled_close(x_fast.grad, x_ref.grad)
    assert_scaled_close(fast.weight.grad, conv.weight.grad)


@pytest.mark.parametrize("length", [40, 3000])
def test_short_signals_and_small_kernels_are_not_blocked(length):
    conv = nn.Conv1d(8, 8, 5, padding=2)
    report = specfx.explain(conv, (torch.randn(2, 8, length),), policy="always")
    assert report.decisions[0].cost.block is None
