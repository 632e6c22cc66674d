"""Decide, per dense linear layer, whether :func:`specfx.structure` replaces it with a
structured layer (Kronecker or butterfly), and fit that layer.

Analysis only: the graph is unchanged. Each layer gets a :class:`StructuredLayerDecision`
in the report; a layer to replace gets a :class:`LayerPlan` (the fitted module) on the
meta of each node that calls it. A layer is replaced when it has at least
``min_features`` inputs and outputs, the structured layer has fewer parameters, and the
relative error of its outputs, on the inputs the layer received while the model ran on
the example inputs, is within ``max_error``. Without a fixed ``rank``, Kronecker ranks
are searched among those with fewer parameters and fewer FLOPs than the dense layer; a
fixed rank is taken as asked (its FLOPs are reported).

Layers are found as ``nn.Linear`` modules (``symbolic_trace``) and as ``F.linear`` /
``aten.linear`` calls on parameters (``export``), whose module is then replaced whole, so
it must hold nothing else. A weight shared with another module (tied) is left alone.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.fx.passes.infra.pass_base import PassResult

from specfx.capture import fresh_inputs, preserved_state
from specfx.nn.butterfly import ButterflyLinear
from specfx.nn.factors import TermGroup, balanced_split
from specfx.nn.kronecker import KroneckerLinear
from specfx.nn.layer_checks import relative_error
from specfx.nn.kronecker_ops import kronecker_svd, linear_flops
from specfx.nn.structure_plan import STRUCTURE_PLAN, LayerPlan, StructureOptions
from specfx.pipeline import PassContext, at_node
from specfx.report import StructuredLayerDecision

LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)

# A structured layer tried for a site: the module, its description for the report, its
# weight error and its output error on the recorded inputs.
Candidate = tuple[nn.Module, str, float, float]


@dataclasses.dataclass
class _Site:
    """One dense linear layer: its module path, the nodes that call it, its parameters,
    and why it cannot be replaced whatever the fit (``None`` if it can)."""

    path: str
    nodes: list[fx.Node]
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    refusal: Optional[str] = None


def _input_node(node: fx.Node) -> Any:
    return node.args[0] if node.args else node.kwargs.get("input")


def _operand(node: fx.Node, index: int, name: str) -> Any:
    return node.args[index] if len(node.args) > index else node.kwargs.get(name)


def _tied(gm: fx.GraphModule, path: str, tensor: torch.Tensor) -> Optional[str]:
    """Another name ``tensor`` has in the module tree outside ``path``, if any."""
    for name, param in gm.named_parameters(remove_duplicate=False):
        if param is tensor and not name.startswith(path + "."):
            return name
    return None


def _attribute(gm: fx.GraphModule, target: str) -> Any:
    """The object a ``get_attr`` target names (a parameter, buffer or constant)."""
    path, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(path), name)


def _function_site(gm: fx.GraphModule, node: fx.Node, sites: dict[str, _Site]) -> Optional[_Site]:
    """The site of an ``F.linear``/``aten.linear`` call whose weight is a parameter, or
    ``None`` (a weight computed in the graph, or a constant, is not a layer to structure;
    a second call of a known site joins it)."""
    weight_node, bias_node = _operand(node, 1, "weight"), _operand(node, 2, "bias")
    if not (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"):
        return None
    weight = _attribute(gm, str(weight_node.target))
    if not isinstance(weight, nn.Parameter):
        return None
    path = str(weight_node.target).rpartition(".")[0]
    if path in sites:
        sites[path].nodes.append(node)
        return None
    bias = _attribute(gm, str(bias_node.target)) if isinstance(bias_node, fx.Node) and bias_node.op == "get_attr" \
        else None
    site = _Site(path, [node], weight, bias if isinstance(bias, nn.Parameter) else None)
    if bias_node is not None and site.bias is None:
        site.refusal = "its bias is not a parameter of the layer"
    elif not path:
        site.refusal = "its weight belongs to the root module, which cannot be replaced"
    else:
        owner = gm.get_submodule(path)
        own = {name for name, _ in owner.named_parameters()} | {name for name, _ in owner.named_buffers()}
        if own - {"weight", "bias"} or (site.bias is None and "bias" in own):
            site.refusal = f"module {path!r} holds more than this layer's weight and bias"
    return site


def _sites(gm: fx.GraphModule) -> list[_Site]:
    """Every dense linear layer the graph calls, in graph order."""
    sites: dict[str, _Site] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(str(node.target)), nn.Linear):
            path = str(node.target)
            if path in sites:
                sites[path].nodes.append(node)
                continue
            module = gm.get_submodule(path)
            sites[path] = _Site(path, [node], module.weight, module.bias)
        elif node.op == "call_function" and node.target in LINEAR_FUNCTIONS:
            site = _function_site(gm, node, sites)
            if site is not None:
                sites[site.path] = site
    for site in sites.values():
        if site.refusal is not None:
            continue
        tensors = [t for t in (site.weight, site.bias) if t is not None]
        other = next(filter(None, (_tied(gm, site.path, t) for t in tensors)), None)
        if other is not None:
            site.refusal = f"its weight or bias is shared with {other!r} (tied): replacing it would untie them"
        elif any(_input_node(node) is None for node in site.nodes):
            site.refusal = "a call passes no input tensor"
    return list(sites.values())


class _InputRecorder(fx.Interpreter):
    """Runs the graph, keeping the input rows of the wanted linear calls."""

    def __init__(self, gm: fx.GraphModule, wanted: dict[fx.Node, _Site]) -> None:
        super().__init__(gm)
        self.wanted = wanted
        self.rows: dict[str, list[torch.Tensor]] = {}

    def run_node(self, n: fx.Node) -> Any:
        site = self.wanted.get(n)
        if site is not None:
            x = self.env[_input_node(n)]
            self.rows.setdefault(site.path, []).append(x.detach().reshape(-1, site.weight.shape[1]).clone())
        return super().run_node(n)


def _record_inputs(gm: fx.GraphModule, sites: list[_Site], example_inputs: tuple) -> dict[str, torch.Tensor]:
    wanted = {node: site for site in sites for node in site.nodes}
    recorder = _InputRecorder(gm, wanted)
    with preserved_state(gm), torch.no_grad():
        recorder.run(*fresh_inputs(example_inputs))
    return {path: torch.cat(rows) for path, rows in recorder.rows.items()}


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _output_error(module: nn.Module, rows: torch.Tensor, expected: torch.Tensor) -> float:
    with torch.no_grad():
        return relative_error(module(rows), expected)


def _kronecker_candidates(site: _Site, options: StructureOptions, rows: torch.Tensor,
                          expected: torch.Tensor) -> Iterator[Candidate]:
    """The candidate of each rank tried, smallest first, stopping at the first within
    ``max_error``."""
    out_features, in_features = site.weight.shape
    a = (balanced_split(out_features)[0], balanced_split(in_features)[0])
    b = (out_features // a[0], in_features // a[1])
    limit = min(a[0] * a[1], b[0] * b[1])
    if options.rank is not None:
        if options.rank > limit:
            raise ValueError(f"rank {options.rank} exceeds {limit}, the most terms of shapes {a} ⊗ {b}")
        ranks = [options.rank]
    else:
        # Ranks worth trying have fewer parameters and FLOPs per row than the dense layer.
        dense = out_features * in_features
        per_term = max(a[0] * a[1] + b[0] * b[1], linear_flops([TermGroup(a, b, 1)]) // 2)
        ranks = [1 << k for k in range(limit.bit_length()) if (1 << k) * per_term < dense]
    svd = kronecker_svd(site.weight, a, b)
    bias = None if site.bias is None else site.bias.detach()
    for rank in ranks:
        factors_a, factors_b = svd.truncate(rank)
        dtype = site.weight.dtype
        module = KroneckerLinear.from_factors([factors_a.to(dtype)], [factors_b.to(dtype)], bias)
        error = _output_error(module, rows, expected)
        yield module, f"Kronecker {module.groups[0].describe()}", svd.relative_error(rank), error
        if error <= options.max_error:
            return


def _butterfly_candidate(site: _Site, options: StructureOptions, rows: torch.Tensor,
                         expected: torch.Tensor) -> Iterator[Candidate]:
    """The one butterfly fit (it has no rank to search)."""
    out_features, in_features = site.weight.shape
    shell = nn.Linear(in_features, out_features, site.bias is not None, device=site.weight.device,
                      dtype=site.weight.dtype)
    with torch.no_grad():
        shell.weight.copy_(site.weight)
        if site.bias is not None:
            shell.bias.copy_(site.bias)
    module = ButterflyLinear.from_linear(shell, options.steps)
    resized = module.size != in_features or module.size != out_features
    text = f"butterfly, {module.stages} stages at {module.size}{' (padded/truncated)' if resized else ''}"
    yield module, text, module.fit_error, _output_error(module, rows, expected)


def _decide(site: _Site, options: StructureOptions, rows: Optional[torch.Tensor],
            why_no_rows: str) -> tuple[StructuredLayerDecision, Optional[nn.Module]]:
    """The report's decision for ``site``, and the structured module to install in its
    place (``None`` when the layer is kept). ``rows`` are the layer's recorded inputs."""
    out_features, in_features = site.weight.shape
    dense_params = site.weight.numel() + (site.bias.numel() if site.bias is not None else 0)
    decision = StructuredLayerDecision(site.path, options.kind, False, "", in_features, out_features,
                                       params_before=dense_params)
    if site.refusal is not None:
        decision.reason = f"kept: {site.refusal}"
        return decision, None
    narrow = [f"{count} {side}" for count, side in ((in_features, "inputs"), (out_features, "outputs"))
              if count < options.min_features]
    if narrow:
        decision.reason = (f"kept: {' and '.join(narrow)}, fewer than min_features={options.min_features} "
                           f"(a dense layer this narrow is cheap already)")
        return decision, None
    if rows is None:
        decision.reason = f"kept: {why_no_rows}"
        return decision, None
    with torch.no_grad():
        expected = F.linear(rows, site.weight, site.bias)
    candidates = _kronecker_candidates if options.kind == "kronecker" else _butterfly_candidate
    best = None
    try:
        for candidate in candidates(site, options, rows, expected):
            best = candidate
    except ValueError as err:
        decision.reason = f"kept: {err}"
        return decision, None
    if best is None:
        decision.reason = "kept: no Kronecker layer of balanced shapes has fewer parameters and FLOPs than this one"
        return decision, None
    module, text, weight_error, output_error = best
    count = rows.shape[0]
    dense_flops = count * (2 * in_features * out_features + (out_features if site.bias is not None else 0))
    decision.factors, decision.params_after = text, _params(module)
    decision.flops_before, decision.flops_after = dense_flops, count * module.flops_per_row()
    decision.weight_error, decision.output_error = weight_error, output_error
    if decision.params_after >= dense_params:
        decision.reason = "kept: the structured layer has no fewer parameters than the dense one"
    elif not output_error <= options.max_error:  # NaN fails too
        decision.reason = (f"kept: output error {output_error:.3g} > max_error {options.max_error:g}; "
                           f"the weight is far from this structure (fine-tune a replaced model instead, "
                           f"or raise max_error)")
    else:
        decision.replaced = True
        decision.reason = f"replaced: output error {output_error:.3g} <= max_error {options.max_error:g}"
        return decision, module
    return decision, None


