"""Samples a convolution never reads must not round its result.

A strided or dilated conv skips input samples (whole phases, edges, gaps between dilated
taps). torch's direct conv never touches them; a transform that held them would round
every output at their magnitude. Each test gives the skipped samples a magnitude of 1e4
and checks that the spectral result's error against an fp64 ``F.conv`` stays within 10x of
the direct fp32 conv's own error against that reference, forward and backward.

Errors are measured as the largest absolute error over the scale of the result (for
gradients, of the products they sum, :func:`conftest.term_scales`). The direct conv's
error is counted as at least one rounding (``eps``): a one-tap, one-channel conv rounds
each output once, and no sum of several terms can promise that. fp64 runs are held to the
same bound scaled by the ratio of the two dtypes' ``eps``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import specfx
from conftest import term_scales

FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MODULE_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
HUGE = 1e4
FP32_EPS = torch.finfo(torch.float32).eps


def torch_conv(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """torch's conv: ``F.convNd`` after ``F.pad`` in the mode, as ``nn.ConvNd`` runs it."""
    rank = weight.dim() - 2
    if padding_mode != "zeros":
        pads = [p for p in reversed(padding) for _ in range(2)]
        x, padding = F.pad(x, pads, mode=padding_mode), 0
    return FUNCTIONAL_CONV[rank](x, weight, bias, stride, padding, dilation, groups)


def unread_samples(x_shape, weight, stride, padding, dilation, groups, padding_mode) -> torch.Tensor:
    """True where no output reads the sample: where the input gradient of the conv with a
    positive kernel and a positive upstream gradient is zero (each read adds to it)."""
    x = torch.zeros(x_shape, dtype=torch.float64, requires_grad=True)
    ones = torch.ones_like(weight, dtype=torch.float64)
    y = torch_conv(x, ones, None, stride, padding, dilation, groups, padding_mode)
    (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
    return grad == 0


def relative_error(actual: torch.Tensor, expected: torch.Tensor, scale: float) -> float:
    return (actual.double() - expected).abs().max().item() / max(scale, 1e-300)


def check_unread_samples_do_not_round(x, weight, bias, stride, padding, dilation, groups, padding_mode,
                                      run=specfx.spectral_conv):
    """``run`` (``spectral_conv``'s signature) on ``x``, whose unread samples are huge, is
    within 10x of the direct fp32 conv's error, for the output and all gradients."""
    args = (stride, padding, dilation, groups, padding_mode)
    leaves64 = [t.detach().double().requires_grad_() for t in (x, weight, bias) if t is not None]
    ref = torch_conv(*leaves64, *([None] if bias is None else []), *args)
    upstream = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, leaves64, upstream)
    padded = leaves64 + [None] * (3 - len(leaves64))
    grad_scales = [s for s in term_scales(lambda *t: torch_conv(*t, *args), padded, upstream) if s is not None]
    scales = [ref.abs().max().item(), *grad_scales]

    def errors(dtype, conv):
        leaves = [t.detach().to(dtype).requires_grad_() for t in leaves64]
        y = conv(*leaves, *([None] if bias is None else []), *args)
        grads = torch.autograd.grad(y, leaves, upstream.to(dtype))
        return [relative_error(a, e, s) for a, e, s in zip((y, *grads), (ref, *ref_grads), scales)]

    bound = 10 * torch.finfo(x.dtype).eps / FP32_EPS
    direct = errors(torch.float32, torch_conv)
    spectral = errors(x.dtype, run)
    for name, got, base in zip(("output", "input grad", "weight grad", "bias grad"), spectral, direct):
        assert got <= bound * max(base, FP32_EPS), (
            f"{name}: error {got:.3g} of its scale, direct fp32 conv {base:.3g}")


def with_huge_unread_samples(x: torch.Tensor, unread: torch.Tensor) -> torch.Tensor:
    return torch.where(unread, x * HUGE, x)


