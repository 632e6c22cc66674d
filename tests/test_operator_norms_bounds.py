"""Certified operator-norm intervals (specfx.operator_norm) against explicit matrices.

The reference norm is the largest singular value of the layer's float64 matrix, built by
running torch's own ``nn.ConvNd`` (minus its bias) on every basis vector. Each interval
must contain it (for every padding mode, stride, dilation, groups, rank); on the kernels
the tightness goal names it must also be tight: upper ≤ 1.05x and lower ≥ 0.99x.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx
from specfx.operator_norms import LayerError, as_operator
from specfx.operator_norms import windowed
from specfx.operator_norms.bounds import block_upper_values, dominating_grid
from specfx.operator_norms.circular import periodic_blocks

MODULE = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def torch_matrix(conv: nn.Module, size) -> torch.Tensor:
    """The layer's matrix from torch's own conv on the basis (bias removed)."""
    dim = conv.in_channels * math.prod(size)
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, conv.in_channels, *size)
    with torch.no_grad():
        out = conv(basis)
        if conv.bias is not None:
            out = out - conv.bias.view(1, -1, *[1] * len(size))
    return out.reshape(dim, -1).T


def true_norm(conv: nn.Module, size) -> float:
    return float(torch.linalg.matrix_norm(torch_matrix(conv, size), ord=2))


def make_conv(rank, c_in, c_out, kernel, stride, padding, dilation, groups, mode, weight=None):
    conv = MODULE[rank](c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation, groups=groups,
                        padding_mode=mode, bias=False).double()
    if weight is not None:
        with torch.no_grad():
            conv.weight.copy_(weight)
    return conv


@st.composite
def layer_configs(draw):
    rank = draw(st.integers(1, 3))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in, c_out = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
    kernel = [draw(st.integers(1, 4)) for _ in range(rank)]
    stride = [draw(st.sampled_from([1, 1, 2])) for _ in range(rank)]
    dilation = [draw(st.sampled_from([1, 1, 2])) for _ in range(rank)]
    mode = draw(st.sampled_from(["zeros", "zeros", "circular", "reflect", "replicate"]))
    most = {1: 24, 2: 7, 3: 4}[rank]
    size = [draw(st.integers(2, most)) for _ in range(rank)]
    padding = [draw(st.integers(0, 2)) for _ in range(rank)]
    if mode == "reflect":
        padding = [min(p, n - 1) for p, n in zip(padding, size)]
    span = [d * (k - 1) + 1 for k, d in zip(kernel, dilation)]
    size = [max(n, sp - 2 * p) for n, sp, p in zip(size, span, padding)]  # a non-empty output
    if mode == "reflect":
        padding = [min(p, n - 1) for p, n in zip(padding, size)]
        size = [max(n, sp - 2 * p) for n, sp, p in zip(size, span, padding)]
    return rank, c_in, c_out, kernel, stride, padding, dilation, groups, mode, size, draw(st.integers(0, 2**31 - 1))


def conv_of(config, mode=None):
    """The seeded layer a ``layer_configs`` draw describes (``mode`` overrides its padding
    mode) and its input size."""
    rank, c_in, c_out, kernel, stride, padding, dilation, groups, drawn_mode, size, seed = config
    torch.manual_seed(seed)
    return make_conv(rank, c_in, c_out, kernel, stride, padding, dilation, groups, mode or drawn_mode), size


@settings(max_examples=30, deadline=None)
@given(layer_configs())
def test_the_interval_contains_the_true_norm(config):
    conv, size = conv_of(config)
    expected = true_norm(conv, size)
    bounds = specfx.operator_norm(conv, size, method="bounds")
    assert bounds.lower <= expected <= bounds.upper, (bounds, expected)
    assert bounds.lower >= 0.99 * expected
    exact = specfx.operator_norm(conv, size, method="exact")
    assert exact.lower <= expected <= exact.upper and exact.upper <= expected * (1 + 1e-8)


@settings(max_examples=25, deadline=None)
@given(layer_configs())
def test_the_operator_is_torchs_conv_and_its_adjoint_its_transpose(config):
    conv, size = conv_of(config)
    op = as_operator(conv, size)
    x = torch.randn(2, conv.in_channels, *size, dtype=torch.float64)
    y = torch.randn(2, conv.out_channels, *op.out_size, dtype=torch.float64)
    with torch.no_grad():
        assert torch.allclose(op.apply(x), conv(x), rtol=0, atol=1e-12)
    assert torch.allclose((op.apply(x) * y).sum(), (x * op.adjoint(y)).sum(), rtol=1e-12, atol=1e-12)
    assert torch.allclose(op.matrix(), torch_matrix(conv, size), rtol=0, atol=1e-14)


def random_kernel(c_out, c_in, kernel, gen):
    return torch.randn(c_out, c_in, *kernel, generator=gen, dtype=torch.float64) / math.sqrt(c_in * math.prod(kernel))


def trained_like_kernel(c_out, c_in, kernel, gen):
    """What trained conv kernels look like: a low-pass spatial profile carrying a dominant
    channel direction, plus weaker unstructured parts."""
    profile = torch.ones(1, dtype=torch.float64)
    for k in kernel:
        axis = torch.exp(-torch.linspace(-1, 1, k, dtype=torch.float64) ** 2)
        profile = profile[..., None] * axis
    profile = profile / profile.sum()
    u, v = torch.randn(c_out, 1, generator=gen, dtype=torch.float64), torch.randn(1, c_in, generator=gen,
                                                                                   dtype=torch.float64)
    mixing = 2 * (u @ v) / math.sqrt(c_in) + torch.randn(c_out, c_in, generator=gen, dtype=torch.float64) / c_in
    shape = (c_out, c_in) + (1,) * len(kernel)
    return mixing.reshape(shape) * profile + 0.3 * random_kernel(c_out, c_in, kernel, gen)


TIGHT_RANDOM = [  # (rank, channels, kernel, size, stride): random kernels, tiny grids included
    (2, 4, 3, 10, 1), (2, 12, 3, 10, 1), (2, 8, 3, 14, 2), (1, 16, 5, 32, 1), (1, 8, 3, 24, 2), (2, 4, 5, 20, 1),
    (2, 4, 3, 4, 1), (2, 8, 3, 4, 1), (2, 32, 3, 4, 1), (2, 16, 3, 7, 1), (2, 8, 3, 6, 2), (2, 4, 5, 6, 1),
    (3, 4, 3, 4, 1), (1, 8, 5, 5, 1),
]
TIGHT_TRAINED = [  # trained-like kernels, from tiny grids up
    (2, 4, 3, 4, 1), (2, 16, 3, 7, 1), (2, 32, 3, 7, 1), (2, 16, 3, 10, 1), (1, 16, 5, 12, 1), (2, 8, 3, 8, 2),
]


@pytest.mark.parametrize("kind,config", [("random", c) for c in TIGHT_RANDOM] + [("trained", c) for c in TIGHT_TRAINED])
def test_bounds_are_tight_where_the_goal_asks(kind, config):
    rank, channels, k, size, stride = config
    gen = torch.Generator().manual_seed(7)
    kernel = [k] * rank
    weight = (random_kernel if kind == "random" else trained_like_kernel)(channels, channels, kernel, gen)
    conv = make_conv(rank, channels, channels, kernel, stride, k // 2, 1, 1, "zeros", weight)
    # The operator's own matrix (checked against torch's conv above) is much faster to build.
    expected = float(torch.linalg.matrix_norm(as_operator(conv, [size] * rank).matrix(), ord=2))
    bounds = specfx.operator_norm(conv, [size] * rank, method="bounds")
    assert bounds.lower <= expected <= bounds.upper
    assert bounds.lower >= 0.99 * expected
    assert bounds.upper <= 1.05 * expected, bounds
    if kind == "trained":  # a gap under the top eigenvalue: Lehmann's bound is nearly exact
        assert bounds.method.startswith("Lehmann") and bounds.upper <= 1.001 * expected, bounds


@settings(max_examples=30, deadline=None)
@given(layer_configs(), st.integers(0, 3))
def test_the_window_correction_is_an_upper_bound_and_exact_when_everything_is_kept(config, step):
    """Over layers of every rank, stride, dilation, groups and padding amount (zeros): the
    window-corrected bound contains the true norm with any number of components kept, and
    equals it once all are."""
    conv, size = conv_of(config, mode="zeros")
    expected = true_norm(conv, size)
    op = as_operator(conv, size)
    grid = dominating_grid(op)
    groups = [comps for comps in windowed.components(op, grid) if len(comps.sigma)]
    count = [1, 4, 16, 10 ** 6][step]
    bound = max(windowed.corrected_bound(op, grid, comps, count)[0] for comps in groups)
    assert bound >= expected * (1 - 1e-12), (bound, expected)
    if all(comps.complete for comps in groups):
        full = max(windowed.corrected_bound(op, grid, comps, 10 ** 9)[0] for comps in groups)
        # What remains is the rounding allowance on the singular values left out (all zero).
        slack = 2 * max(math.sqrt(comps.gram_error) for comps in groups)
        assert full <= expected * (1 + 1e-12) + slack, (full, expected)


def test_the_window_correction_removes_the_finite_size_excess_of_random_kernels():
    """A random 16-channel kernel on a 4x4 grid: the circulant bound is 8-12% above the
    norm (its plane waves do not fit in four samples); the corrected bound is within 1%."""
    gen = torch.Generator().manual_seed(3)
    conv = make_conv(2, 16, 16, [3, 3], 1, 1, 1, 1, "zeros", random_kernel(16, 16, [3, 3], gen))
    expected = true_norm(conv, [4, 4])
    plain = specfx.operator_norm(conv, 4, method="bounds", refine=False)
    corrected = specfx.operator_norm(conv, 4, method="bounds")
    assert plain.upper > 1.05 * expected
    assert corrected.method.startswith("window-corrected") and corrected.upper <= 1.01 * expected, corrected


@pytest.mark.parametrize("rank,c_in,c_out,k,stride,groups,size", [
    (2, 32, 32, 7, 1, 32, 8),   # depthwise: each group corrected on its own
    (2, 16, 32, 3, 2, 1, 6),    # strided: the aliases of an output frequency form one block
    (3, 4, 4, 3, 2, 1, 6),
    (1, 8, 8, 5, 2, 2, 9),
])
def test_the_window_correction_covers_groups_and_strides(rank, c_in, c_out, k, stride, groups, size):
    gen = torch.Generator().manual_seed(5)
    weight = random_kernel(c_out, c_in // groups, [k] * rank, gen)
    conv = make_conv(rank, c_in, c_out, [k] * rank, stride, k // 2, 1, groups, "zeros", weight)
    expected = true_norm(conv, [size] * rank)
    bounds = specfx.operator_norm(conv, size, method="bounds")
    assert expected <= bounds.upper <= 1.01 * expected, bounds


@pytest.mark.parametrize("stride,padding,groups,size", [(1, 0, 1, 5), (2, 0, 1, 6), (2, 1, 2, 5), (3, 2, 1, 4), (1, 3, 1, 2),
                                                       (3, 2, 1, 1)])
def test_a_pointwise_conv_is_its_weight_matrix(stride, padding, groups, size):
    """1x1 convs (ResNet's bottlenecks and shortcuts): exact from the weight alone,
    whatever the stride and zero padding — including padding that outputs only zeros."""
    torch.manual_seed(stride * 10 + padding)
    conv = make_conv(2, 6, 8, [1, 1], stride, padding, 1, groups, "zeros")
    expected = true_norm(conv, [size, size])
    bounds = specfx.operator_norm(conv, size, method="bounds")
    assert bounds.exact and bounds.method.startswith("1x1")
    assert bounds.lower <= expected <= bounds.upper and bounds.upper <= expected * (1 + 1e-8) + 1e-300


@pytest.mark.parametrize("fill", [float("nan"), float("inf")])
def test_a_non_finite_weight_is_refused_by_name(fill):
    conv = make_conv(2, 4, 4, [3, 3], 1, 1, 1, 1, "zeros")
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = fill
    with pytest.raises(LayerError, match="NaN or Inf"):
        specfx.operator_norm(conv, 6, method="bounds")


def test_a_zero_weight_has_norm_zero_and_no_gap():
    conv = make_conv(2, 4, 4, [3, 3], 1, 1, 1, 1, "zeros", torch.zeros(4, 4, 3, 3, dtype=torch.float64))
    bounds = specfx.operator_norm(conv, 6, method="bounds")
    assert bounds.lower == bounds.upper == 0 and bounds.gap == 0


def test_the_circulant_bound_alone_overshoots_on_small_grids():
    """Without the refinement the bound is the containing periodic conv's norm, whose
    excess is the finite-size effect: ~20% on a 4x4 grid for a smooth kernel."""
    gen = torch.Generator().manual_seed(7)
    conv = make_conv(2, 4, 4, [3, 3], 1, 1, 1, 1, "zeros", trained_like_kernel(4, 4, [3, 3], gen))
    expected = true_norm(conv, [4, 4])
    plain = specfx.operator_norm(conv, 4, method="bounds", refine=False)
    refined = specfx.operator_norm(conv, 4, method="bounds")
    assert plain.method == "circulant 5x5" and plain.upper > 1.1 * expected
    assert refined.upper <= 1.001 * expected


def test_zero_padded_layer_is_a_submatrix_of_its_containing_periodic_conv():
    """The containing grid's periodic operator, restricted to the layer's inputs and
    outputs, is the layer's matrix (the fact behind the upper bound)."""
    torch.manual_seed(3)
    conv = make_conv(2, 2, 3, [3, 2], [2, 1], [1, 2], [2, 1], 1, "zeros")
    op = as_operator(conv, (7, 5))
    grid = dominating_grid(op)
    # The periodic conv y[t] = Σ_m w[m] x[(s·t + d·m − left) mod N] on every basis vector:
    # the input shifted right by the left padding and tiled over two periods.
    dim = 2 * math.prod(grid)
    basis = torch.eye(dim, dtype=torch.float64).reshape(dim, 2, *grid)
    shifted = torch.roll(basis, shifts=(op.padding[0][0], op.padding[1][0]), dims=(2, 3)).repeat(1, 1, 2, 2)
    out = torch.nn.functional.conv2d(shifted, conv.weight, None, (2, 1), 0, (2, 1))[..., :grid[0] // 2, :grid[1]]
    periodic = out.reshape(2, *grid, 3, grid[0] // 2, grid[1])  # (input, output) indices
    layer = periodic[:, :7, :5, :, :op.out_size[0], :op.out_size[1]]
    assert torch.allclose(layer.reshape(2 * 7 * 5, -1).T, op.matrix(), rtol=0, atol=1e-14)


def test_float32_blocks_bound_the_float64_values():
    """Blocks past the SVD limit go through float32 Gram matrices with error margins: the
    values bound the float64 SVD's, by well under 0.5%."""
    gen = torch.Generator().manual_seed(0)
    weight = random_kernel(160, 150, [3, 3], gen).float()
    op = as_operator(weight, 3, padding=1)
    grid = dominating_grid(op)
    values, arithmetic = block_upper_values(op, grid)
    exact = torch.linalg.svdvals(periodic_blocks(op, grid).matrices).max()
    assert arithmetic == "float32 Gram"
    assert exact <= values[0] <= exact * 1.005


def test_exact_is_refused_past_the_dense_limit():
    conv = nn.Conv2d(8, 8, 3, padding=1)
    with pytest.raises(LayerError, match=r"Conv2d: the explicit matrix of Conv2d 8→8 k=3x3 p=1 zeros on 32x32 "
                                         r"would be 8192 x 8192"):
        specfx.operator_norm(conv, 32, method="exact")
    with pytest.raises(LayerError, match="method must be 'auto', 'exact' or 'bounds'"):
        specfx.operator_norm(conv, 8, method="fast")


def test_input_size_and_padding_errors_name_the_layer():
    conv = nn.Conv2d(2, 2, 5)
    with pytest.raises(LayerError, match=r"Conv2d: input size 3x3 is smaller than the dilated kernel \(5x5\)"):
        specfx.operator_norm(conv, 3)
    with pytest.raises(LayerError, match="must give 2 positive spatial sizes"):
        specfx.operator_norm(conv, (8, 8, 8))
    with pytest.raises(LayerError, match="padding for a module is None"):
        specfx.singular_values(conv, 8, padding=2)


def test_norm_bounds_read_as_an_interval():
    torch.manual_seed(0)
    bounds = specfx.operator_norm(nn.Conv2d(3, 3, 3, padding=1), 16, method="bounds")
    text = str(bounds)
    assert text.startswith("[") and "circulant 17x17" in text and "%" in text
    assert bounds.gap == pytest.approx(bounds.upper / bounds.lower - 1)
