"""A lowered conv checks every call as torch's conv would (input dims, channels, dtype),
follows the module's dtype after ``.double()``/``.half()``/``.to()``, and refuses to
compute with a plan its module no longer matches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx
from specfx.errors import StalePlanError

CONVS = {1: nn.Conv1d, 2: nn.Conv2d}


@st.composite
def conv_configs(draw):
    rank = draw(st.sampled_from([1, 2]))
    groups = draw(st.sampled_from([1, 2, 4]))
    in_channels = groups * draw(st.integers(1, 3))
    out_channels = groups * draw(st.integers(1, 3))
    kernel = draw(st.integers(5, 11))
    wrong = draw(st.integers(1, 3 * in_channels).filter(lambda c: c != in_channels))
    return rank, in_channels, out_channels, groups, kernel, wrong


def _conv_and_input(rank, in_channels, out_channels, groups, kernel, batch=2, size=20):
    conv = CONVS[rank](in_channels, out_channels, kernel, padding=kernel // 2, groups=groups).eval()
    return conv, torch.randn(batch, in_channels, *([size] * rank))


@settings(max_examples=25, derandomize=True, deadline=None, database=None)
@given(config=conv_configs(), merged=st.booleans())
def test_wrong_channel_count_raises_like_torch(config, merged):
    rank, in_channels, out_channels, groups, kernel, wrong = config
    conv, x = _conv_and_input(rank, in_channels, out_channels, groups, kernel)
    fast = specfx.optimize(nn.Sequential(conv), (x,), policy="always", chains=merged)
    bad = torch.randn(2, wrong, *x.shape[2:])
    with pytest.raises(RuntimeError):
        conv(bad)
    with pytest.raises(RuntimeError, match="channels"):
        fast(bad)
    with pytest.raises(RuntimeError, match="channels"):  # unbatched, too
        fast(bad[0])


def test_wrong_number_of_dims_raises():
    conv, x = _conv_and_input(2, 4, 4, 4, 9)
    fast = specfx.optimize(nn.Sequential(conv), (x,), policy="always")
    with pytest.raises(RuntimeError, match="Expected 3D \\(unbatched\\) or 4D \\(batched\\) input"):
        fast(x[None])


class TwoConvs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 8, 9, padding=4)
        self.b = nn.Conv2d(8, 4, 7, padding=3)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("chains", [True, False])
def test_double_after_optimize_computes_and_returns_float64(chains):
    torch.manual_seed(0)
    model, x = TwoConvs().eval(), torch.randn(2, 4, 20, 20)
    fast = specfx.optimize(model, (x,), policy="always", chains=chains)
    fast64, model64 = copy.deepcopy(fast).double(), copy.deepcopy(model).double()
    y = fast64(x.double())
    assert y.dtype == torch.float64
    # float64 accuracy, not float32's rounding cast up
    torch.testing.assert_close(y, model64(x.double()), rtol=1e-10, atol=1e-10 * y.abs().max().item())
    back = fast64.to(torch.float32)
    assert back(x).dtype == torch.float32


@pytest.mark.parametrize("chains", [True, False])
def test_half_after_optimize_returns_half(chains):
    torch.manual_seed(0)
    model, x = TwoConvs().eval(), torch.randn(2, 4, 20, 20)
    fast = specfx.optimize(model, (x,), policy="always", chains=chains)
    y = copy.deepcopy(fast).half()(x.half())
    assert y.dtype == torch.float16
    expected = copy.deepcopy(model).float()(x.half().float())
    torch.testing.assert_close(y.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item())


def test_input_of_another_dtype_than_the_weights_raises_like_torch():
    model, x = TwoConvs().eval(), torch.randn(2, 4, 20, 20)
    fast = specfx.optimize(model, (x,), policy="always")
    with pytest.raises(RuntimeError):
        model(x.double())
    with pytest.raises(RuntimeError, match="should be the same"):
        fast(x.double())
    with pytest.raises(RuntimeError, match="should be the same"):
        copy.deepcopy(fast).double()(x)


class Depthwise(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.dw = nn.Conv2d(8, 8, 15, padding=7, groups=8)

    def forward(self, x):
        return self.dw(x) + x


def _edit_swap_kernel(fast):
    fast.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)


def _edit_weight_data(fast):
    fast.dw.weight.data = torch.randn(8, 1, 13, 13)


def _edit_padding(fast):
    fast.dw.padding = (3, 3)


def _edit_stride(fast):
    fast.dw.stride = (2, 2)


def _edit_dilation(fast):
    fast.dw.dilation = (2, 2)


def _edit_padding_mode(fast):
    fast.dw.padding_mode = "circular"


def _edit_groups(fast):
    fast.dw = nn.Conv2d(8, 8, 15, padding=7, groups=4)


def _edit_not_a_conv(fast):
    fast.dw = nn.Linear(24, 24)


def _edit_forward_hook(fast):
    fast.dw.register_forward_hook(lambda module, args, out: out * 2)


STALE_EDITS = [_edit_swap_kernel, _edit_weight_data, _edit_padding, _edit_stride, _edit_dilation,
               _edit_padding_mode, _edit_groups, _edit_not_a_conv, _edit_forward_hook]


@pytest.mark.parametrize("edit", STALE_EDITS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("chains", [True, False])
def test_module_edit_that_changes_the_conv_raises(edit, chains):
    model, x = Depthwise().eval(), torch.randn(2, 8, 24, 24)
    fast = specfx.optimize(model, (x,), policy="always", chains=chains)
    edit(fast)
    with pytest.raises(StalePlanError, match="'dw'.*optimize again"):
        fast(x)


def test_module_swapped_for_one_without_weight_raises():
    model, x = Depthwise().eval(), torch.randn(2, 8, 24, 24)
    fast = specfx.optimize(model, (x,), policy="always")
    fast.dw = nn.Identity()
    with pytest.raises(AttributeError, match="weight"):
        fast(x)


@pytest.mark.parametrize("chains", [True, False])
def test_module_edit_that_keeps_the_geometry_computes_with_the_new_weights(chains):
    torch.manual_seed(0)
    model, x = Depthwise().eval(), torch.randn(2, 8, 24, 24)
    fast = specfx.optimize(model, (x,), policy="always", chains=chains)
    fast.dw = nn.Conv2d(8, 8, 15, padding=7, groups=8)
    expected = fast.dw(x) + x
    torch.testing.assert_close(fast(x), expected, rtol=1e-4, atol=1e-5)
    fast.dw.weight = nn.Parameter(torch.randn(8, 1, 15, 15))
    torch.testing.assert_close(fast(x), fast.dw(x) + x, rtol=1e-4, atol=1e-4)


def test_functional_conv_weight_of_another_shape_raises():
    class Functional(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 4, 9, 9))

        def forward(self, x):
            return F.conv2d(x, self.w, padding=4)

    x = torch.randn(1, 4, 20, 20)
    fast = specfx.optimize(Functional(), (x,), policy="always")
    fast.w = nn.Parameter(torch.randn(4, 4, 5, 5))
    with pytest.raises(StalePlanError, match="optimize again"):
        fast(x)


class ChainWithSkip(nn.Module):
    """A fused chain whose residual sum (computed in the frequency domain) is read
    spatially by an op outside the chain: the chain materializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(4, 4, 9, padding=4)
        self.a = nn.Conv2d(4, 4, 7, padding=3)
        self.b = nn.Conv2d(4, 4, 5, padding=2)
        self.c = nn.Conv2d(4, 4, 5, padding=2)

    def forward(self, x):
        y = self.stem(x)
        s = self.b(F.gelu(self.a(y))) + y
        return self.c(s) + torch.tanh(s)


def test_double_after_optimize_follows_through_a_materialized_chain_value():
    torch.manual_seed(0)
    model, x = ChainWithSkip().eval(), torch.randn(2, 4, 20, 20)
    fast = specfx.optimize(model, (x,), policy="always")
    assert [c.fused for c in fast.specfx_report.chains] == [True]
    y = copy.deepcopy(fast).double()(x.double())
    assert y.dtype == torch.float64
    expected = copy.deepcopy(model).double()(x.double())
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10 * expected.abs().max().item())
