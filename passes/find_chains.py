"""Find chains of convolutions that can stay in the frequency domain, and place their
transforms by an exact min-cut over the cost model.

Analysis only (it runs in :func:`specfx.explain` too): the graph is unchanged; a fused
chain's convs get the chain's shared grid in their ``ConvPlan`` (so that ``lower_convs``
lowers them onto it), and the report a :class:`~specfx.report.ChainDecision` whose
``plan`` tells ``fuse_chains`` what to rewrite.

**Graph.** The fx graph becomes a ``networkx.DiGraph`` over node names, each edge
carrying the operand positions (``args[0]``, ``kwargs['other']``, ...) at which the
consumer reads the producer. *Anchors* are the convs ``plan_convs`` lowered (fp32/fp64,
no spatial pre-padding); the ops between them that :func:`specfx.chains.classify`
recognizes are *chainable*. The candidate region is every chainable node on a path from
an anchor's output (stride 1 only: a strided conv can end a chain, not continue one) to
an anchor's input; a chain is a connected component of anchors and region nodes. A value
an in-place write can be observed through (:func:`specfx.chains.observed_writes`) does
not continue either, and an in-place op whose write is seen elsewhere is not chainable.

**Placement.** Each node of a chain is labelled spectral (F) or spatial (S). An anchor is
F (its channel contraction); a node outside the chain is S. Costs (``specfx.cost_model``
chain functions, at the chain's grid): each node's own cost in the domain it runs in
(an exact spectral activation costs a transform pair, a poly one its spectral
convolutions, a spatial ReLU one pass over memory); a forward transform for each tensor
that is S but read by an F node, an inverse transform for each tensor that is F but read
spatially (by an S node, by anything outside the chain, or as a graph output) — once per
tensor however many readers it has. Minimizing the sum is a two-label problem with only
"different labels" pair terms, which is a minimum s–t cut: source = F, sink = S; node
``v``: edges ``s→v`` (capacity = its S cost) and ``v→t`` (its F cost); per tensor ``u``
two auxiliaries, ``u_F`` ("u is available as a spectrum": ``v→u_F`` infinite for every
F reader v, ``u_F→u`` = forward transform) and ``u_S`` ("u is available spatially":
``u_S→v`` infinite for every reader v that is S, ``u→u_S`` = inverse transform).
``networkx.minimum_cut`` solves it exactly; a tensor with readers in both domains is
materialized (transformed once) and both keep it.

**Exactness.** The labelling is then checked with :func:`specfx.chains` 's support
analysis at the chain's grid; where a conv would read garbage, a mask is added (an
identity ``spectral_activation``, or the poly activation's frequency-domain input mask)
and costed. Two grids are tried: the largest of the convs' own grids, and one large
enough that no support wraps (``L + Σ spans``), which is what causal chains need to run
without masks; the cheaper valid one is kept.

**Decision.** ``policy="always"`` fuses every chain, every op that can be spectral made
spectral. ``"auto"`` (and ``"measure"``, which times single convs, not chains) fuses a
chain where its min-cut cost beats lowering each conv on its own grid with the ops
between them spatial. The activation mode: ``spectral_activation="exact"`` uses exact
spectral activations only; ``"poly"`` (opt-in, approximate unless the activation is a
polynomial) makes every activation it can fit poly under ``"always"``, and under
``"auto"`` offers poly to the min-cut per activation next to exact, so it is used only
where estimated cheaper. Poly needs real example inputs (their pre-activation
statistics); the report states each fit's error.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import networkx as nx
import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from specfx import chains as ch
from specfx import cost_model as cm
from specfx import node_meta
from specfx.canonical import conv_site, tensor_info, weight_value
from specfx.capture import preserved_state
from specfx.geometry import smooth_size
from specfx.pipeline import PassContext
from specfx.report import ChainDecision, SpectralActivationRecord

SOURCE, SINK = "__spectral__", "__spatial__"


# --- the graph -----------------------------------------------------------------------------

def _operand_positions(node: fx.Node) -> list[tuple[fx.Node, str]]:
    found: list[tuple[fx.Node, str]] = []

    def walk(value, where: str) -> None:
        if isinstance(value, fx.Node):
            found.append((value, where))
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{where}[{k!r}]")

    for i, a in enumerate(node.args):
        walk(a, f"args[{i}]")
    for k, v in node.kwargs.items():
        walk(v, f"kwargs[{k!r}]")
    return found


def build_digraph(gm: fx.GraphModule) -> nx.DiGraph:
    """The fx graph as a ``DiGraph`` over node names; each edge's ``positions`` lists
    where the consumer reads the producer."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        graph.add_node(node.name, node=node, op=node.op)
        for producer, where in _operand_positions(node):
            if graph.has_edge(producer.name, node.name):
                graph.edges[producer.name, node.name]["positions"].append(where)
            else:
                graph.add_edge(producer.name, node.name, positions=[where])
    return graph


# --- chain members ---------------------------------------------------------------------

