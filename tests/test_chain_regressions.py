"""Regressions of fused chains against eager PyTorch.

- A lowered conv outside a chain that feeds the chain's first conv and an op inside it
  (a residual add): the chain's ops read the conv's lowered output, which lowering put
  where the conv was (the chain's plan names the conv node, gone by then). A minimal
  repro, and a family of graphs around it drawn by hypothesis.
- Training mode after a fused conv -> BatchNorm -> ReLU -> conv chain: the chain runs its
  original ops, so outputs, running statistics and gradients are the original module's
  bit for bit, and eval mode afterwards is the fused chain again.
- In-place ops inside chains: a write the rest of the program sees (through the written
  tensor, or a view of it) is not lost on a spectrum the chain kept.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx

DTYPE = torch.float64


def _optimize(model: nn.Module, x: torch.Tensor, **kwargs) -> torch.fx.GraphModule:
    return specfx.optimize(model, (x,), policy="always", **kwargs)


def _fused(fast: torch.fx.GraphModule) -> list[bool]:
    return [c.fused for c in fast.specfx_report.chains]


def _assert_matches_eager(model: nn.Module, fast: torch.fx.GraphModule, x: torch.Tensor) -> None:
    """Outputs equal to eager's, on inputs of their own (a forward may write into its input)."""
    torch.testing.assert_close(fast(x.clone()), model(x.clone()))


# --- a lowered conv feeding a chain's entry and an op inside it ----------------------------

