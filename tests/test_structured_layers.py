"""The structured layers of :mod:`specfx.nn` against dense references built independently.

Kronecker weights are checked against ``torch.kron`` (never against the layers' own
``kronecker_dense``), projections against the SVD of a rearrangement written out index by
index, and butterflies against a product of explicit ``N x N`` stage matrices. Forward
and gradients are compared in float64 with the scaled tolerances of ``conftest``.
"""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import assert_scaled_close
from specfx.nn import ButterflyLinear, KroneckerConv2d, KroneckerLinear
from specfx.nn.butterfly_ops import butterfly_linear, factorize, fit, padded_size
from specfx.nn.factors import balanced_split
from specfx.nn.kronecker_ops import _conv_order_costs

F64 = torch.float64


# --- independent references -----------------------------------------------------------------

def kron_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_r a[r] ⊗ b[r]`` with ``torch.kron`` (kernel dims on ``b``: ``a`` gets size-1 ones)."""
    extra = b.dim() - 3
    return sum(torch.kron(a[r].reshape(*a.shape[1:], *([1] * extra)), b[r]) for r in range(a.shape[0]))


def rearranged(w: torch.Tensor, a: tuple[int, int], b: tuple[int, int]) -> torch.Tensor:
    """Van Loan–Pitsianis' R(W), entry by entry."""
    (a1, b1), (a2, b2) = a, b
    r = torch.empty(a1 * b1, a2 * b2, dtype=w.dtype)
    for i1 in range(a1):
        for j1 in range(b1):
            for i2 in range(a2):
                for j2 in range(b2):
                    r[i1 * b1 + j1, i2 * b2 + j2] = w[i1 * a2 + i2, j1 * b2 + j2]
    return r


