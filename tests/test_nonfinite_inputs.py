"""A NaN or infinity in a lowered conv's input makes exactly the outputs non-finite that
torch's conv makes non-finite (a transform would spread it to the whole row): the call
is computed again by torch's conv. Lowered convs outside chains, on the CPU."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx

CONVS = {1: nn.Conv1d, 2: nn.Conv2d}


@st.composite
def conv_and_input(draw):
    rank = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2]))
    channels = 2 * groups
    kernel = draw(st.integers(3, 9))
    stride, dilation = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    padding_mode = draw(st.sampled_from(["zeros", "circular", "reflect"]))
    padding = draw(st.integers(0, kernel // 2))
    size = draw(st.integers(dilation * (kernel - 1) + 2, 24))
    conv = CONVS[rank](channels, channels, kernel, stride=stride, dilation=dilation, padding=padding,
                       padding_mode=padding_mode, groups=groups)
    batched = draw(st.booleans())
    shape = ((2,) if batched else ()) + (channels,) + (size,) * rank
    bad = draw(st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from([float("nan"), float("inf"),
                                                                           float("-inf")])),
                        min_size=1, max_size=3))
    return conv.eval(), shape, bad


def _with_nonfinite(shape, bad) -> torch.Tensor:
    x = torch.randn(shape)
    flat = x.view(-1)
    for position, value in bad:
        flat[position % flat.numel()] = value
    return x


def _same_outputs(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert torch.equal(actual.isnan(), expected.isnan())
    assert torch.equal(actual.isposinf(), expected.isposinf()) and torch.equal(actual.isneginf(), expected.isneginf())
    finite = expected.isfinite()
    scale = expected[finite].abs().max().item() if finite.any() else 1.0
    torch.testing.assert_close(actual[finite], expected[finite], rtol=0, atol=1e-5 * scale)


@settings(max_examples=40, derandomize=True, deadline=None, database=None)
@given(case=conv_and_input(), grad=st.booleans())
def test_nonfinite_input_values_stay_where_torch_puts_them(case, grad):
    conv, shape, bad = case
    torch.manual_seed(0)
    fast = specfx.optimize(nn.Sequential(conv), (torch.randn(shape),), policy="always", chains=False)
    x = _with_nonfinite(shape, bad)
    with torch.set_grad_enabled(grad):
        _same_outputs(fast(x), conv(x))


def test_finite_inputs_take_the_spectral_path():
    conv = nn.Conv2d(4, 4, 15, padding=7, groups=4).eval()
    x = torch.randn(2, 4, 32, 32)
    fast = specfx.optimize(nn.Sequential(conv), (x,), policy="always")
    calls = []
    with pytest.MonkeyPatch.context() as patch:
        from specfx.ops import spectral_ops

        original = spectral_ops._direct_on_grid
        patch.setattr(spectral_ops, "_direct_on_grid", lambda *a: calls.append(1) or original(*a))
        with torch.no_grad():
            fast(x)
            assert calls == []
            x[0, 0, 3, 3] = float("nan")
            _same_outputs(fast(x), conv(x))
            assert calls == [1]
