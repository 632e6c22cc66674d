"""Rewrite each fused chain (planned by ``find_chains``) so that its tensors stay spectra.

Runs after ``lower_convs``, which lowered the chain's convs onto the chain's shared grid.
Walking the graph in order, every tensor the plan labels spectral gets a spectral value —
a spectrum node plus a pending per-channel affine ``scale·X + shift·F{m}`` (a conv's
bias, a BatchNorm), folded into the next op that takes one:

- a lowered conv reading a spectral tensor has its ``to_spectrum`` replaced by that
  spectrum (masked first where the plan says so): the ``from_spectrum → ... →
  to_spectrum`` pair is gone; its own output's spectrum is its ``spectral_mix``;
- an activation becomes ``spectral_activation`` (exact) or ``poly_activation`` (fitted
  coefficients, kept as a non-persistent buffer, so ``state_dict`` is unchanged);
- BatchNorm / scalar or per-channel affine maps become pending affines (their scale and
  shift computed from the parameters in the graph, so they follow the parameters);
- a residual add becomes ``spectral_add``; a crop changes only the recorded size;
- a conv kept direct, or a stride-1 average pool (a depthwise conv with a constant
  kernel, a non-persistent buffer), becomes a ``spectral_mix`` on the chain's grid.

A spectral tensor that is also read spatially (by an op outside the chain, or as an
output) is materialized once with ``from_spectrum``; a spatial tensor read by spectral
ops is transformed once with ``to_spectrum`` (where each reader reads it, if an in-place
write into it can be observed). The replaced spatial ops are erased. Afterwards the
report's ``transforms`` counts the transforms the graph runs.

The plans come from ``find_chains`` on ``ctx.chain_plans``. They name nodes of the graph
``find_chains`` saw, before lowering: a conv's node (the chain's own, or one outside it
that a chain op reads) is gone by now, and stands for the node carrying its name as
``specfx_replaces`` (its ``from_spectrum``, or an earlier chain's materialized value),
which is where every new node reads it; a chain conv's three lowered nodes are the
:class:`~specfx.node_meta.LoweredConv` that ``lower_convs`` recorded on that node.

A chain whose BatchNorm modules are affine maps only in eval mode keeps its original
ops too: every spatial value the chain produces is read through
:func:`specfx.chains.runtime.chain_outputs`, which, while such a module is in training mode,
returns what the original ops compute instead (a copy of them, a submodule without
parameters of its own, run in stages where the chain's values are read).
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

from specfx import node_meta
from specfx.chains.plan import ChainPlan
from specfx.chains.recognize import ChainOp, OpKind, conv_geometry_of, rows_and_size
from specfx.chains.runtime import batch_norm_affine, chain_outputs
from specfx.ops.spectral_ops import gradient_after_weight
from specfx.canonical import bind_schema, conv_site, weight_shape
from specfx.capture import keep_buffers_non_persistent_on_copy
from specfx.pipeline import PassContext
from specfx.torch_compat import rename_as_fresh
from specfx.side_effects import eliminate_dead_code

OPS = torch.ops.specfx
CHAIN = "specfx_chain"  # node meta: the chain a node was added for


def count_transforms(gm: fx.GraphModule) -> dict[str, int]:
    """Forward and inverse transforms the graph runs (an exact spectral activation and a
    merged ``lowered_conv`` run one of each)."""
    fwd = inv = 0
    for n in gm.graph.nodes:
        if n.target is OPS.to_spectrum.default:
            fwd += 1
        elif n.target is OPS.from_spectrum.default:
            inv += 1
        elif n.target in (OPS.spectral_activation.default, OPS.lowered_conv.default):
            fwd, inv = fwd + 1, inv + 1
    return {"forward": fwd, "inverse": inv}


@dataclasses.dataclass
class Value:
    """A spectral value: ``scale·node + shift·F{m}`` (scale and shift: per-channel vector
    nodes, Python numbers, or ``None``)."""

    node: fx.Node
    scale: Union[fx.Node, float, None] = None
    shift: Union[fx.Node, float, None] = None
    applied: dict = dataclasses.field(default_factory=dict)  # (mask?, size) -> as one spectrum node


class _Rewriter:
    def __init__(self, gm: fx.GraphModule, plan: ChainPlan) -> None:
        self.gm, self.graph, self.plan = gm, gm.graph, plan
        self.grid = list(plan.grid)
        self.rank = plan.rank
        self.values: dict[str, Value] = {}
        self.forward: dict[str, fx.Node] = {}
        self.masks = set(plan.masks)
        self.spectral = set(plan.spectral)
        self.erase: list[fx.Node] = []
        self.buffers = 0
        self.by_name = {n.name: n for n in self.graph.nodes}
        self.replaced = {n.meta[node_meta.REPLACES]: n for n in self.graph.nodes if node_meta.REPLACES in n.meta}
        self.materialized: dict[str, fx.Node] = {}  # a spectral op -> its from_spectrum
        recorded = {n.meta[node_meta.REPLACES]: n.meta[node_meta.LOWERED] for n in self.graph.nodes
                    if node_meta.LOWERED in n.meta}
        missing = [c for c in plan.convs if c not in recorded]
        if missing:
            raise RuntimeError(f"specfx: fuse_chains found no lowered ops for conv {missing[0]!r}")
        self.lowered = {c: recorded[c] for c in plan.convs}  # the chain's convs, as lower_convs made them
        self.order = {n: k for k, n in enumerate(self.graph.nodes)}

    # helpers ------------------------------------------------------------------------------
    def name_of(self, node: fx.Node) -> str:
        """The name the plan knows ``node``'s value by."""
        return node.meta.get(node_meta.REPLACES, node.name)

    def current(self, node: fx.Node) -> fx.Node:
        """The node of this graph that holds the value of the plan's ``node`` (or of the
        node of that name, op and target in a copy of the planned graph: passes/
        time_chains.py rewrites a chain cut out of it)."""
        found = self.by_name.get(node.name)
        if found is node or (found is not None and (found.op, found.target) == (node.op, node.target)):
            return found
        if node.name in self.replaced:
            return self.replaced[node.name]
        raise RuntimeError(f"specfx: fuse_chains found no node for {node.name!r} (chain {self.plan.name})")

    def size(self, node: fx.Node) -> list[int]:
        return list(self.plan.sizes[self.name_of(node)])

    def add(self, target, args, kwargs=None, source: Optional[fx.Node] = None) -> fx.Node:
        return self._mark(self.graph.call_function(target, tuple(args), kwargs or {}), source)

    def attr(self, path: str) -> fx.Node:
        """A ``get_attr`` node added for the chain."""
        return self._mark(self.graph.get_attr(path), None)

    def _mark(self, node: fx.Node, source: Optional[fx.Node]) -> fx.Node:
        node.meta[node_meta.LOWERED_FROM] = self.plan.name
        node.meta[CHAIN] = self.plan.name
        if source is not None and "nn_module_stack" in source.meta:
            node.meta["nn_module_stack"] = source.meta["nn_module_stack"]
        return node

    def buffer(self, value: torch.Tensor, what: str) -> fx.Node:
        if self.plan.inline_device is not None:
            return self.add(torch.tensor, (value.tolist(),), {"dtype": value.dtype, "device": self.plan.inline_device})
        name = f"_specfx_{self.plan.name}_{what}"
        while hasattr(self.gm, name):
            self.buffers += 1
            name = f"_specfx_{self.plan.name}_{what}_{self.buffers}"
        self.gm.register_buffer(name, value, persistent=False)
        return self.graph.get_attr(name)

    def vector(self, value):
        """A per-channel factor: a Python number stays one (folded at rewrite time), an
        attribute or a per-channel tensor node becomes a flat vector node."""
        if value is None or isinstance(value, float):
            return value
        if isinstance(value, int):
            return float(value)
        if isinstance(value, str):
            value = self.graph.get_attr(value)
        else:
            value = self.current(value)
        return self.add(torch.reshape, (value, (-1,)))

    def arg(self, value, what: str) -> Optional[fx.Node]:
        """An op argument: numbers become one-element constant tensors."""
        if isinstance(value, float):
            return self.buffer(torch.tensor([value], dtype=self.plan.dtype), what)
        return value

    def mul(self, a, b):
        if a is None:
            return b
        if b is None:
            return a
        if isinstance(a, float) and isinstance(b, float):
            return a * b
        if isinstance(a, float):
            a, b = b, a
        return self.add(torch.mul, (a, b))

    def plus(self, a, b):
        if a is None:
            return b
        if b is None:
            return a
        if isinstance(a, float) and isinstance(b, float):
            return a + b
        if isinstance(a, float):
            a, b = b, a
        return self.add(torch.add, (a, b))

    def spectrum(self, u: fx.Node) -> Value:
        key = self.name_of(u)
        if key in self.values:
            return self.values[key]
        if key in self.plan.written:
            return Value(self.add(OPS.to_spectrum.default, (self.current(u), self.size(u), self.grid), source=u))
        if key not in self.forward:
            self.forward[key] = self.add(OPS.to_spectrum.default, (self.current(u), self.size(u), self.grid),
                                         source=u)
        return Value(self.forward[key])

    def plain(self, value: Value, size: list[int], mask: bool, source: fx.Node) -> fx.Node:
        """The value as one spectrum node (its pending affine applied), masked if asked;
        made once, however many convs read it."""
        key = (mask, tuple(size))
        if key not in value.applied:
            value.applied[key] = self._plain(value, size, mask, source)
        return value.applied[key]

    def _plain(self, value: Value, size: list[int], mask: bool, source: fx.Node) -> fx.Node:
        scale, shift = self.arg(value.scale, "scale"), self.arg(value.shift, "shift")
        if mask:
            return self.add(OPS.spectral_activation.default,
                            (value.node, self.grid, size, scale, shift, "identity", 0.0), source=source)
        if scale is None and shift is None:
            return value.node
        return self.add(OPS.spectral_affine.default, (value.node, self.grid, size, scale, shift), source=source)

    def weight(self, site) -> fx.Node:
        w = site.weight
        if isinstance(w, str):
            if site.parametrized_weight:
                owner, _, attr = w.rpartition(".")
                return self.add(getattr, (self.graph.get_attr(owner), attr))
            return self.graph.get_attr(w)
        return self.current(w)

    # the rewrite ---------------------------------------------------------------------------
    def run(self) -> None:
        lowered = self.lowered
        by_mix = {nodes.spectral_mix: conv for conv, nodes in lowered.items()}
        for node in list(self.graph.nodes):
            if node in by_mix:
                self.conv(by_mix[node], lowered[by_mix[node]])
            elif node.name in self.spectral:
                self.op(node)
        for nodes in lowered.values():
            for end in (nodes.to_spectrum, nodes.from_spectrum):
                if not end.users:
                    self.graph.erase_node(end)
        for node in reversed(self.erase):
            if node.users:
                raise RuntimeError(f"specfx: fuse_chains left {node.name} with users {list(node.users)}")
            self.graph.erase_node(node)
        if self.plan.modal:
            outputs = [(c, nodes.from_spectrum) for c, nodes in lowered.items() if nodes.from_spectrum.users]
            outputs += list(self.materialized.items())
            order = {n: k for k, n in enumerate(self.graph.nodes)}
            self.training_fallback(sorted(outputs, key=lambda item: order[item[1]]))

    def conv(self, conv: str, nodes: node_meta.LoweredConv) -> None:
        to_c, mix_c, from_c = nodes
        x = bind_schema(to_c.target, to_c.args, to_c.kwargs)["x"]
        key = self.name_of(x)
        with self.graph.inserting_before(mix_c):
            if key in self.values:
                spectrum = self.plain(self.values[key], self.size(x), (conv, key) in self.masks, mix_c)
                mix_c.replace_input_with(to_c, spectrum)
            elif key not in self.plan.written:  # (a written value keeps the conv's own transform)
                if key in self.forward:
                    mix_c.replace_input_with(to_c, self.forward[key])
                else:
                    self.forward[key] = to_c
        bias = bind_schema(from_c.target, from_c.args, from_c.kwargs)["bias"]
        if isinstance(bias, fx.Node):
            # Read before the conv's ops run (lower_convs reads the bias first), so that its
            # gradient arrives after the weight's, as torch's conv gives them.
            with self.graph.inserting_after(bias):
                late = self.add(gradient_after_weight, (bias,), source=from_c)
            from_c.replace_input_with(bias, late)
            bias = late
        if conv not in self.plan.ends:
            self.values[conv] = Value(mix_c, None, bias)

    def op(self, node: fx.Node) -> None:
        op = self.plan.ops[node.name]
        size = list(self.plan.sizes[node.name])
        with self.graph.inserting_before(node):
            if op.kind is OpKind.ACTIVATION:
                v = self.spectrum(op.inputs[0])
                v = Value(v.node, self.arg(v.scale, f"{node.name}_scale"), self.arg(v.shift, f"{node.name}_shift"))
                if self.plan.modes.get(node.name) == "poly":
                    poly = self.plan.poly[node.name]
                    coeffs = self.buffer(poly.coeffs.clone(), f"{node.name}_coeffs")
                    out = self.add(OPS.poly_activation.default,
                                   (v.node, coeffs, self.grid, size, v.scale, v.shift, poly.mask_input), source=node)
                else:
                    out = self.add(OPS.spectral_activation.default,
                                   (v.node, self.grid, size, v.scale, v.shift, op.activation, float(op.slope)),
                                   source=node)
                value = Value(out)
            elif op.kind is OpKind.AFFINE:
                v = self.spectrum(op.inputs[0])
                scale, shift = self.affine_terms(op, node, v.node)
                shifted = None if v.shift is None else self.mul(v.shift, scale)  # (a·s + b)·scale + shift
                value = Value(v.node, self.mul(v.scale, scale), self.plus(shifted, shift))
            elif op.kind is OpKind.ADD:
                a, b = (self.spectrum(i) for i in op.inputs)
                xa = a.node if a.scale is None else self.add(
                    OPS.spectral_affine.default, (a.node, self.grid, size, self.arg(a.scale, "scale"), None), source=node)
                xb = b.node if b.scale is None else self.add(
                    OPS.spectral_affine.default, (b.node, self.grid, size, self.arg(b.scale, "scale"), None), source=node)
                value = Value(self.add(OPS.spectral_add.default, (xa, xb), source=node), None,
                              self.plus(a.shift, b.shift))
            elif op.kind.view:
                value = self.spectrum(op.inputs[0])
            else:  # a direct conv or an average pool, as a channel contraction on the grid
                x = op.inputs[0]
                v = self.spectrum(x)
                spectrum = self.plain(v, self.size(x), (node.name, self.name_of(x)) in self.masks, node)
                if op.kind is OpKind.CONV:
                    site = conv_site(self.gm, node)
                    kernel = list(weight_shape(self.gm, site)[2:])
                    dilation, pads = conv_geometry_of(site, tuple(kernel))
                    weight = self.weight(site)
                    bias = site.bias
                    if isinstance(bias, str):
                        bias = self.graph.get_attr(bias)
                    elif bias is not None:
                        bias = self.current(bias)
                    groups, shift = site.groups, [p[0] for p in pads]
                else:
                    channels = self.plan_channels(x)
                    w = torch.full((channels, 1, *op.kernel), 1.0 / math.prod(op.kernel), dtype=self.plan.dtype)
                    weight, bias, groups = self.buffer(w, f"{node.name}_kernel"), None, channels
                    dilation, shift = [1] * self.rank, list(op.padding)
                out = self.add(OPS.spectral_mix.default, (spectrum, weight, self.grid, list(dilation), shift, groups),
                               source=node)
                value = Value(out, None, bias)
            self.values[node.name] = value
            self.materialize(node, value, size)
        self.erase.append(node)

    def plan_channels(self, node: fx.Node) -> int:
        return int(rows_and_size(node, self.rank)[1])

    def affine_terms(self, op: ChainOp, node: fx.Node, spectrum: fx.Node):
        """``(scale, shift)`` of an affine op (applied to ``spectrum``), computed in the
        graph from its parameters.

        A BatchNorm module's come from :func:`specfx.chains.runtime.batch_norm_affine`, a call
        that reads the module when it runs. Its running statistics are buffers, which
        ``symbolic_trace`` does not trace through: arithmetic on them in this graph would
        be frozen into constants by a second capture, while the call stays a call (and
        follows ``load_state_dict``)."""
        if op.bn is None:
            return self.vector(op.scale), self.vector(op.shift)
        if node.op == "call_module":
            terms = self.add(batch_norm_affine, (self.attr(str(node.target)), spectrum), source=node)
            return self.add(operator.getitem, (terms, 1)), self.add(operator.getitem, (terms, 0))
        weight, bias, mean, var, eps = op.bn
        weight, bias, mean, var = (self.vector(v) for v in (weight, bias, mean, var))
        inv_std = self.add(torch.rsqrt, (self.add(torch.add, (var, eps)),))
        scale = self.mul(weight, inv_std)
        shift = self.add(torch.neg, (self.add(torch.mul, (mean, scale)),))
        return scale, self.plus(bias, shift)

    def materialize(self, node: fx.Node, value: Value, size: list[int]) -> None:
        """``from_spectrum`` for the readers of ``node`` that read it spatially."""
        def spectral_reader(user: fx.Node) -> bool:
            if user.name in self.spectral:
                op = self.plan.ops[user.name]
                return any(self.name_of(i) == node.name for i in op.inputs) \
                    and not any(a is node for a in _non_chain_args(user, op, self))
            return user.target is OPS.to_spectrum.default and any(user is c.to_spectrum for c in self.lowered.values())

        spatial = [u for u in node.users if not spectral_reader(u)]
        if not spatial:
            return
        x = value.node if value.scale is None else self.add(
            OPS.spectral_affine.default, (value.node, self.grid, size, self.arg(value.scale, "scale"), None),
            source=node)
        y = self.add(OPS.from_spectrum.default,
                     (x, self.grid, size, [1] * self.rank, self.arg(value.shift, "shift"), self.output_dtype(node)),
                     source=node)
        y.meta[node_meta.REPLACES] = node.name
        self.materialized[node.name] = y
        for user in spatial:
            user.replace_input_with(node, y)

    def output_dtype(self, source: fx.Node) -> Union[fx.Node, torch.dtype]:
        """The dtype a materialized value is returned in: what the chain's first conv
        returns, read at run time from its weight as ``lower_convs`` reads it (so a module
        converted with ``.double()`` computes and returns float64); the captured dtype
        where that conv's is fixed (autocast)."""
        first = min(self.lowered.values(), key=lambda c: self.order[c.spectral_mix])
        if not isinstance(first.from_spectrum.args[5], fx.Node):
            return self.plan.dtype
        return self.add(getattr, (first.spectral_mix.args[1], "dtype"), source=source)

    def training_fallback(self, outputs: list[tuple[str, fx.Node]]) -> None:
        """Read each of the chain's spatial ``outputs`` (``(node name in the plan, node)``,
        in graph order) through :func:`specfx.chains.runtime.chain_outputs`, with the original
        ops that compute it, from ``plan.original``, as a stage of their own.

        A stage runs right after its output is computed: what the chain's ops read from
        outside (an op outside the chain may read an earlier output, and feed a later
        op) is all there by then. The ops a stage runs are those its output needs that
        no earlier stage ran; a value a later stage needs is returned with its output
        (so that every op, a BatchNorm's running-statistic update among them, runs once)."""
        region = self.plan.original
        copies = {n.meta["specfx_member"]: n for n in region.nodes if "specfx_member" in n.meta}
        done: dict[fx.Node, fx.Node] = {}  # an op of the region -> its value from an earlier stage
        for k, (name, output) in enumerate(outputs):
            target = copies[name]
            needed, stack = set(), [target]
            while stack:
                n = stack.pop()
                if n not in needed and n not in done and n.op != "placeholder":
                    needed.add(n)
                    stack += n.all_input_nodes
            body = [n for n in region.nodes if n in needed]
            later = {copies[name] for name, _ in outputs[k + 1:]}
            later |= {i for n in region.nodes if n not in needed and n not in done for i in n.all_input_nodes}
            results = [target] + [n for n in body if n is not target and n in later]
            inputs = list(dict.fromkeys(i for n in body for i in n.all_input_nodes if i not in needed))
            stage = fx.Graph()
            env = {i: stage.placeholder(i.name) for i in inputs}
            for n in body:
                env[n] = stage.node_copy(n, env.__getitem__)
            stage.output(tuple(env[n] for n in results))
            path = f"_specfx_{self.plan.name}_original{k}"
            while hasattr(self.gm, path):
                path += "_"
            self.gm.add_submodule(path, fx.GraphModule(nn.Module(), stage, path.lstrip("_")))
            with self.graph.inserting_before(output.next):
                # (module operands fetched in the order a capture of this graph fetches them)
                modal = tuple(self.attr(m) for m in self.plan.modal)
                original = self.attr(path)
                args = tuple(done[i] if i in done else self.attr(i.meta["specfx_module"])
                             if "specfx_module" in i.meta else self.current(i.meta["specfx_source"])
                             for i in inputs)
                fused = (output,) + (None,) * (len(results) - 1)
                chosen = self.add(chain_outputs, (modal, original, fused, args))
                values = [self.add(operator.getitem, (chosen, j)) for j in range(len(results))]
            output.replace_all_uses_with(values[0], delete_user_cb=lambda user: user is not chosen)
            done.update(zip(results, values))


def _non_chain_args(user: fx.Node, op: ChainOp, rewriter: "_Rewriter") -> list[fx.Node]:
    """Nodes ``user`` reads besides its chain inputs (e.g. a per-channel operand)."""
    names = {rewriter.name_of(i) for i in op.inputs}
    return [n for n in user.all_input_nodes if rewriter.name_of(n) not in names]


def fuse_chains(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    for plan in ctx.chain_plans:
        _Rewriter(gm, plan).run()
    modified = bool(ctx.chain_plans)
    # The plans name graph nodes: done with, they must not keep them alive.
    ctx.chain_plans.clear()
    if modified:
        eliminate_dead_code(gm)
        # The chain's constants are non-persistent buffers: keep them so in copies.
        keep_buffers_non_persistent_on_copy(gm)
        # Added nodes take the names a fresh capture of this graph would give them (fx
        # never reuses the names of erased nodes), so that optimizing the result again
        # reproduces its code; kept nodes keep theirs (diffs match nodes by name).
        rename_as_fresh(gm.graph, [n for n in gm.graph.nodes if node_meta.LOWERED_FROM in n.meta
                                   and n.op not in ("placeholder", "output")])
    ctx.report.transforms = count_transforms(gm)
    return PassResult(gm, modified)
