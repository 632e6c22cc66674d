"""Spectral chains end to end: every kind of fused chain is exact against the original
(forward, input and weight gradients, fp32 and fp64), the transforms left in the graph
are the ones the analysis predicts, poly activations are exact on polynomial networks and
report their true error otherwise, and a second optimize changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx
from conftest import assert_scaled_close
from specfx.chains.members import build_digraph
from specfx.verify import scaled_error

OPS = torch.ops.specfx


# --- models --------------------------------------------------------------------------------

class Pair(nn.Module):
    """conv -> [mid] -> [act] -> conv."""

    def __init__(self, mode="zeros", k=5, padding=None, act=None, mid=None, c=3, rank=2):
        super().__init__()
        conv = {1: nn.Conv1d, 2: nn.Conv2d}[rank]
        padding = k // 2 if padding is None else padding
        self.c1 = conv(c, c, k, padding=padding, padding_mode=mode)
        self.mid = mid or nn.Identity()
        self.act = act or nn.Identity()
        self.c2 = conv(c, c, k, padding=padding, padding_mode=mode)

    def forward(self, x):
        return self.c2(self.act(self.mid(self.c1(x))))


class Causal(nn.Module):
    """TCN-style causal convs: padding k-1, then the chomp x[..., :-(k-1)]."""

    def __init__(self, k=7, c=3, layers=3, act=True, dilation=1):
        super().__init__()
        self.chomp = (k - 1) * dilation
        self.convs = nn.ModuleList(nn.Conv1d(c, c, k, padding=self.chomp, dilation=dilation) for _ in range(layers))
        self.act = act

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)[..., :-self.chomp]
            if self.act and i < len(self.convs) - 1:
                x = F.gelu(x)
        return x


class Residual(nn.Module):
    """A residual block (BN, ReLU, add) and an affine map before the next conv."""

    def __init__(self, c=3, k=5):
        super().__init__()
        self.c1, self.c2, self.c3 = (nn.Conv2d(c, c, k, padding=k // 2) for _ in range(3))
        self.bn = nn.BatchNorm2d(c)
        self.gain = nn.Parameter(torch.rand(1, c, 1, 1) + 0.5)

    def forward(self, x):
        y = x + self.c2(F.relu(self.bn(self.c1(x))))
        return self.c3(torch.relu(y * self.gain + 0.25))


class MultiUse(nn.Module):
    """The first conv's output and the activation are also used outside the chain."""

    def __init__(self, c=3, k=5):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, c, k, padding=k // 2), nn.Conv2d(c, c, k, padding=k // 2)

    def forward(self, x):
        y = self.c1(x)
        z = F.silu(y)
        return self.c2(z) + y, z


class Square(nn.Module):
    """A network with square activations, as trained for the Fourier domain."""

    def __init__(self, mode="zeros", k=3, c=3, padding=None):
        super().__init__()
        padding = k // 2 if padding is None else padding
        self.c1, self.c2, self.c3 = (nn.Conv2d(c, c, k, padding=padding, padding_mode=mode) for _ in range(3))

    def forward(self, x):
        y = self.c1(x)
        y = self.c2(y * y)
        return self.c3(y ** 2)


