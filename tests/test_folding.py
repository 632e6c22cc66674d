"""Strided outputs folded in the frequency domain (specfx/ops/folding.py)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import specfx
from specfx.functional import conv_geometry
from specfx.ops import folding, fourier

from conftest import assert_scaled_close

CASES = [([12], [3]), ([12], [2]), ([9], [3]), ([16, 12], [2, 3]), ([15, 10], [3, 2]), ([8, 8, 6], [2, 1, 3])]


@pytest.mark.parametrize("fft_size,stride", CASES)
def test_fold_is_the_spectrum_of_the_strided_samples(fft_size, stride):
    torch.manual_seed(0)
    x = torch.randn(2, 3, *fft_size, dtype=torch.float64)
    strided = x[(...,) + tuple(slice(None, None, s) for s in stride)]
    folded = folding.fold(fourier.rfftn(x, fft_size), fft_size, stride)
    assert_scaled_close(fourier.irfftn(folded, folding.folded_size(fft_size, stride)), strided)


@pytest.mark.parametrize("fft_size,stride", CASES)
def test_fold_adjoint_is_the_adjoint(fft_size, stride):
    """<fold(a), b> = <a, fold_adjoint(b)> in the real inner product autograd uses."""
    torch.manual_seed(1)
    bins = fourier.rfft_bins(fft_size)
    a = torch.randn(2, *bins, dtype=torch.complex128)
    b = torch.randn(2, *fourier.rfft_bins(folding.folded_size(fft_size, stride)), dtype=torch.complex128)
    lhs = (folding.fold(a, fft_size, stride).conj() * b).real.sum()
    rhs = (a.conj() * folding.fold_adjoint(b, fft_size, stride)).real.sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=1e-12)


def test_strided_convs_get_a_foldable_grid_and_stay_exact():
    torch.manual_seed(2)
    x = torch.randn(2, 4, 33, 30, dtype=torch.float64, requires_grad=True)
    w = torch.randn(6, 2, 5, 4, dtype=torch.float64, requires_grad=True)
    geometry = conv_geometry(x, w, stride=(3, 2), padding=2)
    assert all(n % s == 0 for n, s in zip(geometry.fft_size, geometry.stride))
    assert folding.applies(geometry.fft_size, geometry.stride, geometry.out_size)

    y = specfx.spectral_conv(x, w, None, stride=(3, 2), padding=2, groups=2)
    expected = F.conv2d(x, w, None, (3, 2), 2, 1, 2)
    assert_scaled_close(y, expected)
    grad = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(y, (x, w), grad), torch.autograd.grad(expected, (x, w), grad)):
        assert_scaled_close(got, want)
    assert torch.autograd.gradcheck(
        lambda x_, w_: specfx.spectral_conv(x_, w_, None, stride=(3, 2), padding=2, groups=2),
        (x.detach()[:1, :, :9, :8].requires_grad_(), w.detach().clone().requires_grad_()))


def test_folding_runs_a_smaller_inverse_transform():
    x, w = torch.randn(1, 2, 40), torch.randn(2, 2, 7)
    geometry = conv_geometry(x, w, stride=4, padding=3)
    with torch.profiler.profile(record_shapes=True) as prof:
        specfx.spectral_conv(x, w, stride=4, padding=3)
    inverse = [e for e in prof.events() if e.name == "aten::_fft_c2r"]
    assert len(inverse) == 1
    assert inverse[0].input_shapes[0][-1] == geometry.fft_size[0] // 4 // 2 + 1


class _PassThrough(torch.utils._python_dispatch.TorchDispatchMode):
    """A dispatch mode that runs every op as it is. A custom op's kernel called under such
    a mode (AOTAutograd's first call of a compiled graph is one) runs with the Conjugate
    dispatch key excluded: lazy conjugate bits are not seen there."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("length,kernel,stride", [(3000, 10, 5), (599, 3, 2), (64, 7, 3)])
def test_a_folded_conv_is_the_same_under_a_dispatch_mode(length, kernel, stride):
    torch.manual_seed(0)
    x, w = torch.randn(1, 2, length), torch.randn(4, 2, kernel)
    with _PassThrough():
        y = specfx.spectral_conv(x, w, stride=stride)
    assert_scaled_close(y, F.conv1d(x, w, stride=stride))