@dataclasses.dataclass
class Member:
    """A node of a chain: an anchor (a lowered conv) or a chainable op."""

    node: fx.Node
    op: ch.ChainOp
    anchor: bool = False
    plan: object = None       # the anchor's ConvPlan
    rows_in: int = 0
    rows_out: int = 0
    channels_out: int = 0
    batch: int = 1
    size_out: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    left: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    circular: bool = False
    shape: Optional[cm.ConvShape] = None  # for convs
    written: bool = False  # an in-place write into its output can be observed (ch.observed_writes)

    @property
    def name(self) -> str:
        return self.node.name

    @property
    def continues(self) -> bool:
        """Its output can stay a spectrum: stride 1, and no observed in-place write into it."""
        if self.written:
            return False
        return all(s == 1 for s in self.stride) if self.op.kind in ("conv", "pool") else True


def _conv_member(gm: fx.GraphModule, node: fx.Node, op: ch.ChainOp, rank: int, anchor: bool) -> Optional[Member]:
    site = op.site
    info_in, info_out = ch.node_rows_and_size(site.input, rank), ch.node_rows_and_size(node, rank)
    w = weight_value(gm, site)
    w_shape = tuple(w.shape) if w is not None else (tensor_info(site.weight) or (None,))[0]
    if info_in is None or info_out is None or w_shape is None:
        return None
    batch, cin, _, dtype = info_in
    _, cout, out_size, _ = info_out
    kernel = tuple(int(k) for k in w_shape[2:])
    if anchor:
        op_plan = node.meta[node_meta.PLAN]
        g = op_plan.geometry
        dilation, left, stride, circular = g.dilation, g.shift, g.stride, g.circular
    else:
        op_plan = None
        dilation, pads = ch.conv_geometry_of(site, kernel)
        left, stride, circular = tuple(p[0] for p in pads), tuple(site.stride), site.padding_mode == "circular"
    shape = cm.ConvShape(batch=batch, in_channels=cin, out_channels=cout, groups=site.groups, kernel_size=kernel,
                         out_size=tuple(out_size), element_bytes=dtype.itemsize)
    return Member(node, op, anchor, op_plan, batch * cin, batch * cout, cout, batch, tuple(out_size), kernel,
                  tuple(dilation), tuple(left), tuple(stride), circular, shape)


def _members(gm: fx.GraphModule, rank: int,
             written: Optional[set[str]] = None) -> tuple[dict[str, Member], dict[str, str]]:
    """Every anchor and chainable op of spatial rank ``rank``; and why the lowered convs
    that are not anchors were left out. ``written``: :func:`specfx.chains.observed_writes`
    (computed if not given)."""
    members: dict[str, Member] = {}
    excluded: dict[str, str] = {}
    if written is None:
        written = ch.observed_writes(gm, rank)
    for node in gm.graph.nodes:
        plan = node.meta.get(node_meta.PLAN)
        if plan is not None and plan.lowered:
            site = conv_site(gm, node)
            if site.rank != rank:
                continue
            g = plan.geometry
            dtype = (tensor_info(site.input) or (None, None))[1]
            if g.pre_pad is not None:
                excluded[plan.name] = f"{g.pre_pad[0]} padding is done spatially before the transform"
            elif g.overlap_save is not None:
                excluded[plan.name] = "blocked (overlap-save) lowering"
            elif g.selection is not None:
                # A chain's spectrum holds every sample; this conv's transform must not.
                excluded[plan.name] = "it reads only some of its input's samples, selected before its transform"
            elif dtype not in ch.CHAIN_DTYPES or plan.out_dtype != dtype:
                excluded[plan.name] = f"dtype {dtype}: chains run in fp32 or fp64"
            else:
                member = _conv_member(gm, node, ch.ChainOp("conv", [site.input], site=site), rank, anchor=True)
                if member is not None:
                    member.written = node.name in written
                    members[node.name] = member
            continue
        op = ch.classify(gm, node, rank)
        if op is None:
            continue
        out = ch.node_rows_and_size(node, rank)
        ins = [ch.node_rows_and_size(i, rank) for i in op.inputs]
        if out is None or any(i is None for i in ins) or out[3] not in ch.CHAIN_DTYPES \
                or any(i[3] != out[3] for i in ins):
            continue
        # An in-place op is a chain op only where nothing else sees its write.
        if op.inplace and op.inputs[0].name in written:
            continue
        if op.kind == "conv":
            if ch.direct_conv_ok(gm, op.site) is not None:
                continue
            member = _conv_member(gm, node, op, rank, anchor=False)
            if member is None:
                continue
        else:
            batch, channels, size, _ = out
            member = Member(node, op, rows_in=ins[0][0] * ins[0][1], rows_out=batch * channels,
                            channels_out=channels, batch=batch, size_out=size)
            if op.kind == "pool":
                member.kernel, member.dilation = op.kernel, (1,) * rank
                member.left, member.stride = op.padding, (1,) * rank
                member.shape = cm.ConvShape(batch=batch, in_channels=channels, out_channels=channels,
                                            groups=channels, kernel_size=op.kernel, out_size=size,
                                            element_bytes=out[3].itemsize)
        member.written = node.name in written
        members[node.name] = member
    return members, excluded


