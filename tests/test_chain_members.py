"""Chains read off fx graphs (specfx.chains.members) and the poly fits recorded on the
example inputs (specfx.chains.fits), on graphs ``plan_convs`` has planned."""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode

import specfx
from specfx.chains.fits import fit_polys
from specfx.chains.members import build_digraph, chain_members, chain_of, components
from specfx.chains.recognize import OpKind
from specfx.chains.writes import observed_writes
from specfx.passes import PIPELINE
from specfx.pipeline import PassContext, Settings, run_pipeline
from specfx.report import Report

X = (2, 3, 10, 10)


class ConvActConv(nn.Module):
    """conv → act → conv, then an activation after the chain and a strided conv."""

    def __init__(self, act: nn.Module, last_padding: int = 2) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 3, 5, padding=2), nn.Conv2d(3, 3, 5, padding=2)
        self.c3 = nn.Conv2d(3, 3, 5, stride=2, padding=last_padding)
        self.act = act

    def forward(self, x):
        return self.c3(torch.relu(self.c2(self.act(self.c1(x)))))


class Cropped(nn.Module):
    """A causal 1D conv whose output is read only through its crop."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv1d(3, 3, 7, padding=6), nn.Conv1d(3, 3, 7, padding=6)

    def forward(self, x):
        return self.c2(self.c1(x)[..., :24])[..., :24]


def _planned(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    gm = specfx.capture.capture(model.eval(), (x,), "symbolic_trace")[0]
    ctx = PassContext(Settings(policy="always"), Report(frontend="symbolic_trace", policy="always"), (x,))
    run_pipeline(gm, ctx, PIPELINE[:1], analysis_only=True)
    return gm


def _members(gm: fx.GraphModule, rank: int):
    return chain_members(gm, rank, observed_writes(gm, rank))


def _components(gm: fx.GraphModule, members) -> list[list[str]]:
    order = {n.name: k for k, n in enumerate(gm.graph.nodes)}
    return components(order, members, build_digraph(gm))


def test_digraph_records_each_read_of_an_operand():
    gm = fx.symbolic_trace(lambda x: x * x)
    assert build_digraph(gm).edges["x", "mul"]["positions"] == ["args[0]", "args[1]"]


def test_members_are_the_anchors_and_the_chainable_ops():
    gm = _planned(ConvActConv(nn.GELU()), torch.randn(X))
    members, ops = _members(gm, 2)
    assert {n for n, m in members.items() if m.anchor} == {"c1", "c2", "c3"}
    assert members["act"].kind is OpKind.ACTIVATION and ops["act"].activation == "gelu"
    assert members["c2"].continues and not members["c3"].continues  # a strided conv ends a chain
    assert not any(m.anchor for m in _members(gm, 1)[0].values())  # 2D convs anchor no 1D chain


def test_a_conv_that_reads_only_some_samples_anchors_no_chain():
    # Unpadded, stride 2: it never reads the last row and column, which its plan drops
    # before the transform; a chain's spectrum holds them.
    gm = _planned(ConvActConv(nn.GELU(), last_padding=0), torch.randn(X))
    members, _ = _members(gm, 2)
    assert {n for n, m in members.items() if m.anchor} == {"c1", "c2"}


def test_a_chain_holds_only_the_ops_between_its_anchors():
    gm = _planned(ConvActConv(nn.GELU()), torch.randn(X))
    members, _ = _members(gm, 2)
    # The relu after c2 leads to c3, so it is in; nothing after c3 is.
    assert _components(gm, members) == [["c1", "act", "c2", "relu", "c3"]]


def test_a_tensor_read_only_through_a_crop_needs_only_the_crop():
    gm = _planned(Cropped(), torch.randn(2, 3, 24))
    members, _ = _members(gm, 1)
    assert members["c1"].size_out == (30,) and members["c1"].needed == (24,)


def test_a_chain_knows_who_reads_its_tensors():
    gm = _planned(ConvActConv(nn.GELU()), torch.randn(X))
    members, ops = _members(gm, 2)
    nodes = {n.name: n for n in gm.graph.nodes}
    chain = chain_of(_components(gm, members)[0], members, ops, nodes, 2)
    assert chain.readers["c1"] == ("act",) and not chain.read_elsewhere["c1"]
    assert chain.readers["x"] == ("c1",)
    assert chain.rows_and_size("c3") == (6, (5, 5))


def test_the_square_is_fitted_exactly_without_inputs():
    gm = _planned(ConvActConv(nn.GELU()), torch.randn(X))
    members, ops = _members(gm, 2)
    square = dataclasses.replace(ops["act"], activation="square")
    fits, note = fit_polys(gm, None, 2, {"act": square}, members, 2)
    assert note == "" and fits["act"].error == 0.0 and fits["act"].coeffs[:, 2].eq(1).all()


def test_other_activations_are_fitted_on_the_recorded_inputs():
    x = torch.randn(X)
    gm = _planned(ConvActConv(nn.GELU()), x)
    members, ops = _members(gm, 2)
    fits, note = fit_polys(gm, (x,), 4, {"act": ops["act"]}, members, 2)
    assert note == "" and fits["act"].coeffs.shape == (3, 5) and 0 < fits["act"].error < 0.2
    with FakeTensorMode() as fake:
        fake_x = fake.from_tensor(x)
    fits, note = fit_polys(gm, (fake_x,), 4, {"act": ops["act"]}, members, 2)
    assert fits == {} and note.startswith("no real example inputs")
