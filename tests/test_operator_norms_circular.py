"""Exact singular values of periodic convolutions (specfx.singular_values, padding="circular").

The reference is independent of specfx's Fourier code: the explicit float64 matrix of the
periodic operator, built by running torch's own conv on every basis vector tiled over
enough periods (so that every tap it reads wraps exactly as the periodic conv's does), and
its SVD. Configurations are generated over rank 1–3, channels, groups, kernel sizes
(wider than the grid too), dilation and strides dividing the grid.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx
from specfx.operator_norms import LayerError, as_operator
from specfx.operator_norms.circular import periodic_blocks

CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def periodic_matrix(weight: torch.Tensor, size, stride, dilation, groups) -> torch.Tensor:
    """The periodic operator y[t] = Σ_m w[m] x[(s·t + d·m) mod n] as an explicit matrix."""
    rank = weight.dim() - 2
    c_in = weight.shape[1] * groups
    dim = c_in * math.prod(size)
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, c_in, *size)
    span = [d * (k - 1) + 1 for k, d in zip(weight.shape[2:], dilation)]
    periods = [-(-(sp + n) // n) + 1 for sp, n in zip(span, size)]
    tiled = basis.repeat(1, 1, *periods)
    out = CONV[rank](tiled, weight, None, stride, 0, dilation, groups)
    out = out[(Ellipsis, *[slice(0, n // s) for n, s in zip(size, stride)])]
    return out.reshape(dim, -1).T


@st.composite
def periodic_configs(draw):
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 4)) for _ in range(rank)]
    stride = [draw(st.sampled_from([1, 1, 2, 3])) for _ in range(rank)]
    dilation = [draw(st.sampled_from([1, 1, 2])) for _ in range(rank)]
    most = {1: 8, 2: 4, 3: 2}[rank]
    size = [s * draw(st.integers(1, most)) for s in stride]
    seed = draw(st.integers(0, 2**31 - 1))
    return c_out, c_in, kernel, stride, dilation, groups, size, seed


@settings(max_examples=80, deadline=None)
@given(periodic_configs())
def test_circular_values_match_the_explicit_operator(config):
    c_out, c_in, kernel, stride, dilation, groups, size, seed = config
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(c_out, c_in // groups, *kernel, generator=gen, dtype=torch.float64)
    expected = torch.linalg.svdvals(periodic_matrix(weight, size, stride, dilation, groups))
    got = specfx.singular_values(weight, size, padding="circular", stride=stride, dilation=dilation, groups=groups)
    assert got.shape == expected.shape
    assert got.dtype == torch.float64
    assert (got - expected).abs().max() <= 1e-9 * expected[0]
    assert torch.all(got[:-1] >= got[1:])


def test_a_circular_module_is_analysed_as_it_runs():
    """A circularly padded module whose output has n/s samples per axis is the periodic
    operator itself: its values are exact, and its matrix is torch's own conv."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="circular").double()
    expected = torch.linalg.svdvals(as_operator(conv, (8, 6)).matrix())
    got = specfx.singular_values(conv, (8, 6))
    assert (got - expected).abs().max() <= 1e-9 * expected[0]
    assert specfx.operator_norm(conv, (8, 6)).exact


def test_half_spectrum_blocks_stand_for_their_conjugates():
    """rfft's layout: blocks off the self-conjugate frequencies count twice, and the
    multiplicities add up to the full grid."""
    weight = torch.randn(3, 2, 3, 3, dtype=torch.float64)
    op = as_operator(weight, (6, 7), check=False)
    blocks = periodic_blocks(op, (6, 7))
    assert blocks.matrices.shape[1] == 6 * 4  # 7 // 2 + 1 frequencies on the last axis
    assert int(blocks.multiplicity.sum()) == 6 * 7
    full = periodic_blocks(op, (6, 7), half=False)
    assert full.matrices.shape[1] == 42 and int(full.multiplicity.sum()) == 42


def test_a_stride_that_does_not_divide_the_grid_is_not_block_circulant():
    """Then the circularly padded conv is computed from its explicit matrix, and the
    block decomposition refuses the grid."""
    weight = torch.randn(2, 2, 3, dtype=torch.float64)
    op = as_operator(weight, 7, stride=2, padding=1, padding_mode="circular")
    assert not op.periodic
    got = specfx.singular_values(weight, 7, padding="circular", stride=2)
    assert torch.allclose(got, torch.linalg.svdvals(op.matrix()), rtol=0, atol=1e-12)
    with pytest.raises(LayerError, match="stride 2 does not divide the periodic grid size 7"):
        periodic_blocks(op, (7,))


def test_transposed_module_has_its_forward_convs_values():
    torch.manual_seed(1)
    transposed = nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1).double()
    forward = as_operator(transposed, (4, 4))
    assert forward.transposed and forward.input_size == (8, 8)
    matrix = torch.zeros(5 * 64, 3 * 16, dtype=torch.float64)
    basis = torch.eye(48, dtype=torch.float64).reshape(48, 3, 4, 4)
    matrix[:] = (transposed(basis) - transposed.bias.view(1, -1, 1, 1)).reshape(48, -1).T
    expected = torch.linalg.svdvals(matrix)
    got = specfx.singular_values(transposed, (4, 4))
    assert (got - expected).abs().max() <= 1e-9 * expected[0]