def chain_edges(graph: nx.DiGraph, members: dict[str, Member]) -> nx.DiGraph:
    """The edges of the fx ``DiGraph`` along which a value can stay a spectrum: producer →
    member, where the member reads the producer as a chain input (not, e.g., as the
    per-channel factor of a multiplication), and the producer is a member whose output
    can continue (not a strided conv)."""
    edges = nx.DiGraph()
    for name, m in members.items():
        chain_inputs = {i.name for i in m.op.inputs}
        for producer in graph.predecessors(name):
            if producer in chain_inputs and producer in members and members[producer].continues:
                edges.add_edge(producer, name, positions=graph.edges[producer, name]["positions"])
    return edges


def _components(gm: fx.GraphModule, members: dict[str, Member], graph: nx.DiGraph) -> list[list[str]]:
    """Chains: the connected components of anchors and of the chainable ops that lie on
    an anchor → ... → anchor path of chain edges."""
    edges = chain_edges(graph, members)
    anchors = {n for n, m in members.items() if m.anchor}
    inner = edges.subgraph(n for n in edges if n not in anchors).copy()
    start, end = ("__from_anchors__",), ("__to_anchors__",)
    for a in anchors & set(edges):
        for reader in edges.successors(a):
            if reader not in anchors:
                inner.add_edge(start, reader)
        for producer in edges.predecessors(a):
            if producer not in anchors:
                inner.add_edge(producer, end)
    region = set()
    if start in inner and end in inner:
        region = (nx.descendants(inner, start) & nx.ancestors(inner, end)) - {start, end}
    links = nx.Graph()
    for u, v in edges.edges:
        if (u in region or u in anchors) and (v in region or v in anchors):
            links.add_edge(u, v)
    order = {n.name: k for k, n in enumerate(gm.graph.nodes)}
    comps = [sorted(c, key=order.__getitem__) for c in nx.connected_components(links)]
    return sorted((c for c in comps if any(members[n].anchor for n in c)), key=lambda c: order[c[0]])


# --- costs, min-cut, analysis --------------------------------------------------------------

@dataclasses.dataclass
class Candidate:
    grid: tuple[int, ...]
    labels: dict[str, str]              # node -> "F" | "S"
    modes: dict[str, str]               # activation -> "exact" | "poly"
    masks: list[tuple[str, str]]
    poly_mask: dict[str, bool]
    cost_ms: float
    transforms: dict[str, int]
    ok: bool
    reason: str = ""
    exact_ms: float = 0.0  # the same labelling with exact spectral activations only


