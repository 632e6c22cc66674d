"""One chain's decision: the grid and min-cut labelling it runs with (the cheaper exact
one of :func:`.placement.grids`), whether it is fused, and what the report says about it
(:class:`~specfx.report.ChainDecision`), with its :class:`.plan.ChainPlan` when fused.

``policy="always"`` fuses every chain, every op that can be spectral made spectral.
``"auto"`` (and ``"measure"``, which times single convs, not chains) fuses a chain where
its min-cut cost beats lowering each conv on its own grid with the ops between them
spatial; where the two estimates are too close to call, ``time_chains`` times both and
may overturn that (hence the decision either way). The activation mode: ``spectral_activation="exact"`` uses exact spectral
activations only; ``"poly"`` makes every activation with a fit (:mod:`.fits`) poly under
``"always"``, and under ``"auto"`` offers poly to the min-cut per activation next to exact,
so it is used only where estimated cheaper.

fx-facing (it names the graph's nodes and copies a modal chain's original ops): it may
import :mod:`.chain`, :mod:`.placement`, :mod:`.plan`, :mod:`.recognize`, the cost model,
node meta and the report, never the passes or :mod:`.members` (it is handed the chain).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

import networkx as nx
import torch
import torch.fx as fx

from specfx import cost_model as cm
from specfx import node_meta
from specfx.report import ChainDecision, SpectralActivationRecord

from .chain import Chain
from .placement import Placement, grids
from .plan import ChainPlan, PolyPlan, original_region
from .recognize import ChainOp, OpKind, rows_and_size

if TYPE_CHECKING:
    from specfx.pipeline import Settings


def _describe_ops(chain: Chain, ops: dict[str, ChainOp], labels: Optional[dict[str, str]], modes: dict[str, str],
                  masks: list[tuple[str, str]]) -> list[str]:
    """The report's line per op between the anchors (where it runs), then per mask."""
    out = []
    for n in chain.comp:
        if chain.members[n].anchor:
            continue
        where = "spatial"
        if labels is not None and labels[n] == "F":
            where = {"exact": "exact spectral activation", "poly": "poly spectral activation"}.get(
                modes.get(n), "frequency domain")
        out.append(f"{n} ({ops[n].label}: {where})")
    for consumer, operand in masks:
        out.append(f"mask of {operand} before {consumer} (identity spectral activation)")
    return out


