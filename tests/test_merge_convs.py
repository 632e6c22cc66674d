"""passes/merge_convs.py: a lowered conv whose spectra only its own ops read becomes one
``lowered_conv`` node; spectra that anything else reads keep the three ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import specfx
from specfx.guards import CHECKS
from conftest import assert_scaled_close
from specfx.passes import merge_convs
from specfx.pipeline import PassContext, Settings
from specfx.report import Report

OPS = torch.ops.specfx


def _context() -> PassContext:
    return PassContext(Settings(), Report(frontend="symbolic_trace", policy="always"))


def _lowered_graph(share_input_spectrum: bool) -> fx.GraphModule:
    """``x → to_spectrum → spectral_mix → from_spectrum``; with ``share_input_spectrum`` a
    second conv reads the same input spectrum (as a chain's shared transform does)."""
    root = nn.Module()
    root.w1, root.w2 = nn.Parameter(torch.randn(4, 3, 5)), nn.Parameter(torch.randn(2, 3, 5))
    root.b1 = nn.Parameter(torch.randn(4))
    graph = fx.Graph()
    x = graph.placeholder("x")
    x_hat = graph.call_function(OPS.to_spectrum.default, (x, [16], [16]))

    def conv(weight: str, bias) -> fx.Node:
        y_hat = graph.call_function(OPS.spectral_mix.default, (x_hat, graph.get_attr(weight), [16], [1], [2], 1))
        return graph.call_function(OPS.from_spectrum.default, (y_hat, [16], [16], [1], bias, torch.float32))

    out = conv("w1", graph.get_attr("b1"))
    if share_input_spectrum:
        out = graph.call_function(torch.cat, ([out, conv("w2", None)], 1))
    graph.output(out)
    return fx.GraphModule(root, graph)


def _targets(gm: fx.GraphModule) -> list:
    """The calls of the graph, less the lowered convs' checks and their dtype reads."""
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target not in (*CHECKS, getattr)]


def test_a_lone_lowered_conv_becomes_one_node_computing_the_same():
    gm = _lowered_graph(share_input_spectrum=False)
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        expected = gm(x)
    result = merge_convs(gm, _context())
    assert result.modified
    result.graph_module.recompile()
    assert _targets(result.graph_module) == [OPS.lowered_conv.default]
    with torch.no_grad():
        assert_scaled_close(result.graph_module(x), expected)
    assert not merge_convs(result.graph_module, _context()).modified  # nothing left to merge


def test_a_spectrum_with_other_readers_keeps_the_three_ops():
    gm = _lowered_graph(share_input_spectrum=True)
    before = _targets(gm)
    assert not merge_convs(gm, _context()).modified
    assert _targets(gm) == before


def test_convs_in_a_fused_chain_are_not_merged_and_one_outside_is():
    model = nn.Sequential(nn.Conv1d(2, 4, 9, padding=4), nn.Tanh(),
                          nn.Conv1d(4, 4, 9), nn.ReLU(), nn.Conv1d(4, 3, 9)).eval()
    x = torch.randn(2, 2, 64)
    fast = specfx.optimize(model, (x,), policy="always")
    targets = _targets(fast)
    (chain,) = fast.specfx_report.chains
    assert chain.fused, str(fast.specfx_report)
    # conv 0 (before the tanh, which no spectrum can carry) stands alone; 2 and 4 are a chain.
    assert targets.count(OPS.lowered_conv.default) == 1
    assert targets.count(OPS.spectral_mix.default) == 2
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))


def test_merged_conv_trains_like_the_original():
    model = nn.Sequential(nn.Conv1d(3, 4, 33, padding=16), nn.Tanh()).double()
    x = torch.randn(2, 3, 80, dtype=torch.float64)
    fast = specfx.optimize(model, (x,), policy="always")
    assert OPS.lowered_conv.default in _targets(fast)
    reference = copy.deepcopy(model)
    xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
    fast(xs).square().sum().backward()
    reference(xr).square().sum().backward()
    assert_scaled_close(xs.grad, xr.grad)
    for name, p in reference.named_parameters():
        assert_scaled_close(fast.get_parameter(name).grad, p.grad)


class _Block(nn.Module):
    """``conv(tanh(x))``, plus ``tanh(x)`` again after the conv when ``residual``."""

    def __init__(self, residual: bool, padding_mode: str = "zeros"):
        super().__init__()
        self.residual = residual
        self.conv = nn.Conv2d(8, 8, 15, padding=7, padding_mode=padding_mode)

    def forward(self, x):
        t = torch.tanh(x)
        y = self.conv(t)
        return y + t if self.residual else y


@pytest.mark.parametrize("batch, residual, merged", [
    (1, False, True),     # the input (128 KiB) dies at the conv, but is small: held
    (16, False, False),   # 2 MiB dying at the conv: the three ops free it after the transform
    (16, True, True),     # 2 MiB read again after the conv: alive anyway
])
def test_a_conv_holds_its_input_only_where_that_costs_little(batch, residual, merged):
    model, x = _Block(residual).eval(), torch.randn(batch, 8, 64, 64)
    fast = specfx.optimize(model, (x,), policy="always")
    assert (OPS.lowered_conv.default in _targets(fast)) == merged
    assert (OPS.to_spectrum.default in _targets(fast)) != merged
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))


def test_graph_inputs_are_held_whatever_their_size():
    model, x = nn.Conv2d(8, 8, 15, padding=7).eval(), torch.randn(16, 8, 64, 64)
    assert _targets(specfx.optimize(model, (x,), policy="always")) == [OPS.lowered_conv.default]


@pytest.mark.parametrize("batch, merged", [(1, True), (16, False)])
def test_a_padded_copy_is_sized_from_what_it_pads(batch, merged):
    """A reflect-padded conv reads the copy ``F.pad`` makes in the lowered graph (no shape
    of its own there): 1 x 8 x 78 x 78 floats are held, 16 times that are not."""
    model, x = _Block(False, padding_mode="reflect").eval(), torch.randn(batch, 8, 64, 64)
    fast = specfx.optimize(model, (x,), policy="always")
    assert (OPS.lowered_conv.default in _targets(fast)) == merged
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))