def plan_structure(gm: fx.GraphModule, ctx: PassContext, options: StructureOptions = StructureOptions()) -> PassResult:
    """Decide every dense linear layer of ``gm`` (see the module's docstring). ``options``
    are :func:`specfx.structure`'s, bound by the entry point."""
    sites = _sites(gm)
    inputs = ctx.example_inputs
    on_meta = inputs is not None and any(isinstance(t, torch.Tensor) and t.is_meta
                                         for t in pytree.tree_leaves(list(inputs)))
    measurable = [s for s in sites if s.refusal is None and min(s.weight.shape) >= options.min_features]
    rows: dict[str, torch.Tensor] = {}
    why_no_rows = "no example inputs to measure the output error on"
    if on_meta:
        why_no_rows = "the example inputs are on the meta device: no output error can be measured"
    elif inputs is not None and measurable:
        rows = _record_inputs(gm, measurable, inputs)
        why_no_rows = "the layer did not run on the example inputs"
    for site in sites:
        with at_node(site.nodes[0]):
            decision, module = _decide(site, options, rows.get(site.path), why_no_rows)
        ctx.report.structured.append(decision)
        if module is None:
            continue
        module.train(gm.get_submodule(site.path).training)
        plan = LayerPlan(module, site.path, site.path, options.kind)
        for node in site.nodes:
            node.meta[STRUCTURE_PLAN] = plan
    return PassResult(gm, False)
