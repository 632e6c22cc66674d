"""Empty batches and unbatched inputs, through every spectral path, against torch.

torch's convs accept a batch of zero (an empty result of the right shape, zero weight
gradients) and an unbatched ``(C, *spatial)`` input; so must the spectral ops, the
functional ``spectral_conv``, the planner (an empty example batch) and every lowered form
(plain, strided, reflect-padded, with a sample selection, overlap-save blocks, chains with
spectral activations).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import specfx
from conftest import assert_scaled_close
from specfx.functional import apply_geometry
from specfx.geometry import overlap_save_geometry
from specfx.ops import activation_ops, spectral_ops

CONVS = {
    "1d": lambda: nn.Conv1d(3, 4, 9, padding=4),
    "2d strided": lambda: nn.Conv2d(3, 4, 5, stride=2, padding=2),
    "3d": lambda: nn.Conv3d(2, 3, 3, padding=1),
    "2d reflect": lambda: nn.Conv2d(3, 4, 5, padding=2, padding_mode="reflect"),
    "2d circular grouped": lambda: nn.Conv2d(4, 4, 5, padding=2, groups=2, padding_mode="circular"),
    "1d decimated": lambda: nn.Conv1d(3, 4, 31, stride=2, dilation=2, padding=30),
    "1d skipping phases": lambda: nn.Conv1d(3, 4, 2, stride=5),
}
SPATIAL = {1: (40,), 2: (12, 11), 3: (6, 5, 7)}


def _with_params_of(fast: nn.Module, conv: nn.Module):
    """``fast`` (whose parameters are copies) run with ``conv``'s, so gradients reach them."""
    return lambda x: torch.func.functional_call(fast, {"weight": conv.weight, "bias": conv.bias}, (x,))


def _input(conv: nn.Module, batch: tuple[int, ...]) -> torch.Tensor:
    rank = conv.weight.dim() - 2
    return torch.randn(*batch, conv.in_channels, *SPATIAL[rank], requires_grad=True)


def check_against_torch(run, conv: nn.Module, x: torch.Tensor) -> None:
    """``run(x)`` and its input, weight and bias gradients equal ``conv``'s (shapes and values)."""
    params = [conv.weight, conv.bias]
    expected = conv(x)
    actual = run(x)
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(actual, [x, *params], upstream)
    ref_grads = torch.autograd.grad(expected, [x, *params], upstream)
    if x.numel():
        assert_scaled_close(actual, expected)
    for g, ref in zip(grads, ref_grads):
        assert g.shape == ref.shape
        if ref.numel():
            assert_scaled_close(g, ref, scale=max(ref.abs().max().item(), 1.0))


@pytest.mark.parametrize("name", sorted(CONVS))
def test_lowered_conv_takes_an_empty_batch(name):
    torch.manual_seed(0)
    conv = CONVS[name]()
    fast = specfx.optimize(conv, (_input(conv, (2,)).detach(),), policy="always")
    check_against_torch(_with_params_of(fast, conv), conv, _input(conv, (0,)))


@pytest.mark.parametrize("name", sorted(CONVS))
def test_lowered_conv_takes_an_unbatched_input(name):
    torch.manual_seed(0)
    conv = CONVS[name]()
    fast = specfx.optimize(conv, (_input(conv, (2,)).detach(),), policy="always")
    check_against_torch(_with_params_of(fast, conv), conv, _input(conv, ()))


@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("batch", [(0,), ()])
def test_spectral_conv_takes_empty_and_unbatched_inputs(name, batch):
    torch.manual_seed(0)
    conv = CONVS[name]()

    def run(x):
        return specfx.spectral_conv(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation,
                                    conv.groups, conv.padding_mode)

    check_against_torch(run, conv, _input(conv, batch))


@pytest.mark.parametrize("batch", [(0,), (), (2,)])
def test_overlap_save_blocks_take_empty_and_unbatched_inputs(batch):
    """Blocks are batch rows: a batch of zero has none, an unbatched input is a batch of one
    that must come back without its batch dim."""
    torch.manual_seed(0)
    conv = nn.Conv1d(3, 4, 9, padding=4)
    geometry = overlap_save_geometry(40, 9, (4, 4), 1, 24)
    assert geometry is not None and geometry.overlap_save.count >= 2
    check_against_torch(lambda x: apply_geometry(x, conv.weight, conv.bias, geometry, 1), conv, _input(conv, batch))