@st.composite
def strided_configs(draw, rank: int):
    """A strided and/or dilated conv torch accepts, in any padding mode."""
    groups = draw(st.integers(1, 2))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = draw(st.lists(st.integers(1, 5), min_size=rank, max_size=rank))
    stride = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    dilation = draw(st.lists(st.integers(1, 4), min_size=rank, max_size=rank))
    padding_mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
    padding = draw(st.lists(st.integers(0, 6), min_size=rank, max_size=rank))
    size = []
    for k, d, p in zip(kernel, dilation, padding):
        smallest = max(1, d * (k - 1) + 1 - 2 * p, p + 1 if padding_mode == "reflect" else 1,
                       p if padding_mode == "circular" else 1)
        size.append(draw(st.integers(smallest, smallest + (24 if rank == 1 else 9))))
    batch = draw(st.sampled_from([(), (1,), (2,)]))
    return dict(shape=(*batch, in_channels, *size), weight=(out_channels, in_channels // groups, *kernel),
                bias=draw(st.booleans()), stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation),
                groups=groups, padding_mode=padding_mode, dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                seed=draw(st.integers(0, 2**16)))


def run_config(cfg) -> None:
    args = (cfg["stride"], cfg["padding"], cfg["dilation"], cfg["groups"], cfg["padding_mode"])
    torch.manual_seed(cfg["seed"])
    weight = torch.randn(cfg["weight"], dtype=cfg["dtype"])
    unread = unread_samples(cfg["shape"], weight, *args)
    assume(unread.any() and not unread.all())
    x = with_huge_unread_samples(torch.randn(cfg["shape"], dtype=cfg["dtype"]), unread)
    bias = torch.randn(cfg["weight"][0], dtype=cfg["dtype"]) if cfg["bias"] else None
    check_unread_samples_do_not_round(x, weight, bias, *args)


@settings(max_examples=80, deadline=None, derandomize=True)
@given(cfg=strided_configs(rank=1))
def test_conv1d_unread_samples_do_not_round_forward_or_backward(cfg):
    run_config(cfg)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(cfg=strided_configs(rank=2))
def test_conv2d_unread_samples_do_not_round_forward_or_backward(cfg):
    run_config(cfg)


@pytest.mark.parametrize("module,shape", [
    (nn.Conv1d(4, 4, 31, stride=2, dilation=2, padding=30), (2, 4, 200)),  # every odd sample unread
    (nn.Conv1d(3, 5, 3, stride=2, dilation=3), (2, 3, 41)),  # one sample between the taps at the start
    (nn.Conv1d(2, 2, 2, stride=5), (1, 2, 33)),  # three phases of five, and the trailing samples
    (nn.Conv2d(4, 4, 5, stride=(2, 3), dilation=(4, 3), padding=(8, 6), padding_mode="circular"), (1, 4, 24, 27)),
    (nn.Conv2d(2, 6, 3, stride=4, dilation=2, padding=2, groups=2, padding_mode="reflect"), (2, 2, 22, 19)),
    (nn.Conv3d(2, 2, 3, stride=2, dilation=2, padding=(2, 0, 1)), (1, 2, 9, 10, 11)),
])
def test_lowered_conv_ignores_unread_samples(module, shape):
    """Through ``specfx.optimize`` (the lowered graph, with its own selection node)."""
    torch.manual_seed(0)
    args = (module.stride, module.padding, module.dilation, module.groups, module.padding_mode)
    x = with_huge_unread_samples(torch.randn(shape), unread_samples(shape, module.weight, *args))
    fast = specfx.optimize(module, (x,), policy="always")
    assert fast.specfx_report.decisions[0].lowered

    def lowered(xs, ws, bs, *_):
        return torch.func.functional_call(fast, {"weight": ws, "bias": bs}, (xs,))

    check_unread_samples_do_not_round(x, module.weight.detach(), module.bias.detach(), *args, run=lowered)


def test_auto_policy_keeps_convs_that_skip_whole_phases():
    """A kernel shorter than its stride reads a fraction of its input: the planner keeps
    it direct and says why."""
    conv = nn.Conv1d(8, 8, 2, stride=4)
    decision = specfx.optimize(conv, (torch.randn(2, 8, 4096),)).specfx_report.decisions[0]
    assert not decision.lowered and "whole phases" in decision.reason, decision