def decide(gm: fx.GraphModule, settings: Settings, frontend: str, chain: Chain, ops: dict[str, ChainOp],
           nodes: dict[str, fx.Node], fits: dict[str, PolyPlan], poly_note: str, name: str,
           written: set[str]) -> tuple[ChainDecision, Optional[ChainPlan], Optional[ChainDecision]]:
    """The decision for the chain ``name``; its plan wherever it can be fused; and, under
    ``policy="auto"``, the decision the other way (fused where the first keeps it, kept
    where it fuses), for the close calls that timing settles (:mod:`specfx.close_calls`).
    ``fits``: the poly activations on offer (:func:`.fits.fit_polys`), ``poly_note`` why
    some are missing; ``written``: :func:`.writes.observed_writes`; ``frontend``: the
    report's (a Dynamo graph's fused chain makes its constants in the graph, on the
    chain's device)."""
    comp, members = chain.comp, chain.members
    anchors = [n for n in comp if members[n].anchor]
    conv_names = [nodes[n].meta[node_meta.PLAN].name for n in anchors]
    dtypes = {rows_and_size(nodes[n], chain.rank)[3] for n in comp}
    # 1x1 convs without padding read only the data: they fit either kind of chain
    circular = {members[n].circular for n in comp if members[n].kind.windowed and not members[n].pointwise}
    padding = "circular" if circular == {True} else "zeros"

    def kept(reason: str, labels=None, modes=None, masks=None, grid=None, cost=None) -> ChainDecision:
        described = _describe_ops(chain, ops, labels, modes or {}, masks or [])
        return ChainDecision(name, conv_names, described, False, reason, padding, grid, cost=cost)

    def refuse(reason: str, *args, **kwargs) -> tuple[ChainDecision, None, None]:
        return kept(reason, *args, **kwargs), None, None

    if len(dtypes) != 1:
        return refuse("tensors of different dtypes")
    if len(circular) > 1:
        return refuse("mixes circular and zero-padded convs (their grids differ)")
    if padding == "circular" and any(members[n].kind in (OpKind.POOL, OpKind.CROP) for n in comp):
        return refuse("a crop or pooling inside a circular chain changes the period")
    dtype = dtypes.pop()
    if padding == "circular":
        periodic = [a for a in anchors if not members[a].pointwise]
        grid = members[periodic[0]].own_grid
        if any(members[a].own_grid != grid for a in periodic) or \
                any(chain.rows_and_size(n)[1] != grid for n in comp if members[n].continues):
            return refuse("circular convs of different sizes, or whose output size differs from the input's")
    placement = Placement(chain, dtype.itemsize, settings.profile, settings.spectral_activation, settings.policy,
                          {n: fit.coeffs.shape[1] - 1 for n, fit in fits.items()})
    always = settings.policy == "always"
    candidates = []
    for grid in grids(chain, padding == "circular"):
        try:
            candidates.append(placement.solve(grid, always))
        except nx.NetworkXUnbounded:
            continue
    valid = [c for c in candidates if c.ok]
    if not valid:
        return refuse(f"not exact: {candidates[0].reason if candidates else 'no labelling'}")
    best = min(valid, key=lambda c: c.cost_ms)
    per_conv_ms, per_conv_t = placement.per_conv(best.grid)
    uses_poly = any(md == "poly" for md in best.modes.values())
    cost = cm.ChainCost(per_conv_ms, best.exact_ms, best.cost_ms if uses_poly else None)
    spectral_ops = [n for n in comp if not members[n].anchor and best.labels[n] == "F"]
    if not any(best.labels.get(i) == "F" for n in anchors for i in members[n].inputs):
        return refuse("the min-cut places no conv input in the frequency domain: nothing to fuse",
                      best.labels, best.modes, None, best.grid, cost)
    if always:
        reason, unfused = "policy='always'", None
    else:
        reason = f"fused: estimated {per_conv_ms / best.cost_ms:.2f}x faster than per-conv lowering"
        unfused = kept(f"fusing estimated slower ({best.cost_ms:.3g} ms vs {per_conv_ms:.3g} ms for per-conv "
                       "lowering)", best.labels, best.modes, best.masks, best.grid, cost)
    if poly_note:
        reason += f"; poly not used: {poly_note}"
    # A BatchNorm module is an affine map only in eval mode: in training mode the chain
    # runs its original ops (runtime.chain_outputs), which need a copy of them made now.
    modal = [str(nodes[n].target) for n in spectral_ops if ops[n].bn is not None and nodes[n].op == "call_module"]
    if modal:
        reason += "; in training mode it runs its original ops (BatchNorm)"
    activations, poly_plans = [], {}
    for n in comp:
        if members[n].kind is not OpKind.ACTIVATION or best.labels[n] != "F":
            continue
        if best.modes.get(n, "exact") == "poly":
            fit = fits[n]
            poly_plans[n] = PolyPlan(fit.coeffs, best.poly_mask.get(n, False), fit.error)
            activations.append(SpectralActivationRecord(n, ops[n].activation, "poly", fit.error,
                                                        fit.coeffs.tolist(), poly_plans[n].mask_input))
        else:
            activations.append(SpectralActivationRecord(n, ops[n].activation, "exact"))
    for consumer, operand in best.masks:
        activations.append(SpectralActivationRecord(f"{operand}->{consumer}", "identity (mask)", "exact"))
    sizes = {n: chain.rows_and_size(n)[1] for n in comp if members[n].continues}
    sizes.update({i: chain.rows_and_size(i)[1] for i in chain.read_tensors()})
    plan = ChainPlan(name=name, grid=best.grid, rank=chain.rank, dtype=dtype, convs=anchors, spectral=spectral_ops,
                     modes={n: best.modes.get(n, "exact") for n in spectral_ops
                            if members[n].kind is OpKind.ACTIVATION},
                     poly=poly_plans, masks=list(best.masks), sizes=sizes, ops={n: ops[n] for n in spectral_ops},
                     inline_device=_device(nodes[anchors[0]]) if frontend == "dynamo" else None,
                     ends=frozenset(n for n in anchors if not members[n].continues),
                     written=frozenset(t for t in chain.read_tensors() if t in written),
                     modal=modal, original=original_region(gm, anchors + spectral_ops) if modal else None)
    eliminated = max(0, per_conv_t["forward"] - best.transforms["forward"])
    fused = ChainDecision(name, conv_names, _describe_ops(chain, ops, best.labels, best.modes, best.masks),
                          True, reason, padding, tuple(best.grid), eliminated, activations, cost,
                          best.transforms, per_conv_t)
    if unfused is not None and best.cost_ms >= per_conv_ms:
        return unfused, plan, fused
    return fused, plan, unfused


def _device(node: fx.Node) -> str:
    """The device of the tensor ``node`` makes, as its meta records it (CPU where none does)."""
    for key in ("example_value", "val"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return str(value.device)
    return "cpu"