class ChainProblem:
    """One chain at one grid: costs, min-cut and exactness analysis."""

    def __init__(self, gm: fx.GraphModule, comp: list[str], members: dict[str, Member], rank: int,
                 dtype: torch.dtype, circular: bool, ctx: PassContext, poly_fits: dict[str, ch.PolyPlan]):
        self.gm, self.comp, self.members, self.rank = gm, comp, members, rank
        self.dtype, self.eb, self.circular = dtype, dtype.itemsize, circular
        self.profile = ctx.settings.profile
        self.settings = ctx.settings
        self.poly_fits = poly_fits
        self.set = set(comp)
        self.nodes = {n: members[n].node for n in comp}

    # tensors read by chain members as chain inputs, and their readers
    def chain_inputs(self, name: str) -> list[fx.Node]:
        return self.members[name].op.inputs

    def tensor_info(self, node: fx.Node) -> tuple[int, tuple[int, ...]]:
        batch, channels, size, _ = ch.node_rows_and_size(node, self.rank)
        return batch * channels, size

    def forced(self, name: str) -> Optional[str]:
        """Anchors: F when their output continues as a spectrum, else S (a strided conv
        still reads a spectrum, and costs its own inverse transform)."""
        m = self.members[name]
        if m.anchor:
            return "F" if m.continues else "S"
        return None

    def activation_F_cost(self, name: str, grid) -> tuple[Optional[float], str]:
        m = self.members[name]
        rows, size = m.rows_out, m.size_out
        exact = cm.exact_activation_ms(rows, grid, size, self.eb, self.profile)
        wants_poly = self.settings.spectral_activation == "poly"
        fit = self.poly_fits.get(name)
        if not wants_poly or fit is None:
            return exact, "exact"
        degree = fit.coeffs.shape[1] - 1
        # (an input mask, if the analysis finds one needed, is costed afterwards)
        poly = cm.poly_activation_ms(rows, grid, self.eb, degree, False, self.profile)
        if self.settings.policy == "always" or poly < exact:
            return poly, "poly"
        return exact, "exact"

    def unary(self, name: str, grid) -> tuple[float, Optional[float], Optional[str]]:
        """(S cost, F cost, activation mode) of a chain member."""
        m, p, eb = self.members[name], self.profile, self.eb
        kind = m.op.kind
        if m.anchor:
            mix = cm.chain_mix_ms(m.shape, grid, p)
            if not m.continues:
                mix += cm.inverse_transform_ms(m.rows_out, grid, m.size_out, eb, p)
            return mix, mix, None
        if kind == "act":
            f, mode = self.activation_F_cost(name, grid)
            return cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 2, p), f, mode
        if kind == "affine":
            return (cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 2, p),
                    cm.spectral_pointwise_ms(m.rows_out, grid, eb, 1, p), None)
        if kind == "add":
            return (cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 3, p),
                    cm.spectral_pointwise_ms(m.rows_out, grid, eb, 3, p), None)
        if kind == "slice":
            if m.op.activation == "identity":
                return 0.0, 0.0, None
            return cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 2, p), 0.0, None
        if kind == "pool":
            s = cm.spatial_pointwise_ms(m.rows_out, m.size_out, eb, 2 + math.prod(m.kernel) // 4, p)
            return s, cm.chain_mix_ms(m.shape, grid, p), None
        return cm.direct_conv_ms(m.shape, p), cm.chain_mix_ms(m.shape, grid, p), None

    def readers(self, name: str) -> tuple[list[str], bool]:
        """Chain members reading ``name`` as a chain input, and whether anything else
        (outside the chain, a graph output, a parameter use) reads it."""
        node = self.nodes.get(name) or self.members[name].node
        inside, outside = [], False
        for user in node.users:
            if user.name in self.set and node in self.members[user.name].op.inputs:
                inside.append(user.name)
                # a member may also read it in a non-chain position (e.g. x * x's twin)
            else:
                outside = True
        return inside, outside

    def produced_tensors(self) -> list[str]:
        return [n for n in self.comp if self.members[n].continues]

    def read_tensors(self) -> list[fx.Node]:
        seen: dict[str, fx.Node] = {}
        for n in self.comp:
            for i in self.chain_inputs(n):
                seen.setdefault(i.name, i)
        return list(seen.values())

    def spectral_readers(self, t: fx.Node, labels: dict[str, str]) -> list[str]:
        return [u.name for u in t.users if u.name in self.set and t in self.chain_inputs(u.name)
                and (labels[u.name] == "F" or self.members[u.name].anchor)]

    def spatial_readers(self, name: str, labels: dict[str, str]) -> bool:
        readers, outside = self.readers(name)
        return outside or any(labels[r] == "S" and not self.members[r].anchor for r in readers)

    def evaluate(self, labels: dict[str, str], modes: dict[str, str], grid) -> tuple[float, dict[str, int]]:
        """Cost and transform counts of a labelling (masks excluded): what the min-cut
        minimizes."""
        p, eb = self.profile, self.eb
        cost, fwd, inv = 0.0, 0, 0
        for n in self.comp:
            m = self.members[n]
            s_cost, f_cost, _ = self.unary(n, grid)
            if m.anchor:
                cost += f_cost
                inv += 0 if m.continues else 1
            elif labels[n] == "F":
                if m.op.kind == "act":
                    mode = modes.get(n, "exact")
                    f_cost = self.mode_cost(n, mode, grid)
                    if mode == "exact":
                        fwd, inv = fwd + 1, inv + 1
                cost += f_cost
            else:
                cost += s_cost
        for t in self.read_tensors():
            if self.spectral_readers(t, labels) and labels.get(t.name, "S") == "S":
                cost += cm.forward_transform_ms(self.tensor_info(t)[0], grid, eb, p)
                fwd += 1
        for n in self.produced_tensors():
            if labels[n] == "F" and self.spatial_readers(n, labels):
                rows, size = self.tensor_info(self.nodes[n])
                cost += cm.inverse_transform_ms(rows, grid, size, eb, p)
                inv += 1
        return cost, {"forward": fwd, "inverse": inv}

    def mode_cost(self, name: str, mode: str, grid, mask_input: bool = False) -> float:
        m = self.members[name]
        if mode == "poly":
            degree = self.poly_fits[name].coeffs.shape[1] - 1
            return cm.poly_activation_ms(m.rows_out, grid, self.eb, degree, mask_input, self.profile)
        return cm.exact_activation_ms(m.rows_out, grid, m.size_out, self.eb, self.profile)

    def min_cut(self, grid, spatial: frozenset = frozenset()) -> tuple[dict[str, str], dict[str, str], float]:
        """The cheapest labelling, by ``networkx.minimum_cut`` (the nodes in ``spatial``
        forced S)."""
        h = nx.DiGraph()
        h.add_node(SOURCE)
        h.add_node(SINK)
        modes: dict[str, str] = {}
        for n in self.comp:
            s_cost, f_cost, mode = self.unary(n, grid)
            if mode is not None:
                modes[n] = mode
            forced = self.forced(n)
            if forced == "F":
                h.add_edge(SOURCE, n)
            else:
                h.add_edge(SOURCE, n, capacity=s_cost)
            if forced == "S" or f_cost is None or n in spatial:
                h.add_edge(n, SINK)
            else:
                h.add_edge(n, SINK, capacity=f_cost)
        for t in self.read_tensors():
            if t.name not in self.set:
                h.add_edge(t.name, SINK)  # outside the chain: spatial
            rows, _ = self.tensor_info(t)
            uf = ("F", t.name)
            h.add_edge(uf, t.name, capacity=cm.forward_transform_ms(rows, grid, self.eb, self.profile))
            for r in (u.name for u in t.users if u.name in self.set and t in self.chain_inputs(u.name)):
                if self.members[r].anchor and not self.members[r].continues:
                    h.add_edge(SOURCE, uf)
                else:
                    h.add_edge(r, uf)
        for n in self.produced_tensors():
            rows, size = self.tensor_info(self.nodes[n])
            us = ("S", n)
            h.add_edge(n, us, capacity=cm.inverse_transform_ms(rows, grid, size, self.eb, self.profile))
            readers, outside = self.readers(n)
            if outside:
                h.add_edge(us, SINK)
            for r in readers:
                if not self.members[r].anchor:
                    h.add_edge(us, r)
        value, (spectral_side, _) = nx.minimum_cut(h, SOURCE, SINK)
        labels = {n: ("F" if n in spectral_side else "S") for n in self.comp}
        return labels, modes, value

    def all_spectral(self, grid) -> tuple[dict[str, str], dict[str, str]]:
        labels, modes = {}, {}
        for n in self.comp:
            s_cost, f_cost, mode = self.unary(n, grid)
            labels[n] = self.forced(n) or "F"
            if mode is not None:
                modes[n] = mode
        return labels, modes

    # exactness
    def analyze(self, labels, modes, grid, poly_mask: dict[str, bool]) -> tuple[bool, str, list[tuple[str, str]]]:
        states: dict[str, ch.State] = {}
        masks: list[tuple[str, str]] = []

        def state_of(t: fx.Node) -> ch.State:
            if t.name in states:
                return states[t.name]
            return ch.clean_state(self.tensor_info(t)[1], grid)

        for n in self.comp:
            m = self.members[n]
            if labels[n] != "F" and not m.anchor:
                continue
            kind = m.op.kind
            ins = [state_of(i) for i in m.op.inputs]
            if kind in ("conv", "pool"):
                x = ins[0]
                out = self._conv_out(m, x)
                needed = self._needed(n, labels)
                if not self._enough(out, needed) and not m.circular:
                    masked = self._conv_out(m, ch.masked(x))
                    if self._enough(masked, needed) or sum(a.valid for a in masked) > sum(a.valid for a in out):
                        masks.append((n, m.op.inputs[0].name))
                        out = masked
                if not m.continues:
                    if not ch.fully_valid(out):
                        return False, f"{n}: its output, read spatially, would not be exact at grid {grid}", masks
                    continue
                states[n] = out
            elif kind == "act":
                x = ins[0]
                if modes.get(n) == "poly":
                    states[n] = ch.masked(x) if poly_mask.get(n) else [a.with_data() for a in x]
                else:
                    states[n] = ch.masked(x)
            elif kind == "affine":
                states[n] = [a.with_data() for a in ins[0]]
            elif kind == "add":
                states[n] = ch.union(ins[0], ins[1])
            elif kind == "slice":
                states[n] = ch.cropped(ins[0], m.size_out)
        for n in self.produced_tensors():
            if labels[n] == "F" and self.spatial_readers(n, labels) \
                    and not self._enough(states[n], self._needed(n)):
                return False, f"{n} would not be exact at grid {grid}", masks
        return True, "", masks

    def _conv_out(self, m: Member, x: ch.State) -> ch.State:
        return ch.conv_state(x, m.kernel, m.dilation, m.left, m.stride, m.size_out, m.circular)

    def _needed(self, name: str, labels=None) -> tuple[int, ...]:
        """The prefix of ``name``'s positions anything reads: all of them, unless every
        reader is a crop ``[..., :n]`` (in the chain or not), then the largest crop."""
        m = self.members[name]
        node = self.members[name].node
        needed = [0] * self.rank
        for user in node.users:
            reader = self.members.get(user.name)
            if reader is not None and reader.op.kind == "slice" and reader.op.inputs[0] is node:
                size = reader.size_out
            else:
                size = m.size_out
            needed = [max(a, b) for a, b in zip(needed, size)]
        return tuple(needed)

    @staticmethod
    def _enough(state: ch.State, needed) -> bool:
        return all(a.valid >= n for a, n in zip(state, needed))

    def solve(self, grid, always: bool) -> Candidate:
        """The best labelling at ``grid``: every op spectral under ``always``; else the
        min-cut, and again with the ops whose outputs needed a mask forced spatial (the
        min-cut does not see masks) while that is cheaper."""
        best = self._solve(grid, always, frozenset())
        spatial: frozenset = frozenset()
        for _ in range(3):
            if always or not best.masks:
                break
            spatial = spatial | {o for _, o in best.masks if o in self.set and not self.members[o].anchor}
            again = self._solve(grid, always, spatial)
            if not again.ok or (best.ok and again.cost_ms >= best.cost_ms):
                break
            best = again
        return best

    def _solve(self, grid, always: bool, spatial: frozenset) -> Candidate:
        labels, modes = self.all_spectral(grid) if always else self.min_cut(grid, spatial)[:2]
        poly_mask = {n: False for n, md in modes.items() if md == "poly" and labels[n] == "F"}
        ok, reason, masks = self.analyze(labels, modes, grid, poly_mask)
        for _ in range(3):
            changed = False
            for consumer, operand in list(masks):
                for p in self._poly_sources(operand, labels, modes):
                    if not poly_mask[p]:
                        poly_mask[p] = changed = True
            if not changed:
                break
            ok, reason, masks = self.analyze(labels, modes, grid, poly_mask)
        modes = {n: md for n, md in modes.items() if labels[n] == "F"}
        cost, transforms = self.evaluate(labels, modes, grid)
        for n, on in poly_mask.items():
            cost += self.mode_cost(n, "poly", grid, on) - self.mode_cost(n, "poly", grid, False)
        mask_ms = 0.0
        for consumer, operand in masks:
            rows, size = self.tensor_info(self.members[consumer].op.inputs[0])
            mask_ms += cm.exact_activation_ms(rows, grid, size, self.eb, self.profile)
            transforms = {"forward": transforms["forward"] + 1, "inverse": transforms["inverse"] + 1}
        exact_ms = self.evaluate(labels, {n: "exact" for n in modes}, grid)[0] + mask_ms
        return Candidate(grid, labels, modes, masks, poly_mask, cost + mask_ms, transforms, ok, reason, exact_ms)

    def _poly_sources(self, name: str, labels, modes) -> list[str]:
        """Poly activations whose output reaches ``name`` through spectral linear ops."""
        found, stack, seen = [], [name], set()
        while stack:
            n = stack.pop()
            if n in seen or n not in self.set or labels.get(n) != "F":
                continue
            seen.add(n)
            m = self.members[n]
            if m.op.kind == "act":
                if modes.get(n) == "poly":
                    found.append(n)
                continue
            if m.op.kind in ("affine", "add", "slice"):
                stack += [i.name for i in m.op.inputs]
        return found

    def per_conv(self, grid) -> tuple[float, dict[str, int]]:
        """Each anchor lowered on its own grid, everything between them spatial."""
        p, eb, cost = self.profile, self.eb, 0.0
        anchors = [n for n in self.comp if self.members[n].anchor]
        for n in anchors:
            m = self.members[n]
            own = m.plan.geometry.fft_size
            cost += (cm.forward_transform_ms(m.rows_in, own, eb, p) + cm.chain_mix_ms(m.shape, own, p)
                     + cm.inverse_transform_ms(m.rows_out, own, m.size_out, eb, p))
        for n in self.comp:
            if not self.members[n].anchor:
                cost += self.unary(n, grid)[0]
        return cost, {"forward": len(anchors), "inverse": len(anchors)}


def _smooth_grid(n: int, last_axis: bool) -> int:
    size = smooth_size(n)
    while last_axis and size % 2:
        size = smooth_size(size + 1)
    return size


def _grids(problem: ChainProblem) -> list[tuple[int, ...]]:
    members, rank = problem.members, problem.rank
    anchors = [members[n] for n in problem.comp if members[n].anchor]
    sizes = [problem.tensor_info(members[n].node)[1] for n in problem.comp if members[n].continues]
    sizes += [problem.tensor_info(i)[1] for n in problem.comp for i in members[n].op.inputs]
    if problem.circular:
        return [tuple(next(a for a in anchors if not _pointwise(a)).plan.geometry.fft_size)]
    own = [max(a.plan.geometry.fft_size[axis] for a in anchors) for axis in range(rank)]
    largest = [max(s[axis] for s in sizes) for axis in range(rank)]
    spans = [sum(members[n].dilation[axis] * (members[n].kernel[axis] - 1)
                 for n in problem.comp if members[n].op.kind in ("conv", "pool")) for axis in range(rank)]
    first = tuple(own[a] if own[a] >= largest[a] else _smooth_grid(largest[a], a == rank - 1) for a in range(rank))
    wide = tuple(max(first[a], _smooth_grid(largest[a] + spans[a], a == rank - 1)) for a in range(rank))
    return [first] if wide == first else [first, wide]


# --- poly statistics -------------------------------------------------------------------------

class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node):
        value = super().run_node(n)
        if n.name in self.wanted and isinstance(value, torch.Tensor):
            self.values[n.name] = value.detach().clone()
        return value


