"""Yi's asymptotic approximation of zero-padded singular values, against exact SVDs.

The approximation samples the spectral density matrix off the DFT grid (see
specfx.operator_norms.asymptotic); these tests pin what it is exact for, that it returns
the operator's number of values, and the accuracy comparison the example reports:
better than the circulant approximation for smooth (trained-like) kernels, and no worse
than it (within a small margin) for random ones.
"""

from __future__ import annotations

import math

import pytest
import torch

import specfx
from specfx.operator_norms import as_operator


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx - exact).norm() / exact.norm())


def smooth_kernel(c_out, c_in, rank, gen):
    profile = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    full = profile
    for _ in range(rank - 1):
        full = full[..., None] * profile
    mixing = torch.randn(c_out, c_in, generator=gen, dtype=torch.float64) / math.sqrt(c_in)
    noise = torch.randn(c_out, c_in, *[3] * rank, generator=gen, dtype=torch.float64) / math.sqrt(c_in * 3 ** rank)
    return mixing.reshape(c_out, c_in, *[1] * rank) * full / full.sum() + 0.3 * noise


def test_exact_for_the_symmetric_three_tap_conv():
    """A zero-padded symmetric 3-tap conv is a symmetric tridiagonal Toeplitz matrix, whose
    eigenvalues are its symbol at πj/(n+1): the approximation is exact there."""
    weight = torch.tensor([[[1.0, 3.0, 1.0]]], dtype=torch.float64)
    exact = specfx.singular_values(weight, 11, padding=1)
    approx = specfx.singular_values(weight, 11, padding=1, method="asymptotic")
    assert (approx - exact).abs().max() < 1e-12


@pytest.mark.parametrize("rank,channels,size,stride,padding", [
    (1, 3, 17, 1, 1), (2, 4, 6, 1, "same"), (2, 3, 8, 2, 1), (1, 2, 20, 3, 0), (3, 2, 4, 1, 1)])
def test_returns_the_operators_number_of_values(rank, channels, size, stride, padding):
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(channels + 1, channels, *[3] * rank, generator=gen, dtype=torch.float64)
    op = as_operator(weight, size, stride=stride, padding=padding)
    approx = specfx.singular_values(weight, size, padding=padding, stride=stride, method="asymptotic")
    assert approx.numel() == min(op.in_dim, op.out_dim)
    assert torch.all(approx[:-1] >= approx[1:])


@pytest.mark.parametrize("rank,channels,size", [(1, 4, 16), (1, 8, 12), (2, 4, 8), (2, 4, 12)])
def test_more_accurate_than_the_circulant_for_smooth_kernels(rank, channels, size):
    """Over four kernels: better every time, and by a third or more on average."""
    ratios = []
    for seed in range(4):
        weight = smooth_kernel(channels, channels, rank, torch.Generator().manual_seed(seed))
        exact = specfx.singular_values(weight, size, padding=1)
        yi = specfx.singular_values(weight, size, padding=1, method="asymptotic")
        circulant = specfx.singular_values(weight, size, padding=1, method="circular")
        ratios.append(relative_error(yi, exact) / relative_error(circulant, exact))
    assert max(ratios) < 0.95 and sum(ratios) / len(ratios) < 0.67, ratios


@pytest.mark.parametrize("rank,channels,size", [(1, 4, 16), (1, 8, 12), (2, 4, 8), (2, 4, 12)])
def test_as_accurate_as_the_circulant_for_random_kernels(rank, channels, size):
    gen = torch.Generator().manual_seed(2)
    weight = torch.randn(channels, channels, *[3] * rank, generator=gen, dtype=torch.float64)
    exact = specfx.singular_values(weight, size, padding=1)
    yi = specfx.singular_values(weight, size, padding=1, method="asymptotic")
    circulant = specfx.singular_values(weight, size, padding=1, method="circular")
    assert relative_error(yi, exact) < 1.1 * relative_error(circulant, exact)