@pytest.mark.parametrize("batch", [(0,), ()])
def test_lowered_overlap_save_takes_empty_and_unbatched_inputs(batch):
    torch.manual_seed(0)
    conv = nn.Conv1d(32, 32, 64, padding=32)
    fast = specfx.optimize(conv, (torch.randn(1, 32, 8000),), policy="always")
    assert fast.specfx_report.decisions[0].cost.block is not None, "expected an overlap-save plan"
    check_against_torch(_with_params_of(fast, conv), conv, torch.randn(*batch, 32, 8000, requires_grad=True))


def test_chain_with_spectral_activation_takes_an_empty_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.ReLU(), nn.Conv2d(4, 4, 5, padding=2)).eval()
    fast = specfx.optimize(model, (torch.randn(2, 3, 12, 12),), policy="always")
    assert any(c.fused for c in fast.specfx_report.chains)
    x = torch.randn(0, 3, 12, 12, requires_grad=True)
    y = fast(x)
    assert y.shape == model(x).shape
    (g,) = torch.autograd.grad(y.sum(), x)
    assert g.shape == x.shape and not g.any()


@pytest.mark.parametrize("policy", ["auto", "always", "measure"])
def test_optimize_plans_from_an_empty_example_batch(policy):
    """The plan serves every batch size: an empty example is costed as a batch of one."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 9, padding=4)
    fast = specfx.optimize(conv, (torch.randn(0, 3, 32, 32),), policy=policy)
    decision = fast.specfx_report.decisions[0]
    assert decision.cost is not None and decision.cost.direct_ms > 0 and decision.reason
    check_against_torch(_with_params_of(fast, conv), conv, torch.randn(2, 3, 32, 32, requires_grad=True))


def test_each_spectral_op_takes_an_empty_batch_forward_and_backward():
    """The ops one by one: empty results of the right shape, zero gradients of the right shape."""
    fft, size = [16, 16], [12, 12]
    x = torch.randn(0, 4, *size, requires_grad=True)
    weight = torch.randn(6, 2, 3, 3, requires_grad=True)
    scale, shift = torch.randn(6, requires_grad=True), torch.randn(6, requires_grad=True)
    x_hat = spectral_ops.to_spectrum(x, size, fft)
    y_hat = spectral_ops.spectral_mix(x_hat, weight, fft, [1, 1], [1, 1], 2)
    assert y_hat.shape == (0, 6, 16, 9)
    act = activation_ops.spectral_activation(y_hat, fft, size, scale, shift, "relu", 0.0)
    poly = activation_ops.poly_activation(y_hat, torch.randn(6, 3), fft, size, scale, shift, True)
    affine = activation_ops.spectral_affine(y_hat, fft, size, scale, shift)
    y = spectral_ops.from_spectrum(act + poly + affine, fft, [6, 6], [2, 2], torch.randn(6), torch.float32)
    assert y.shape == (0, 6, 6, 6)
    grads = torch.autograd.grad(y.sum(), [x, weight, scale, shift])
    for g, t in zip(grads, [x, weight, scale, shift]):
        assert g.shape == t.shape and not g.any()
    merged = spectral_ops.lowered_conv(x.detach(), weight.detach(), None, size, fft, [1, 1], [1, 1], 2,
                                        [12, 12], [1, 1], torch.float32)
    assert merged.shape == (0, 6, 12, 12)
    g_in = spectral_ops.spectral_mix_grad_input(y_hat.detach(), weight.detach(), fft, [1, 1], [1, 1], 2)
    g_w = spectral_ops.spectral_mix_grad_weight(x_hat.detach(), y_hat.detach(), [3, 3], fft, [1, 1], [1, 1], 2,
                                                torch.float32)
    assert g_in.shape == x_hat.shape and g_w.shape == weight.shape and not g_w.any()
    adjoint = spectral_ops.to_spectrum_adjoint(x_hat.detach(), size, fft, torch.float32)
    assert adjoint.shape == x.shape


def test_functional_conv_of_an_empty_batch_matches_torch_3d_strided():
    conv = nn.Conv3d(2, 3, 3, stride=2, padding=1)
    x = torch.randn(0, 2, 6, 5, 7)
    assert specfx.spectral_conv(x, conv.weight, None, 2, 1).shape == F.conv3d(x, conv.weight, None, 2, 1).shape