def _real_inputs(inputs) -> bool:
    from torch._subclasses.fake_tensor import FakeTensor
    return inputs is not None and not any(isinstance(x, FakeTensor) for x in inputs if isinstance(x, torch.Tensor))


def _fit_polys(gm: fx.GraphModule, ctx: PassContext, acts: dict[str, Member], rank: int) -> tuple[dict[str, ch.PolyPlan], str]:
    """Each activation's polynomial: the square exactly; the others fitted on the
    pre-activation values the example inputs produce (which need real inputs)."""
    fits, degree = {}, ctx.settings.poly_degree
    for name, m in acts.items():
        if m.op.activation == "square":
            coeffs = torch.zeros(m.channels_out, max(degree, 2) + 1, dtype=torch.float64)
            coeffs[:, 2] = 1.0
            fits[name] = ch.PolyPlan(coeffs, False, 0.0)
    fitted = {n: m for n, m in acts.items() if n not in fits}
    if not fitted:
        return fits, ""
    if not _real_inputs(ctx.example_inputs):
        return fits, "no real example inputs to fit the polynomial activations on"
    wanted = {m.op.inputs[0].name for m in fitted.values()}
    recorder = _Recorder(gm, wanted)
    with preserved_state(gm), torch.no_grad():
        recorder.run(*ctx.example_inputs)
    for name, m in fitted.items():
        samples = recorder.values.get(m.op.inputs[0].name)
        if samples is None:
            continue
        coeffs, error = ch.fit_poly(samples, m.op.activation, m.op.slope, degree, rank)
        fits[name] = ch.PolyPlan(coeffs, False, error)
    return fits, ""