def butterfly_reference(twiddle: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor:
    """The butterfly's ``(out, in)`` matrix as a product of explicit stage matrices
    (differentiable in ``twiddle``)."""
    size = 2 * twiddle.shape[-1]
    matrix = torch.eye(size, dtype=twiddle.dtype)
    for level in range(twiddle.shape[0]):
        s = 1 << level
        rows, cols, values = [], [], []
        for p in range(size // 2):
            g, k = divmod(p, s)
            i, j = g * 2 * s + k, g * 2 * s + s + k
            for (o, ii), (row, col) in zip([(0, 0), (0, 1), (1, 0), (1, 1)], [(i, i), (i, j), (j, i), (j, j)]):
                rows.append(row)
                cols.append(col)
                values.append(twiddle[level, o, ii, p])
        stage = torch.zeros(size, size, dtype=twiddle.dtype).index_put((torch.tensor(rows), torch.tensor(cols)),
                                                                         torch.stack(values))
        matrix = stage @ matrix
    return matrix[:out_features, :in_features]


def hadamard(size: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < size:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h / math.sqrt(size)


def grads(outputs: torch.Tensor, upstream: torch.Tensor, leaves: list[torch.Tensor]) -> tuple:
    return torch.autograd.grad(outputs, leaves, upstream)


# --- strategies -----------------------------------------------------------------------------

side = st.integers(1, 5)


@st.composite
def kronecker_shapes(draw):
    """One or two groups of factor shapes for the same out x in matrix, and ranks."""
    a1, b1, a2, b2 = (draw(side) for _ in range(4))
    groups = [((a1, b1), (a2, b2))]
    if draw(st.booleans()):
        out, inp = a1 * a2, b1 * b2
        c1 = draw(st.sampled_from([d for d in range(1, out + 1) if out % d == 0]))
        d1 = draw(st.sampled_from([d for d in range(1, inp + 1) if inp % d == 0]))
        groups.append(((c1, d1), (out // c1, inp // d1)))
    ranks = [draw(st.integers(1, min(a[0] * a[1], b[0] * b[1]))) for a, b in groups]
    return groups, ranks


# --- KroneckerLinear ------------------------------------------------------------------------

@settings(max_examples=40, deadline=None)
@given(kronecker_shapes(), st.booleans(), st.integers(0, 3), st.integers(0, 2 ** 31 - 1))
def test_kronecker_linear_forward_and_gradients_match_dense(shapes, bias, batch, seed):
    groups, ranks = shapes
    torch.manual_seed(seed)
    (a1, b1), (a2, b2) = groups[0]
    layer = KroneckerLinear(b1 * b2, a1 * a2, ranks, groups, bias=bias, dtype=F64)
    x = torch.randn(batch, 2, b1 * b2, dtype=F64, requires_grad=True)
    y = layer(x)
    params = [*layer.a_factors, *layer.b_factors] + ([layer.bias] if bias else [])
    weight = sum(kron_sum(a, b) for a, b in zip(layer.a_factors, layer.b_factors))
    expected = F.linear(x, weight, layer.bias)
    assert y.shape == expected.shape == (batch, 2, a1 * a2)
    assert_scaled_close(y, expected)
    if batch:
        upstream = torch.randn_like(y)
        for got, want in zip(grads(y, upstream, [x, *params]), grads(expected, upstream, [x, *params])):
            assert_scaled_close(got, want, scale=want.abs().max().item() + 1e-300)


@settings(max_examples=30, deadline=None)
@given(kronecker_shapes(), st.integers(0, 2 ** 31 - 1))
def test_from_linear_is_exact_on_sums_of_kronecker_products(shapes, seed):
    groups, ranks = shapes
    (a, b), rank = groups[0], ranks[0]
    generator = torch.Generator().manual_seed(seed)
    fa = torch.randn(rank, *a, dtype=F64, generator=generator)
    fb = torch.randn(rank, *b, dtype=F64, generator=generator)
    linear = nn.Linear(a[1] * b[1], a[0] * b[0], dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(kron_sum(fa, fb))
    layer = KroneckerLinear.from_linear(linear, rank=rank, factors=(a, b))
    assert layer.fit_error < 1e-10
    assert_scaled_close(layer.dense_weight(), linear.weight)
    x = torch.randn(3, linear.in_features, dtype=F64)
    assert_scaled_close(layer(x), linear(x))


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 4), st.integers(1, 16),
       st.integers(0, 2 ** 31 - 1))
def test_from_linear_is_the_truncated_svd_of_the_rearranged_matrix(a1, b1, a2, b2, rank, seed):
    rank = min(rank, a1 * b1, a2 * b2)
    linear = nn.Linear(b1 * b2, a1 * a2, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(a1 * a2, b1 * b2, dtype=F64, generator=torch.Generator().manual_seed(seed)))
    layer = KroneckerLinear.from_linear(linear, rank=rank, factors=((a1, b1), (a2, b2)))
    r = rearranged(linear.weight.detach(), (a1, b1), (a2, b2))
    u, s, vh = torch.linalg.svd(r, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    # Eckart–Young: the error of the optimum is the tail of the singular values, and the
    # projection is the truncated SVD itself (unique: random singular values are distinct).
    error = (layer.dense_weight() - linear.weight).norm()
    assert error.item() == pytest.approx(s[rank:].square().sum().sqrt().item(), abs=1e-9)
    assert_scaled_close(rearranged(layer.dense_weight().detach(), (a1, b1), (a2, b2)), best, tol=1e-9)
    assert layer.fit_error == pytest.approx((error / linear.weight.norm()).item(), abs=1e-12)


def test_mixed_shapes_fit_no_worse_than_their_first_shape_alone():
    torch.manual_seed(0)
    linear = nn.Linear(24, 20, dtype=F64)
    one = KroneckerLinear.from_linear(linear, rank=2, factors=((4, 3), (5, 8)))
    mixed = KroneckerLinear.from_linear(linear, rank=[2, 2], factors=[((4, 3), (5, 8)), ((2, 6), (10, 4))])
    assert mixed.fit_error <= one.fit_error + 1e-12
    assert mixed.fit_error < one.fit_error - 1e-3  # the second shape adds capacity


def test_balanced_factors_are_the_divisors_nearest_the_square_root():
    assert balanced_split(1024) == (32, 32)
    assert balanced_split(768) == (24, 32)
    assert balanced_split(10) == (2, 5)
    assert balanced_split(13) == (1, 13)
    layer = KroneckerLinear(768, 1024)
    assert (layer.groups[0].a, layer.groups[0].b) == ((32, 24), (32, 32))


# --- KroneckerConv2d ------------------------------------------------------------------------

@st.composite
def conv_configs(draw):
    o1, i1, o2, i2 = (draw(st.integers(1, 3)) for _ in range(4))
    kernel = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    stride = draw(st.sampled_from([(1, 1), (2, 1), (2, 2)]))
    dilation = draw(st.sampled_from([(1, 1), (1, 2)]))
    mode = draw(st.sampled_from(["zeros", "circular", "reflect", "replicate"]))
    padding = draw(st.sampled_from([0, 1, (1, 0)]) if stride != (1, 1) else st.sampled_from([0, 1, "same", "valid"]))
    rank = draw(st.integers(1, min(o1 * i1, o2 * i2 * kernel[0] * kernel[1])))
    return (o1, i1), (o2, i2), kernel, stride, padding, dilation, mode, rank


@settings(max_examples=40, deadline=None)
@given(conv_configs(), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_kronecker_conv_forward_and_gradients_match_dense_conv(config, bias, seed):
    a, b, kernel, stride, padding, dilation, mode, rank = config
    torch.manual_seed(seed)
    cin, cout = a[1] * b[1], a[0] * b[0]
    layer = KroneckerConv2d(cin, cout, kernel, rank, (a, b), stride, padding, dilation, bias, mode, dtype=F64)
    dense = nn.Conv2d(cin, cout, kernel, stride, padding, dilation, bias=bias, padding_mode=mode, device="meta")
    x = torch.randn(2, cin, 7, 6, dtype=F64, requires_grad=True)
    kernel_weight = kron_sum(layer.channel_factors[0], layer.spatial_factors[0])
    params = {"weight": kernel_weight} | ({"bias": layer.bias} if bias else {})
    expected = torch.func.functional_call(dense, params, (x,))
    y = layer(x)
    assert y.shape == expected.shape
    assert_scaled_close(y, expected)
    assert_scaled_close(layer(x[0]), expected[0])  # unbatched input
    leaves = [x, layer.channel_factors[0], layer.spatial_factors[0]]
    upstream = torch.randn_like(y)
    for got, want in zip(grads(y, upstream, leaves), grads(expected, upstream, leaves)):
        assert_scaled_close(got, want, scale=want.abs().max().item() + 1e-300)


def test_kronecker_conv_runs_both_factor_orders():
    """A channel factor that widens (o1 > i1) runs after the small conv, one that narrows
    runs before it; both orders agree with the dense conv."""
    orders = set()
    for (o1, i1), (o2, i2) in (((8, 1), (1, 8)), ((1, 8), (8, 1))):
        spatial, mix = _conv_order_costs(o1, i1, o2, i2, (3, 3), (1, 1))
        orders.add(spatial < mix)
        layer = KroneckerConv2d(i1 * i2, o1 * o2, 3, 2, ((o1, i1), (o2, i2)), padding=1, dtype=F64)
        x = torch.randn(2, i1 * i2, 6, 6, dtype=F64)
        weight = kron_sum(layer.channel_factors[0], layer.spatial_factors[0])
        assert_scaled_close(layer(x), F.conv2d(x, weight, layer.bias, padding=1))
    assert orders == {True, False}


def test_from_conv_is_exact_on_kronecker_kernels():
    torch.manual_seed(0)
    conv = nn.Conv2d(12, 8, 3, padding=1, dtype=F64)
    channel, spatial = torch.randn(2, 2, 3, dtype=F64), torch.randn(2, 4, 4, 3, 3, dtype=F64)
    with torch.no_grad():
        conv.weight.copy_(kron_sum(channel, spatial))
    layer = KroneckerConv2d.from_conv(conv, rank=2, factors=((2, 3), (4, 4)))
    assert layer.fit_error < 1e-10
    x = torch.randn(2, 12, 9, 9, dtype=F64)
    assert_scaled_close(layer(x), conv(x))
    assert KroneckerConv2d.from_conv(nn.Conv2d(12, 8, 3, dtype=F64), rank=1).fit_error > 0.1


# --- ButterflyLinear ------------------------------------------------------------------------

@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.booleans(), st.integers(0, 2 ** 31 - 1))
def test_butterfly_forward_and_gradients_match_its_stage_matrices(in_features, out_features, bias, seed):
    torch.manual_seed(seed)
    layer = ButterflyLinear(in_features, out_features, bias=bias, dtype=F64)
    assert layer.size == padded_size(in_features, out_features) >= max(in_features, out_features)
    x = torch.randn(3, 2, in_features, dtype=F64, requires_grad=True)
    y = layer(x)
    expected = F.linear(x, butterfly_reference(layer.twiddle, in_features, out_features), layer.bias)
    assert y.shape == expected.shape
    assert_scaled_close(y, expected)
    leaves = [x, layer.twiddle] + ([layer.bias] if bias else [])
    upstream = torch.randn_like(y)
    for got, want in zip(grads(y, upstream, leaves), grads(expected, upstream, leaves)):
        assert_scaled_close(got, want, scale=want.abs().max().item() + 1e-300)
    with torch.no_grad():  # inference runs without saving stage inputs: same values
        assert_scaled_close(layer(x), expected)


def test_butterfly_gradcheck():
    twiddle = torch.randn(3, 2, 2, 4, dtype=F64, requires_grad=True)
    x = torch.randn(2, 6, dtype=F64, requires_grad=True)
    bias = torch.randn(5, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t, b: butterfly_linear(x, t, b, 5), (x, twiddle, bias))


def test_butterfly_represents_the_hadamard_transform():
    """A 64x64 Walsh–Hadamard matrix is a butterfly: factorized exactly, and reached by
    gradient fitting from the default (random) initialisation."""
    h = hadamard(64)
    linear = nn.Linear(64, 64, bias=False, dtype=F64)
    with torch.no_grad():
        linear.weight.copy_(h)
    assert ButterflyLinear.from_linear(linear, steps=0).fit_error < 1e-12
    torch.manual_seed(0)
    start = ButterflyLinear(64, 64, bias=False, dtype=F64).twiddle
    fitted = fit(h, start, steps=500)
    assert ((butterfly_reference(fitted, 64, 64) - h).norm() / h.norm()).item() < 1e-4


def test_factorize_recovers_any_butterfly_and_from_linear_reports_its_error():
    torch.manual_seed(0)
    twiddle = torch.randn(5, 2, 2, 16, dtype=F64)
    matrix = butterfly_reference(twiddle, 32, 32)
    assert_scaled_close(butterfly_reference(factorize(matrix), 32, 32), matrix, tol=1e-10)
    dense = nn.Linear(20, 12, dtype=F64)
    layer = ButterflyLinear.from_linear(dense, steps=20)
    assert layer.fit_error == pytest.approx(
        ((layer.dense_weight() - dense.weight).norm() / dense.weight.norm()).item(), rel=1e-9)
    assert 0 < layer.fit_error < ButterflyLinear.from_linear(dense, steps=0).fit_error + 1e-12
    assert_scaled_close(layer.bias, dense.bias)


# --- shared properties ----------------------------------------------------------------------

def _output_std(layer: nn.Module, shape: tuple[int, ...]) -> float:
    torch.manual_seed(1)
    with torch.no_grad():
        if layer.bias is not None:
            layer.bias.zero_()
        return layer(torch.randn(*shape)).std().item()


@pytest.mark.parametrize("make, dense, shape", [
    (lambda: KroneckerLinear(1024, 512), lambda: nn.Linear(1024, 512), (64, 1024)),
    (lambda: KroneckerLinear(1024, 512, rank=4), lambda: nn.Linear(1024, 512), (64, 1024)),
    (lambda: ButterflyLinear(1024, 1024), lambda: nn.Linear(1024, 1024), (64, 1024)),
    (lambda: ButterflyLinear(600, 300), lambda: nn.Linear(600, 300), (64, 600)),
    (lambda: KroneckerConv2d(64, 64, 3, padding=1), lambda: nn.Conv2d(64, 64, 3, padding=1), (4, 64, 12, 12)),
])
def test_initialisation_keeps_the_dense_layers_activation_scale(make, dense, shape):
    torch.manual_seed(0)
    ratios = [_output_std(make(), shape) / _output_std(dense(), shape) for _ in range(3)]
    assert 0.8 < sum(ratios) / len(ratios) < 1.25, ratios


LAYERS = [
    (lambda: KroneckerLinear(24, 20, rank=[2, 1], factors=[((4, 3), (5, 8)), ((2, 6), (10, 4))]), (3, 24)),
    (lambda: KroneckerConv2d(12, 8, 3, rank=2, padding=1, padding_mode="reflect"), (2, 12, 6, 6)),
    (lambda: ButterflyLinear(20, 12), (3, 20)),
]


@pytest.mark.parametrize("make, shape", LAYERS)
def test_state_dict_round_trip(make, shape):
    torch.manual_seed(0)
    layer, other = make(), make()
    x = torch.randn(*shape)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    other.load_state_dict(torch.load(buffer))
    torch.testing.assert_close(other(x), layer(x), rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    torch.testing.assert_close(torch.load(buffer, weights_only=False)(x), layer(x), rtol=0, atol=0)
    torch.testing.assert_close(copy.deepcopy(layer)(x), layer(x), rtol=0, atol=0)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_torch_compile_aot_eager_matches_eager(make, shape):
    """``backend="aot_eager"`` traces forward and backward through AOTAutograd (the
    compiler's own path minus code generation, which keeps the test fast)."""
    torch.manual_seed(0)
    layer = make()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    x = torch.randn(*shape)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y1, y2 = compiled(x1), layer(x2)
    torch.testing.assert_close(y1, y2)
    upstream = torch.randn_like(y1)
    params = list(layer.parameters())
    for got, want in zip(grads(y1, upstream, [x1, *params]), grads(y2, upstream, [x2, *params])):
        torch.testing.assert_close(got, want)


def test_symbolic_trace_keeps_each_product_as_one_call():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.kron, self.fly, self.conv = KroneckerLinear(24, 20), ButterflyLinear(20, 12), KroneckerConv2d(4, 6, 3)

        def forward(self, x, image):
            return self.fly(self.kron(x)), self.conv(image)

    net = Net()
    gm = fx.symbolic_trace(net)
    targets = {getattr(n.target, "__name__", "") for n in gm.graph.nodes if n.op == "call_function"}
    assert {"kronecker_linear", "butterfly_linear", "kronecker_conv2d"} <= targets
    x, image = torch.randn(2, 24), torch.randn(2, 4, 8, 8)
    for got, want in zip(gm(x, image), net(x, image)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_half_precision_runs():
    torch.manual_seed(0)
    for layer, x in ((KroneckerLinear(24, 20), torch.randn(3, 24)), (ButterflyLinear(20, 12), torch.randn(3, 20))):
        reference = layer(x)
        low = copy.deepcopy(layer).to(torch.bfloat16)(x.to(torch.bfloat16))
        assert low.dtype == torch.bfloat16
        assert_scaled_close(low.float(), reference, tol=5e-2)


# --- errors ---------------------------------------------------------------------------------

def test_errors_name_the_layer_and_the_reason():
    with pytest.raises(ValueError, match=r"KroneckerLinear: factor shapes \(4, 3\) ⊗ \(5, 5\) do not make"):
        KroneckerLinear(24, 20, factors=((4, 3), (5, 5)))
    with pytest.raises(ValueError, match="KroneckerLinear: rank 13 exceeds 12"):
        KroneckerLinear(24, 20, rank=13, factors=((4, 3), (5, 8)))
    with pytest.raises(ValueError, match="KroneckerLinear: 1 ranks given for 2 factor shapes"):
        KroneckerLinear(24, 20, rank=[1], factors=[((4, 3), (5, 8)), ((2, 6), (10, 4))])
    with pytest.raises(ValueError, match="KroneckerLinear: input has 23 features"):
        KroneckerLinear(24, 20)(torch.randn(2, 23))
    with pytest.raises(ValueError, match="ButterflyLinear: input has 16 features"):
        ButterflyLinear(24, 20)(torch.randn(2, 16))
    with pytest.raises(ValueError, match=r"KroneckerConv2d: expected input \(N, 4, H, W\)"):
        KroneckerConv2d(4, 4, 3)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="KroneckerConv2d: padding='same' needs stride 1"):
        KroneckerConv2d(4, 4, 3, stride=2, padding="same")
    with pytest.raises(TypeError, match="KroneckerLinear.from_linear takes an nn.Linear"):
        KroneckerLinear.from_linear(nn.Conv2d(2, 2, 1))
    with pytest.raises(ValueError, match="from_conv takes groups=1 only"):
        KroneckerConv2d.from_conv(nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(ValueError, match="ButterflyLinear.from_linear: steps must be"):
        ButterflyLinear.from_linear(nn.Linear(4, 4), steps=-1)
