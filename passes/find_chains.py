"""Find chains of convolutions that can stay in the frequency domain, and decide which to
fuse.

Analysis only (it runs in :func:`specfx.explain` too): the graph is unchanged. The report
gets a :class:`~specfx.report.ChainDecision` per chain; a fused chain's
:class:`~specfx.chains.plan.ChainPlan` goes on ``ctx.chain_plans``, where ``lower_convs``
(which lowers its convs onto the chain's grid) and ``fuse_chains`` read it.

Per spatial rank of the lowered convs, the pass runs the steps of :mod:`specfx.chains`:

1. the values in-place writes can be observed through (:func:`specfx.chains.writes.
   observed_writes`): they do not continue a chain, and an in-place op whose write is seen
   elsewhere is not chainable;
2. the members, anchors and chainable ops, and the chains, their connected components
   (:mod:`specfx.chains.members`);
3. with ``spectral_activation="poly"`` (opt-in, approximate unless the activation is a
   polynomial), the chains' activations fitted on the example inputs
   (:mod:`specfx.chains.fits`); the report states each fit's error;
4. per chain, its grids, min-cut placement and exactness (:mod:`specfx.chains.placement`,
   :mod:`specfx.chains.support`) and the decision (:mod:`specfx.chains.decide`); a chain
   whose fusion is estimated too close to call goes on ``ctx.close_chains``, for
   ``time_chains`` to time.
"""

from __future__ import annotations

import math

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from specfx import node_meta
from specfx.canonical import conv_site
from specfx.close_calls import CHAIN_BAND, is_close
from specfx.cost_model import ChainCost
from specfx.chains.decide import decide
from specfx.chains.fits import fit_polys
from specfx.chains.members import build_digraph, chain_members, chain_of, components
from specfx.chains.plan import CloseChain
from specfx.chains.recognize import OpKind
from specfx.chains.writes import observed_writes
from specfx.pipeline import PassContext
from specfx.report import ChainDecision, Report


def find_chains(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Decide every chain of ``gm`` into ``ctx.report``, and plan the fused ones on ``ctx.chain_plans``."""
    report, settings = ctx.report, ctx.settings
    lowered = [n for n in gm.graph.nodes if (p := n.meta.get(node_meta.PLAN)) is not None and p.lowered]
    report.transforms_per_conv = {"forward": len(lowered), "inverse": len(lowered)}
    report.transforms = dict(report.transforms_per_conv)
    if not settings.chains or settings.policy == "never" or not lowered:
        return PassResult(gm, False)
    graph = build_digraph(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    order = {name: k for k, name in enumerate(nodes)}
    count = 0
    for rank in sorted({conv_site(gm, n).rank for n in lowered}):
        written = observed_writes(gm, rank)
        members, ops = chain_members(gm, rank, written)
        comps = components(order, members, graph)
        acts = {n: ops[n] for c in comps for n in c if members[n].kind is OpKind.ACTIVATION} \
            if settings.spectral_activation == "poly" else {}
        fits, poly_note = fit_polys(gm, ctx.example_inputs, settings.poly_degree, acts, members, rank)
        for comp in comps:
            chain = chain_of(comp, members, ops, nodes, rank)
            decision, plan, other = decide(gm, settings, report.frontend, chain, ops, nodes, fits, poly_note,
                                           f"chain{count}", written)
            count += 1
            report.chains.append(decision)
            if decision.fused:
                ctx.chain_plans.append(plan)
                count_fused_transforms(report, decision, +1)
            if other is not None and is_close(fusion_speedup(decision.cost), CHAIN_BAND):
                ctx.close_chains.append(CloseChain(len(report.chains) - 1, plan, decision, other,
                                                   tuple(chain.comp)))
    return PassResult(gm, False)


def fusion_speedup(cost: ChainCost) -> float:
    """Per-conv lowering's estimated time over the fused chain's."""
    fused_ms = cost.poly_ms if cost.poly_ms is not None else cost.fused_ms
    return cost.per_conv_ms / fused_ms if fused_ms > 0 else math.inf


def count_fused_transforms(report: Report, decision: ChainDecision, sign: int) -> None:
    """Add (``sign`` +1) or take back (-1) a fused chain's share of the report's transform
    totals, which start at per-conv lowering."""
    for key in ("forward", "inverse"):
        report.transforms[key] += sign * (decision.transforms[key] - decision.transforms_per_conv[key])