# --- the pass -----------------------------------------------------------------------------------

def _count_lowered(gm: fx.GraphModule) -> int:
    return sum(1 for n in gm.graph.nodes if (p := n.meta.get(node_meta.PLAN)) is not None and p.lowered)


def find_chains(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    report, settings = ctx.report, ctx.settings
    lowered = _count_lowered(gm)
    report.transforms_per_conv = {"forward": lowered, "inverse": lowered}
    report.transforms = dict(report.transforms_per_conv)
    if not settings.chains or settings.policy == "never" or lowered == 0:
        return PassResult(gm, False)
    graph = build_digraph(gm)
    ranks = sorted({conv_site(gm, n).rank for n in gm.graph.nodes
                    if (p := n.meta.get(node_meta.PLAN)) is not None and p.lowered})
    count = 0
    for rank in ranks:
        written = ch.observed_writes(gm, rank)
        members, excluded = _members(gm, rank, written)
        comps = _components(gm, members, graph)
        poly_acts = {n: members[n] for c in comps for n in c
                     if members[n].op.kind == "act"} if settings.spectral_activation == "poly" else {}
        fits, poly_note = _fit_polys(gm, ctx, poly_acts, rank)
        for comp in comps:
            decision = _decide(gm, ctx, comp, members, rank, fits, poly_note, f"chain{count}", written)
            count += 1
            report.chains.append(decision)
            if decision.fused:
                for key in ("forward", "inverse"):
                    report.transforms[key] += decision.transforms[key] - decision.transforms_per_conv[key]
    return PassResult(gm, False)


def _pointwise(m: Member) -> bool:
    """A 1x1 conv without padding (stride 1): it reads only its own position."""
    return m.op.kind == "conv" and all(k == 1 for k in m.kernel) and all(lp == 0 for lp in m.left) \
        and all(s == 1 for s in m.stride)


def _describe_ops(comp, members, labels, modes, masks) -> list[str]:
    out = []
    for n in comp:
        m = members[n]
        if m.anchor:
            continue
        if labels is None:
            where = "spatial"
        elif labels[n] == "F":
            where = {"exact": "exact spectral activation", "poly": "poly spectral activation"}.get(
                modes.get(n), "frequency domain")
        else:
            where = "spatial"
        out.append(f"{n} ({m.op.label}: {where})")
    for consumer, operand in (masks or []):
        out.append(f"mask of {operand} before {consumer} (identity spectral activation)")
    return out


def _decide(gm, ctx, comp, members, rank, fits, poly_note, name, written) -> ChainDecision:
    settings = ctx.settings
    anchors = [n for n in comp if members[n].anchor]
    conv_names = [members[n].plan.name for n in anchors]
    dtypes = {ch.node_rows_and_size(members[n].node, rank)[3] for n in comp}
    # 1x1 convs without padding read only the data: they fit either kind of chain
    circular = {members[n].circular for n in comp if members[n].op.kind in ("conv", "pool")
                and not _pointwise(members[n])}
    padding = "circular" if circular == {True} else "zeros"

    def refuse(reason: str) -> ChainDecision:
        return ChainDecision(name, conv_names, _describe_ops(comp, members, None, {}, []), False, reason, padding)

    if len(dtypes) != 1:
        return refuse("tensors of different dtypes")
    if len(circular) > 1:
        return refuse("mixes circular and zero-padded convs (their grids differ)")
    if padding == "circular" and any(members[n].op.kind == "pool" or (
            members[n].op.kind == "slice" and members[n].op.activation != "identity") for n in comp):
        return refuse("a crop or pooling inside a circular chain changes the period")
    problem = ChainProblem(gm, comp, members, rank, dtypes.pop(), padding == "circular", ctx, fits)
    if padding == "circular":
        periodic = [a for a in anchors if not _pointwise(members[a])]
        grid = tuple(members[periodic[0]].plan.geometry.fft_size)
        if any(tuple(members[a].plan.geometry.fft_size) != grid for a in periodic) or \
                any(problem.tensor_info(members[n].node)[1] != grid for n in comp if members[n].continues):
            return refuse("circular convs of different sizes, or whose output size differs from the input's")
    always = settings.policy == "always"
    candidates = []
    for grid in _grids(problem):
        try:
            candidates.append(problem.solve(grid, always))
        except nx.NetworkXUnbounded:
            continue
    valid = [c for c in candidates if c.ok]
    if not valid:
        reason = candidates[0].reason if candidates else "no labelling"
        return refuse(f"not exact: {reason}")
    best = min(valid, key=lambda c: c.cost_ms)
    per_conv_ms, per_conv_t = problem.per_conv(best.grid)
    uses_poly = any(md == "poly" for md in best.modes.values())
    cost = cm.ChainCost(per_conv_ms, best.exact_ms, best.cost_ms if uses_poly else None)
    fused_ms = best.cost_ms
    spectral_ops = [n for n in comp if not members[n].anchor and best.labels[n] == "F"]
    spectral_inputs = any(best.labels.get(i.name) == "F" for n in anchors for i in members[n].op.inputs)
    if not spectral_inputs:
        return ChainDecision(name, conv_names, _describe_ops(comp, members, best.labels, best.modes, []), False,
                             "the min-cut places no conv input in the frequency domain: nothing to fuse",
                             padding, best.grid, cost=cost)
    if not always:
        if fused_ms >= per_conv_ms:
            return ChainDecision(
                name, conv_names, _describe_ops(comp, members, best.labels, best.modes, best.masks), False,
                f"fusing estimated slower ({fused_ms:.3g} ms vs {per_conv_ms:.3g} ms for per-conv lowering)",
                padding, best.grid, cost=cost)
        reason = f"fused: estimated {per_conv_ms / fused_ms:.2f}x faster than per-conv lowering"
    else:
        reason = "policy='always'"
    if poly_note:
        reason += f"; poly not used: {poly_note}"
    # A BatchNorm module is an affine map only in eval mode: in training mode the chain
    # runs its original ops (ch.chain_outputs), which need a copy of them made now.
    modal = [str(members[n].node.target) for n in spectral_ops
             if members[n].op.bn is not None and members[n].node.op == "call_module"]
    if modal:
        reason += "; in training mode it runs its original ops (BatchNorm)"
    activations = []
    poly_plans = {}
    for n in comp:
        m = members[n]
        if m.op.kind != "act" or best.labels[n] != "F":
            continue
        mode = best.modes.get(n, "exact")
        if mode == "poly":
            fit = fits[n]
            plan = ch.PolyPlan(fit.coeffs, best.poly_mask.get(n, False), fit.error)
            poly_plans[n] = plan
            activations.append(SpectralActivationRecord(n, m.op.activation, "poly", fit.error,
                                                        fit.coeffs.tolist(), plan.mask_input))
        else:
            activations.append(SpectralActivationRecord(n, m.op.activation, "exact"))
    for consumer, operand in best.masks:
        activations.append(SpectralActivationRecord(f"{operand}->{consumer}", "identity (mask)", "exact"))
    sizes = {}
    for n in comp:
        if members[n].continues:
            sizes[n] = problem.tensor_info(members[n].node)[1]
        for i in members[n].op.inputs:
            sizes[i.name] = problem.tensor_info(i)[1]
    plan = ch.ChainPlan(name=name, grid=best.grid, rank=rank, dtype=problem.dtype, convs=anchors,
                        spectral=spectral_ops, modes={n: best.modes.get(n, "exact") for n in spectral_ops
                                                      if members[n].op.kind == "act"},
                        poly=poly_plans, masks=list(best.masks), sizes=sizes,
                        ops={n: members[n].op for n in spectral_ops},
                        inline_device=_device(members[anchors[0]].node) if ctx.report.frontend == "dynamo" else None,
                        ends=frozenset(n for n in anchors if not members[n].continues),
                        written=frozenset(t.name for t in problem.read_tensors() if t.name in written),
                        modal=modal, original=ch.original_region(gm, anchors + spectral_ops) if modal else None)
    # The convs of a fused chain are lowered onto its grid.
    for n in anchors:
        conv_plan = members[n].plan
        geometry = dataclasses.replace(conv_plan.geometry, fft_size=tuple(best.grid))
        members[n].node.meta[node_meta.PLAN] = dataclasses.replace(conv_plan, geometry=geometry)
    eliminated = max(0, per_conv_t["forward"] - best.transforms["forward"])
    return ChainDecision(name, conv_names, _describe_ops(comp, members, best.labels, best.modes, best.masks),
                         True, reason, padding, tuple(best.grid), eliminated, activations, cost,
                         best.transforms, per_conv_t, plan=plan)



def _device(node: fx.Node) -> str:
    for key in ("example_value", "val"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            return str(value.device)
    return "cpu"