class StridedFeeder(nn.Module):
    """``y = b(x); return d(c(y) + y)`` with ``b`` a 2x2 stride-2 conv: ``b`` ends no chain
    (stride 2), ``c -> add -> d`` is one, and reads ``y`` twice."""

    def __init__(self, c: int = 3, k: int = 5):
        super().__init__()
        self.b = nn.Conv2d(c, c, 2, stride=2)
        self.c = nn.Conv2d(c, c, k, padding=k // 2)
        self.d = nn.Conv2d(c, c, k, padding=k // 2)

    def forward(self, x):
        y = self.b(x)
        return self.d(self.c(y) + y)


def test_strided_conv_feeding_chain_entry_and_residual():
    torch.manual_seed(0)
    model, x = StridedFeeder().to(DTYPE).eval(), torch.randn(2, 3, 20, 20, dtype=DTYPE)
    fast = _optimize(model, x)
    assert True in _fused(fast), str(fast.specfx_report)
    _assert_matches_eager(model, fast, x)
    # ``y`` is transformed once, for both its readers in the chain
    targets = [n.target for n in fast.graph.nodes]
    assert targets.count(torch.ops.specfx.to_spectrum.default) == 1, fast.code


FEEDERS = {
    "strided": lambda c: nn.Conv2d(c, c, 2, stride=2),  # ends a chain, continues none
    "reflect": lambda c: nn.Conv2d(c, c, 5, padding=2, padding_mode="reflect"),  # padded spatially: no anchor
    "same": lambda c: nn.Conv2d(c, c, 5, padding=2),  # an anchor of the chain itself
    "none": lambda c: nn.Identity(),
}
ACTS = {"identity": nn.Identity, "relu": nn.ReLU, "gelu": nn.GELU}


class Family(nn.Module):
    """A feeder conv ``b`` whose output ``y`` enters a chain ``c -> [act] -> d``, is added
    back inside it (before or after the activation, on either side of the add), and is
    read again after it: by a second chain ``e(f(.) + y)``, by the output, by a re-join
    with the first chain's output."""

    def __init__(self, cfg: dict):
        super().__init__()
        c, k = cfg["channels"], cfg["k"]
        self.cfg = cfg
        self.b = FEEDERS[cfg["feeder"]](c)
        self.c, self.d, self.e, self.f = (nn.Conv2d(c, c, k, padding=k // 2) for _ in range(4))
        self.act = ACTS[cfg["act"]]()

    def forward(self, x):
        cfg = self.cfg
        y = self.b(x)
        h = self.c(y)
        if cfg["residual"] == "before_act":
            h = h + y if cfg["y_second"] else y + h
        h = self.act(h)
        if cfg["residual"] == "after_act":
            h = h + y if cfg["y_second"] else y + h
        out = self.d(h)
        outputs = [out]
        if cfg["second_chain"]:
            outputs.append(self.e(self.f(y) + y))
        if cfg["rejoin"]:
            outputs[0] = out + y
        if cfg["y_output"]:
            outputs.append(y)
        return tuple(outputs)


@st.composite
def family_configs(draw):
    return dict(feeder=draw(st.sampled_from(sorted(FEEDERS))), act=draw(st.sampled_from(sorted(ACTS))),
                residual=draw(st.sampled_from(["before_act", "after_act"])), y_second=draw(st.booleans()),
                second_chain=draw(st.booleans()), rejoin=draw(st.booleans()), y_output=draw(st.booleans()),
                channels=draw(st.integers(1, 3)), k=draw(st.sampled_from([3, 5])),
                size=draw(st.sampled_from([8, 12])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=30, deadline=None)
@given(cfg=family_configs())
def test_generated_graphs_around_a_lowered_feeder_match_eager(cfg):
    torch.manual_seed(cfg["seed"])
    model = Family(cfg).to(DTYPE).eval()
    x = torch.randn(2, cfg["channels"], cfg["size"], cfg["size"], dtype=DTYPE)
    fast = _optimize(model, x)
    assert True in _fused(fast), str(fast.specfx_report)
    _assert_matches_eager(model, fast, x)


# --- training mode after a chain with a BatchNorm ----------------------------------------------

class ConvBnReluConv(nn.Sequential):
    def __init__(self, c: int = 3, k: int = 5):
        super().__init__(nn.Conv2d(c, 4, k, padding=k // 2), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.Conv2d(4, c, k, padding=k // 2))


class ReadInBetween(nn.Module):
    """The chain's values are read between its ops: ``z`` by the output and by a
    per-channel gate ``g`` that the chain's next op multiplies by (so the chain's original
    ops must run in two stages: ``g`` needs ``z``), and ``y`` by a re-join."""

    def __init__(self, c: int = 3, k: int = 5):
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(c, c, k, padding=k // 2), nn.Conv2d(c, c, k, padding=k // 2)
        self.bn = nn.BatchNorm2d(c)

    def forward(self, x):
        y = self.c1(x)
        z = F.relu(self.bn(y))
        g = torch.sigmoid(z.mean(dim=(0, 2, 3), keepdim=True))
        return self.c2(z * g) + y, z


def _with_statistics(model: nn.Module) -> nn.Module:
    torch.manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    return model.eval()


def _as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


@pytest.mark.parametrize("factory", [ConvBnReluConv, ReadInBetween], ids=["sequential", "read_in_between"])
def test_training_mode_runs_the_original_ops(factory):
    torch.manual_seed(0)
    model = _with_statistics(factory())
    x = torch.randn(2, 3, 10, 10)
    fast = specfx.optimize(model, (x,), policy="always")
    assert _fused(fast) == [True], str(fast.specfx_report)
    reference = copy.deepcopy(model)
    fast.train()
    reference.train()
    for step in range(3):
        xs = torch.randn(2, 3, 10, 10)
        x_fast, x_ref = xs.clone().requires_grad_(), xs.clone().requires_grad_()
        out_fast, out_ref = _as_tuple(fast(x_fast)), _as_tuple(reference(x_ref))
        for a, e in zip(out_fast, out_ref):
            assert torch.equal(a, e)
        sum(o.square().sum() for o in out_fast).backward()
        sum(o.square().sum() for o in out_ref).backward()
        # (the same terms; where a value has several readers, autograd sums them in an order of its own)
        torch.testing.assert_close(x_fast.grad, x_ref.grad)
        state, expected = fast.state_dict(), reference.state_dict()
        assert set(state) == set(expected)  # (in the order of first use in the captured graph)
        for key, value in expected.items():
            assert torch.equal(state[key], value), key
        assert int(state[next(k for k in state if k.endswith("num_batches_tracked"))]) == step + 1
    params = dict(fast.named_parameters())
    for name, p in reference.named_parameters():
        torch.testing.assert_close(params[name].grad, p.grad)
    # back in eval mode: the fused chain, with the statistics training left
    fast.eval()
    reference.eval()
    for a, e in zip(_as_tuple(fast(x)), _as_tuple(reference(x))):
        torch.testing.assert_close(a, e)


def test_frozen_batch_norm_keeps_the_fused_chain_in_training_mode():
    """A BatchNorm left in eval mode while the model trains is still an affine map: the
    chain stays fused (the original ops do not run: no direct convolution)."""
    torch.manual_seed(0)
    model = _with_statistics(ConvBnReluConv())
    x = torch.randn(2, 3, 10, 10)
    fast = specfx.optimize(model, (x,), policy="always")
    fast.train()
    fast.get_submodule("1").eval()
    before = {k: v.clone() for k, v in fast.state_dict().items()}
    with torch.autograd.profiler.profile() as prof:
        out = fast(x)
    assert not any("conv" in e.name and "fft" not in e.name for e in prof.function_events)
    torch.testing.assert_close(out, model(x))
    for key, value in fast.state_dict().items():
        assert torch.equal(value, before[key]), key


# --- in-place ops between convs --------------------------------------------------------------

class InPlace(nn.Module):
    """``c1 -> (in-place op) -> c2`` in one of several forms."""

    def __init__(self, form: str, c: int = 3, k: int = 5):
        super().__init__()
        self.form = form
        self.c1, self.c2 = nn.Conv2d(c, c, k, padding=k // 2), nn.Conv2d(c, c, k, padding=k // 2)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x):
        form, y = self.form, self.c1(x)
        # the in-place op's result unused: the conv reads the written tensor
        if form == "functional_discarded":
            F.relu(y, inplace=True)
            return self.c2(y)
        if form == "method_discarded":
            y.relu_()
            return self.c2(y)
        if form == "module_discarded":
            self.relu(y)
            return self.c2(y)
        if form == "torch_discarded":
            torch.relu_(y)
            return self.c2(y)
        # a write into a view of the tensor the conv reads
        if form == "view_written":
            torch.relu_(y[..., :4])
            return self.c2(y)
        # a write the chain's activation reads after
        if form == "scaled_before_act":
            y.mul_(2.0)
            return self.c2(torch.relu(y))
        # a graph input written between two of the chain's reads of it
        if form == "input_written":
            h = torch.relu(y)
            x.add_(1.0)
            return self.c2(h + x)
        # the input of the in-place op also read elsewhere (a residual)
        if form == "functional_residual":
            return self.c2(F.relu(y, inplace=True)) + y
        if form == "module_residual":
            return self.c2(self.relu(y)) + y
        raise ValueError(form)


WRITES_SEEN_ELSEWHERE = ["functional_discarded", "method_discarded", "module_discarded", "torch_discarded",
                         "view_written", "scaled_before_act", "input_written", "functional_residual",
                         "module_residual"]


@pytest.mark.parametrize("form", WRITES_SEEN_ELSEWHERE)
def test_in_place_writes_seen_elsewhere_match_eager(form):
    torch.manual_seed(0)
    model, x = InPlace(form).to(DTYPE).eval(), torch.randn(2, 3, 10, 10, dtype=DTYPE)
    fast = _optimize(model, x)
    _assert_matches_eager(model, fast, x)


@pytest.mark.parametrize("activation", [lambda y: F.relu(y, inplace=True), torch.relu_, lambda y: y.relu_(),
                                        nn.ReLU(inplace=True)], ids=["functional", "torch", "method", "module"])
def test_in_place_activation_read_by_the_chain_only_is_fused(activation):
    """An in-place activation whose input nothing else reads is just an activation."""

    class Chain(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(3, 3, 5, padding=2), nn.Conv2d(3, 3, 5, padding=2)
            self.act = activation if isinstance(activation, nn.Module) else nn.Identity()

        def forward(self, x):
            y = self.c1(x)
            return self.c2(self.act(y) if isinstance(activation, nn.Module) else activation(y))

    torch.manual_seed(0)
    model, x = Chain().to(DTYPE).eval(), torch.randn(2, 3, 10, 10, dtype=DTYPE)
    fast = _optimize(model, x)
    assert _fused(fast) == [True], str(fast.specfx_report)
    assert torch.ops.specfx.spectral_activation.default in {n.target for n in fast.graph.nodes}
    _assert_matches_eager(model, fast, x)


def test_conv_whose_result_is_unused_ends_no_chain():
    """A conv nothing reads is removed before planning: a chain planned through it would
    name lowered ops that the cleanup after lowering had deleted."""

    class DeadEnd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1 = nn.Conv1d(2, 2, 5, padding=2)
            self.c2 = nn.Conv1d(2, 2, 5, padding=2)

        def forward(self, x):
            y = self.c1(x)
            self.c2(F.relu(y))
            return y

    model, x = DeadEnd().eval(), torch.randn(1, 2, 16)
    fast = specfx.optimize(model, (x,), policy="always")
    assert fast.specfx_report.lowered == ["c1"]
    torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-5)