class Mixer(nn.Module):
    """Depthwise circular convs with a pointwise conv and a BatchNorm between them."""

    def __init__(self, c=4, k=5, bn=True):
        super().__init__()
        self.dw1 = nn.Conv2d(c, c, k, padding=k // 2, groups=c, padding_mode="circular")
        self.pw = nn.Conv2d(c, c, 1)
        self.bn = nn.BatchNorm2d(c) if bn else nn.Identity()
        self.dw2 = nn.Conv2d(c, c, k, padding=k // 2, groups=c, padding_mode="circular")

    def forward(self, x):
        return self.dw2(self.bn(self.pw(self.dw1(x))))


class Pooled(nn.Module):
    def __init__(self, c=3, k=5):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, c, k, padding=k // 2), nn.Conv2d(c, c, k, padding=k // 2)
        self.pool = nn.AvgPool2d(3, stride=1, padding=1)

    def forward(self, x):
        return self.c2(self.pool(F.relu(self.c1(x))))


class StridedEnd(nn.Module):
    """A chain ending in a strided, dilated conv (which reads the spectrum, and crops).
    (Stride and dilation coprime: every sample is read. A conv that skips samples selects
    them before its own transform, so it ends no chain.)"""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 5, padding=2)
        self.c2 = nn.Conv2d(4, 4, 5, stride=2, padding=3, dilation=3)

    def forward(self, x):
        return self.c2(F.gelu(self.c1(x), approximate="tanh"))


class Dilated1d(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 3, 5, padding=4, dilation=2)
        self.c2 = nn.Conv1d(3, 3, 5, padding="same", dilation=3)

    def forward(self, x):
        return self.c2(torch.relu(self.c1(x)) * 2.0)


def _eval(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial running statistics
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


X2 = (2, 3, 10, 10)
X1 = (2, 3, 24)

# kind: (model factory, input shape, optimize kwargs, expected (forward, inverse) transforms)
KINDS = {
    "same_relu": (lambda: Pair(act=nn.ReLU()), X2, {}, (2, 2)),
    "same_leaky_bn": (lambda: Pair(act=nn.LeakyReLU(0.2), mid=nn.BatchNorm2d(3)), X2, {}, (2, 2)),
    "same_linear_masked": (lambda: Pair(), X2, {}, (2, 2)),
    "circular_relu": (lambda: Pair("circular", act=nn.ReLU()), X2, {}, (2, 2)),
    "circular_linear_bn": (lambda: Pair("circular", mid=nn.BatchNorm2d(3)), X2, {}, (1, 1)),
    "valid_linear": (lambda: Pair(padding=0), X2, {}, (1, 1)),
    "valid_gelu": (lambda: Pair(padding=0, act=nn.GELU()), X2, {}, (2, 2)),
    "causal_gelu": (lambda: Causal(), X1, {}, (3, 3)),
    "causal_linear": (lambda: Causal(act=False, dilation=2), X1, {}, (1, 1)),
    "residual": (Residual, X2, {}, (3, 3)),
    "multi_use": (MultiUse, X2, {}, (2, 4)),
    "avg_pool": (Pooled, X2, {}, (3, 3)),
    "square_poly_same": (Square, X2, {"spectral_activation": "poly"}, (1, 1)),
    "square_poly_circular": (lambda: Square("circular"), X2, {"spectral_activation": "poly"}, (1, 1)),
    "square_poly_valid": (lambda: Square(padding=0), (2, 3, 12, 12), {"spectral_activation": "poly"}, (1, 1)),
    "export_residual": (Residual, X2, {"frontend": "export"}, (3, 3)),
    "strided_end_channels_last": (StridedEnd, "channels_last", {}, (2, 2)),
    "dilated_1d_unbatched": (Dilated1d, (3, 20), {}, (2, 2)),
}


def _run(module, x, outputs_weight=(1.0, 2.0)):
    out = module(x)
    outs = out if isinstance(out, tuple) else (out,)
    return outs, sum(w * (o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).reshape(o.shape)).sum()
                     for w, o in zip(outputs_weight, outs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_fused_chain_is_exact_forward_and_backward(kind, dtype):
    factory, shape, kwargs, (fwd, inv) = KINDS[kind]
    torch.manual_seed(0)
    model = _eval(factory()).to(dtype)
    if shape == "channels_last":
        x = torch.randn(2, 3, 11, 13, dtype=dtype).to(memory_format=torch.channels_last)
    else:
        x = torch.randn(shape, dtype=dtype)
    fast = specfx.optimize(model, (x,), policy="always", **kwargs)
    report = fast.specfx_report
    assert [c.fused for c in report.chains] == [True], str(report)
    assert report.transforms == {"forward": fwd, "inverse": inv}, str(report)
    assert report.output_error is None  # exact: verified as usual
    assert report.verified_error is not None

    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_fast, loss_fast = _run(fast, x_fast)
    out_ref, loss_ref = _run(model, x_ref)
    for a, e in zip(out_fast, out_ref):
        assert_scaled_close(a, e)
    loss_fast.backward()
    loss_ref.backward()
    assert_scaled_close(x_fast.grad, x_ref.grad)
    fast_params = dict(fast.named_parameters())
    for name, p in model.named_parameters():
        assert_scaled_close(fast_params[name].grad, p.grad)


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "leaky_relu": lambda: nn.LeakyReLU(0.1),
               "none": nn.Identity}


@st.composite
def chain_configs(draw):
    """A conv -> [BN] -> activation -> conv pair with every free parameter drawn."""
    rank = draw(st.sampled_from([1, 2]))
    k = draw(st.sampled_from([1, 3, 5, 7]))
    dilation = draw(st.integers(1, 2))
    mode = draw(st.sampled_from(["zeros", "circular", "valid"]))
    extent = (k - 1) * dilation
    size = draw(st.integers(max(2, 2 * extent + 1), 2 * extent + 12))
    return dict(rank=rank, k=k, dilation=dilation, mode=mode,
                size=[size] + ([draw(st.integers(max(2, 2 * extent + 1), 2 * extent + 12))] if rank == 2 else []),
                channels=draw(st.integers(1, 4)), depthwise=draw(st.booleans()),
                batch_norm=draw(st.booleans()), activation=draw(st.sampled_from(sorted(ACTIVATIONS))),
                batch=draw(st.integers(1, 3)), dtype=draw(st.sampled_from([torch.float32, torch.float64])),
                seed=draw(st.integers(0, 2**16)))


def _generated_pair(cfg) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d}[cfg["rank"]]
    c, k, d = cfg["channels"], cfg["k"], cfg["dilation"]
    padding = 0 if cfg["mode"] == "valid" else (k - 1) * d // 2
    mode = "circular" if cfg["mode"] == "circular" else "zeros"
    groups = c if cfg["depthwise"] else 1
    norm = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[cfg["rank"]]
    return nn.Sequential(
        conv(c, c, k, padding=padding, dilation=d, groups=groups, padding_mode=mode),
        norm(c) if cfg["batch_norm"] else nn.Identity(),
        ACTIVATIONS[cfg["activation"]](),
        conv(c, c, k, padding=padding, dilation=d, groups=groups, padding_mode=mode))


@settings(max_examples=60, deadline=None)
@given(cfg=chain_configs())
def test_generated_chains_are_exact_forward_and_backward(cfg):
    """Gradients are compared in norm, all parameters' as one vector: a small conv's
    weight gradient is a short sum that can cancel to far below its terms, and an FFT
    conv's rounding error is bounded by the terms, not by the sum."""
    torch.manual_seed(cfg["seed"])
    model = _eval(_generated_pair(cfg)).to(cfg["dtype"])
    x = torch.randn(cfg["batch"], cfg["channels"], *cfg["size"], dtype=cfg["dtype"])
    fast = specfx.optimize(model, (x,), policy="always")
    # A 'valid' second conv with fewer outputs than its dilation skips samples: it selects
    # the ones it reads before its own transform, so it ends no chain.
    skips = cfg["mode"] == "valid" and min(cfg["size"]) - 2 * (cfg["k"] - 1) * cfg["dilation"] < cfg["dilation"]
    assert [c.fused for c in fast.specfx_report.chains] == ([] if skips else [True]), str(fast.specfx_report)
    dy = None
    grads = []
    for module in (fast, model):
        x_in = x.clone().requires_grad_()
        out = module(x_in)
        dy = torch.randn_like(out) if dy is None else dy
        out.backward(dy)
        params = dict(module.named_parameters())
        grads.append((out, x_in.grad, torch.cat([params[name].grad.flatten() for name in sorted(params)])))
    for actual, expected in zip(*grads):
        assert_scaled_close(actual, expected)


def test_transforms_match_explain_and_per_conv_lowering():
    model, x = _eval(Residual()), torch.randn(X2)
    report = specfx.explain(model, (x,), policy="always", spectral_activation="poly")
    fast = specfx.optimize(model, (x,), policy="always", spectral_activation="poly")
    assert report.transforms == fast.specfx_report.transforms == {"forward": 1, "inverse": 1}
    assert report.transforms_per_conv == {"forward": 3, "inverse": 3}
    plain = specfx.optimize(model, (x,), policy="always", chains=False)
    assert plain.specfx_report.chains == []
    assert plain.specfx_report.transforms == {"forward": 3, "inverse": 3}
    targets = {n.target for n in plain.graph.nodes}
    assert OPS.spectral_activation.default not in targets and OPS.poly_activation.default not in targets


def test_linear_chain_has_no_transform_pair_between_its_convs():
    model, x = Pair("circular", mid=nn.BatchNorm2d(3)).eval(), torch.randn(X2)
    fast = specfx.optimize(model, (x,), policy="always")
    targets = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert targets.count(OPS.to_spectrum.default) == 1 and targets.count(OPS.from_spectrum.default) == 1
    assert targets.count(OPS.spectral_mix.default) == 2
    chain = fast.specfx_report.chains[0]
    assert chain.eliminated == 1 and chain.grid == (10, 10) and chain.padding == "circular"
    assert "mid (batch_norm: frequency domain)" in chain.ops


def test_causal_chain_is_planned_on_a_grid_without_wrap_around():
    model, x = Causal(k=7, act=False), torch.randn(X1)
    fast = specfx.optimize(model, (x,), policy="always")
    chain = fast.specfx_report.chains[0]
    # three causal convs: the negative reads stay zero once P >= L + sum of spans
    assert chain.grid[0] >= 24 + 3 * 6 and chain.eliminated == 2
    assert not any("mask" in op for op in chain.ops)


def test_zero_padded_linear_chain_gets_a_mask():
    fast = specfx.optimize(Pair(), torch.randn(X2), policy="always")
    chain = fast.specfx_report.chains[0]
    assert [a.activation for a in chain.activations] == ["identity (mask)"]
    masks = [n for n in fast.graph.nodes if n.target is OPS.spectral_activation.default]
    assert len(masks) == 1 and masks[0].args[5] == "identity"


def test_report_shows_chains():
    fast = specfx.optimize(Pair(act=nn.ReLU()), torch.randn(X2), policy="always")
    text = str(fast.specfx_report)
    assert "[chain fused ] chain0: c1 -> c2 (zeros padding at" in text
    assert "act (relu: exact spectral activation)" in text
    assert "transforms in the graph: forward 2, inverse 2 (per-conv lowering: forward 2, inverse 2)" in text


def test_chains_false_and_policy_never():
    model, x = Pair(act=nn.ReLU()), torch.randn(X2)
    report = specfx.optimize(model, (x,), policy="always", chains=False).specfx_report
    assert report.chains == [] and report.transforms == {"forward": 2, "inverse": 2}
    report = specfx.optimize(model, (x,), policy="never").specfx_report
    assert report.chains == [] and report.transforms == {"forward": 0, "inverse": 0}
    with pytest.raises(ValueError, match="spectral_activation must be one of"):
        specfx.optimize(model, (x,), spectral_activation="cubic")


# --- placement (policy="auto") ------------------------------------------------------------

# Transforms dear, dense direct convs cheap: the min-cut keeps the pointwise conv (which
# the planner leaves direct) in the frequency domain rather than pay a transform pair.
DEAR_TRANSFORMS = specfx.CostProfile(fft_gflops=0.5, inverse_fft_gflops=0.5, dense_direct_gflops=1e4,
                                     depthwise_fast_gflops=0.01, depthwise_slow_gflops=0.01)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_auto_absorbs_a_direct_conv_where_transforms_cost_more(dtype):
    model, x = _eval(Mixer()).to(dtype), torch.randn(2, 4, 8, 8, dtype=dtype)
    fast = specfx.optimize(model, (x,), profile=DEAR_TRANSFORMS)
    report = fast.specfx_report
    assert report.lowered == ["dw1", "dw2"] and "pw" in report.kept
    chain = report.chains[0]
    assert chain.fused and "pw (conv: frequency domain)" in chain.ops, str(report)
    assert report.transforms == {"forward": 1, "inverse": 1}
    assert chain.cost.fused_ms < chain.cost.per_conv_ms
    x_fast, x_ref = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast(x_fast).pow(2).sum().backward()
    model(x_ref).pow(2).sum().backward()
    assert_scaled_close(x_fast.grad, x_ref.grad)
    params = dict(fast.named_parameters())
    for name in ("pw.weight", "dw1.weight", "bn.weight"):
        assert_scaled_close(params[name].grad, dict(model.named_parameters())[name].grad)


def test_auto_keeps_chains_that_do_not_pay():
    """Transforms cheap, a spectral channel contraction dear: the min-cut keeps the
    pointwise conv spatial, and with it the whole chain (per-conv lowering)."""
    cheap = specfx.CostProfile(fft_gflops=1e4, inverse_fft_gflops=1e4, depthwise_fast_gflops=0.01,
                               depthwise_slow_gflops=0.01, dense_direct_gflops=1e4, complex_gemm_gflops=1e-3)
    report = specfx.optimize(_eval(Mixer(c=32, bn=False)), torch.randn(2, 32, 8, 8), profile=cheap).specfx_report
    chain = report.chains[0]
    assert not chain.fused and chain.reason, str(report)
    assert "pw (conv: spatial)" in chain.ops
    assert report.transforms == report.transforms_per_conv == {"forward": 2, "inverse": 2}


def test_a_fused_chain_reports_its_cost():
    # (the min-cut itself is unit-tested on plain data: tests/test_chain_placement.py)
    report = specfx.explain(_eval(Residual()), (torch.randn(X2),), policy="always")
    assert report.chains[0].cost.fused_ms > 0


def test_digraph_records_operand_positions():
    gm = torch.fx.symbolic_trace(Residual())
    graph = build_digraph(gm)
    assert graph.edges["x", "add"]["positions"] == ["args[0]"]
    assert graph.edges["c2", "add"]["positions"] == ["args[1]"]
    assert graph.edges["add", "mul"]["positions"] == ["args[0]"]


# --- poly -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["zeros", "circular"])
def test_poly_is_exact_on_a_square_activation_network(mode):
    model, x = Square(mode), torch.randn(X2)
    fast = specfx.optimize(model, (x,), policy="always", spectral_activation="poly")
    report = fast.specfx_report
    acts = report.chains[0].activations
    assert [(a.mode, a.error) for a in acts] == [("poly", 0.0), ("poly", 0.0)]
    assert acts[0].mask_input == (mode == "zeros")  # a 'same' conv reads past the data
    targets = [n.target for n in fast.graph.nodes]
    assert OPS.spectral_activation.default not in targets and targets.count(OPS.poly_activation.default) == 2
    assert report.output_error is None and report.verified_error < 1e-4
    assert_scaled_close(fast(x), model(x))


def test_poly_is_exact_on_a_trained_square_activation_network():
    """Train the square-activation net to fit a target, then lower it with poly: the
    trained weights change nothing about exactness (x ↦ x² is its own polynomial)."""
    torch.manual_seed(0)
    model, x = Square(), torch.randn(X2)
    target = torch.tanh(torch.randn(X2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(80):
        opt.zero_grad()
        loss = F.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    fast = specfx.optimize(model, (x,), policy="always", spectral_activation="poly")
    assert [a.error for a in fast.specfx_report.chains[0].activations] == [0.0, 0.0]
    assert_scaled_close(fast(x), model(x))


def test_poly_reports_its_true_error_on_a_relu_network():
    torch.manual_seed(0)
    model, x = Pair(act=nn.ReLU(), c=4), torch.randn(4, 4, 10, 10)
    fast = specfx.optimize(model, (x,), policy="always", spectral_activation="poly")
    report = fast.specfx_report
    [act] = report.chains[0].activations
    assert act.mode == "poly" and act.activation == "relu"
    # the whole output's error, measured independently
    measured = scaled_error(fast(x), model(x))
    assert report.output_error == pytest.approx(measured, rel=1e-6)
    assert 1e-3 < measured < 1.0
    # the activation's own error: the fitted polynomial on the true pre-activation values
    u = model.c1(x).detach().double()
    coeffs = torch.tensor(act.coefficients, dtype=torch.float64)
    fitted = sum(coeffs[:, i].reshape(1, -1, 1, 1) * u ** i for i in range(coeffs.shape[1]))
    own = ((fitted - F.relu(u)).abs().max() / F.relu(u).abs().max()).item()
    assert act.error == pytest.approx(own, rel=1e-9)
    assert "poly activations are approximate: output error" in str(report)
    assert "activation error" in str(report)
    assert report.chains[0].cost.poly_ms is not None


def test_poly_is_offered_to_auto_only_where_it_pays():
    model, x = Pair(act=nn.ReLU(), k=9, c=4), torch.randn(2, 4, 24, 24)
    report = specfx.optimize(model, (x,), spectral_activation="poly").specfx_report
    for chain in report.chains:
        assert all(a.mode == "exact" for a in chain.activations)


# --- idempotence and other front ends -------------------------------------------------------

def test_second_optimize_of_a_causal_chain_keeps_the_graph():
    """The same ops in the same order; a kept node after erased ones of the same kind (the
    last crop here) is renamed by the capture of the optimized module, as fx names nodes
    afresh, in order."""
    model, x = Causal(), torch.randn(X1)
    fast = specfx.optimize(model, (x,), policy="always")
    again = specfx.optimize(fast, (x,), policy="always")

    def ops(gm):
        return [(n.op, str(n.target), len(n.users)) for n in gm.graph.nodes]

    assert ops(again) == ops(fast)
    assert not any(p.modified for p in again.specfx_report.passes)
    assert torch.equal(again(x), fast(x))


@pytest.mark.parametrize("kwargs", [{}, {"spectral_activation": "poly"}])
def test_second_optimize_changes_nothing(kwargs):
    model, x = _eval(Residual()), torch.randn(X2)
    fast = specfx.optimize(model, (x,), policy="always", **kwargs)
    again = specfx.optimize(fast, (x,), policy="always", **kwargs)
    assert again.code == fast.code
    assert not any(p.modified for p in again.specfx_report.passes)
    assert again.specfx_report.chains == []
    # (the key order follows the captured graph's first use of each module, as without chains)
    assert list(again.state_dict()) == list(fast.state_dict())
    assert set(fast.state_dict()) == set(model.state_dict())
    assert torch.equal(again(x), fast(x))


def test_torch_compile_backend_fuses_chains():
    torch._dynamo.reset()
    model, x = _eval(Residual()), torch.randn(X2)
    compiled = torch.compile(model, backend="specfx", options={"policy": "always", "spectral_activation": "poly"})
    assert_scaled_close(compiled(x), model(x))
    report = specfx.compiled_reports()[-1]
    chain = report.chains[0]
    assert chain.fused and "no real example inputs" in chain.reason
    assert report.transforms == {"forward": 3, "inverse": 3}


def test_fused_chain_exports_and_runs():
    model, x = _eval(Residual()), torch.randn(X2)
    fast = specfx.optimize(model, (x,), policy="always", spectral_activation="poly")
    exported = torch.export.export(fast, (x,))
    targets = {n.target for n in exported.graph.nodes}
    assert OPS.poly_activation.default in targets and OPS.spectral_add.default in targets
    assert_scaled_close(exported.module()(x), fast(x))
