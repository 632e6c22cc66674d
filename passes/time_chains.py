"""Time the chains whose fusion ``find_chains`` estimated too close to call, and keep
the faster way.

Analysis only: the graph is unchanged. Each close chain (``ctx.close_chains``) is cut
out of the graph as a module of its own (its nodes; the tensors it reads from outside
become inputs, random ones of their recorded shape and dtype), rewritten twice by the
same passes the pipeline runs next — each conv lowered on its own, and fused — and the
two are timed side by side (:mod:`specfx.close_calls`, within the run's budget, cached
on disk per machine). Where the timing disagrees with the estimate, the report's
decision and ``ctx.chain_plans`` change to the faster way.
"""

from __future__ import annotations

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from specfx.canonical import tensor_info
from specfx.chains.plan import ChainPlan, CloseChain
from specfx.pipeline import PassContext, cleanup
from specfx.report import Report
from specfx.timing_cache import Timing

from .find_chains import count_fused_transforms, fusion_speedup
from .fuse_chains import fuse_chains
from .lower_convs import lower_convs
from .merge_convs import merge_convs


def _region(gm: fx.GraphModule, names: tuple[str, ...]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The nodes ``names`` as a module of their own (sharing ``gm``'s parameters and
    submodules), and the nodes of ``gm`` whose values it takes as inputs, in order. Its
    outputs are the values read outside the region."""
    inside = set(names)
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    inputs: list[fx.Node] = []

    def operand(node: fx.Node) -> fx.Node:
        if node not in env:
            if node.op == "get_attr":
                env[node] = graph.node_copy(node)
            else:
                inputs.append(node)
                # Under its own name: the chain's plan names the tensors it reads.
                env[node] = graph.placeholder(node.name)
        return env[node]

    outputs = []
    for node in gm.graph.nodes:
        if node.name not in inside:
            continue
        for arg in node.all_input_nodes:
            operand(arg)
        env[node] = graph.node_copy(node, lambda n: env[n])
        if any(user.name not in inside for user in node.users):
            outputs.append(env[node])
    graph.output(tuple(outputs))
    return fx.GraphModule(gm, graph), inputs


def _example(node: fx.Node, device: torch.device) -> torch.Tensor:
    """A random tensor shaped as ``node``'s recorded value, from a generator of its own."""
    info = tensor_info(node)
    if info is None or not all(isinstance(d, int) for d in info[0]):
        raise ValueError(f"{node.name} has no concrete tensor shape")
    shape, dtype = info
    generator = torch.Generator(device).manual_seed(0)
    if dtype.is_floating_point:
        return torch.randn(tuple(shape), dtype=dtype, device=device, generator=generator)
    return torch.zeros(tuple(shape), dtype=dtype, device=device)


def _rewritten(region: fx.GraphModule, ctx: PassContext, plans: list[ChainPlan]) -> fx.GraphModule:
    """``region`` through the pipeline's rewrite passes, with ``plans`` fused."""
    scratch = PassContext(ctx.settings, Report(frontend=ctx.report.frontend, policy=ctx.settings.policy),
                          chain_plans=plans, measurements=ctx.measurements)
    for rewrite in (lower_convs, fuse_chains, merge_convs):
        result = rewrite(region, scratch)
        region = result.graph_module
        if result.modified:
            cleanup(region)
    return region


def _device(nodes: list[fx.Node]) -> torch.device:
    for node in nodes:
        val = node.meta.get("val", node.meta.get("example_value"))
        if isinstance(val, torch.Tensor) and val.device.type != "meta":
            return val.device
    return torch.device("cpu")


def _signature(region: fx.GraphModule, examples: list[torch.Tensor], plan: ChainPlan) -> str:
    """What the chain's two times depend on: the timing cache's key."""
    tensors = [(name, tuple(t.shape), t.dtype) for name, t in (*region.named_parameters(), *region.named_buffers())]
    return (f"chain {region.code.strip()} inputs={[(tuple(x.shape), x.dtype) for x in examples]} "
            f"tensors={tensors} grid={plan.grid} spectral={plan.spectral} modes={sorted(plan.modes.items())} "
            f"masks={plan.masks}")


def _decide(gm: fx.GraphModule, ctx: PassContext, close: CloseChain) -> None:
    report = ctx.report
    region, inputs = _region(gm, close.nodes)
    device = _device(inputs)
    try:
        examples = [_example(node, device) for node in inputs]
    except ValueError as err:
        close.chosen.reason += f"; a close call left to the estimate (cannot be timed on its own: {err})"
        return

    def make():
        # Each rewrite gets its own copy of the graph; both share gm's parameters, so
        # the spectra timing computes are the ones the optimized module reads.
        per_conv = _rewritten(_region(gm, close.nodes)[0], ctx, [])
        fused = _rewritten(_region(gm, close.nodes)[0], ctx, [close.plan])
        return (lambda: per_conv(*examples)), (lambda: fused(*examples))

    cost = close.chosen.cost
    try:
        timed = ctx.measurements.timing(_signature(region, examples, close.plan), close.chosen.name, device, make,
                                        cost.per_conv_ms + min(cost.fused_ms, cost.poly_ms or cost.fused_ms))
    except Exception as err:  # the estimate stands; the report says why it was not checked
        close.chosen.reason += (f"; a close call left to the estimate (running it on its own failed: "
                                f"{type(err).__name__}: {err})")
        return
    if timed is None:
        close.chosen.reason += "; a close call left to the estimate (timing budget spent)"
        return
    timing, source = timed
    fuse = timing.speedup > 1
    chosen = close.chosen if close.chosen.fused == fuse else close.other
    chosen.reason = _reason(fuse, timing, source, fusion_speedup(close.chosen.cost), chosen.reason)
    if chosen is not close.chosen:
        report.chains[close.index] = chosen
        if fuse:
            ctx.chain_plans.append(close.plan)
        else:
            ctx.chain_plans.remove(close.plan)
        count_fused_transforms(report, chosen if fuse else close.chosen, +1 if fuse else -1)


def _reason(fuse: bool, timing: Timing, source: str, estimated: float, estimate_reason: str) -> str:
    """The measured verdict, keeping the notes after the estimate's verdict (poly not
    used, BatchNorm in training mode)."""
    times = f"{timing.candidate_ms:.3g} ms fused vs {timing.baseline_ms:.3g} ms per-conv, {source}"
    verdict = (f"fused: measured {timing.speedup:.2f}x faster than per-conv lowering" if fuse
               else "fusing measured slower than per-conv lowering")
    notes = estimate_reason.partition("; ")[2]
    return f"{verdict} ({times}; estimated {estimated:.2f}x, a close call)" + (f"; {notes}" if notes else "")


def time_chains(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Settle ``ctx.close_chains`` by timing, into ``ctx.report`` and ``ctx.chain_plans``."""
    for close in ctx.close_chains:
        _decide(gm, ctx, close)
    return PassResult(gm, False)
