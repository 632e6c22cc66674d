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
   :mod:`specfx.chains.support`) and the decision (:mod:`specfx.chains.decide`).
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from specfx import node_meta
from specfx.canonical import conv_site
from specfx.chains.decide import decide
from specfx.chains.fits import fit_polys
from specfx.chains.members import build_digraph, chain_members, chain_of, components
from specfx.chains.recognize import OpKind
from specfx.chains.writes import observed_writes
from specfx.pipeline import PassContext


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
            decision, plan = decide(gm, settings, report.frontend, chain, ops, nodes, fits, poly_note,
                                    f"chain{count}", written)
            count += 1
            report.chains.append(decision)
            if plan is not None:
                ctx.chain_plans.append(plan)
                # The report's totals start at per-conv lowering; a fused chain changes its share.
                for key in ("forward", "inverse"):
                    report.transforms[key] += decision.transforms[key] - decision.transforms_per_conv[key]
    return PassResult(gm, False)
