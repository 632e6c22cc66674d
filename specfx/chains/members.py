"""Chains read off an fx graph: the graph as a ``networkx.DiGraph``, its members (the
anchors and the chainable ops of one spatial rank, as :class:`.chain.Member`), the
connected components that are chains, and each chain's reads as a :class:`.chain.Chain`.

*Anchors* are the convs ``plan_convs`` lowered (fp32/fp64, no spatial pre-padding); the
ops between them that :func:`.recognize.classify` recognizes are *chainable*. The candidate
region is every chainable node on a path of chain edges from an anchor's output (stride 1
only: a strided conv can end a chain, not continue one) to an anchor's input; a chain is a
connected component of anchors and region nodes.

The fx-facing side of the package: it may import :mod:`.recognize`, :mod:`.chain`,
:mod:`.plan` and ``specfx`` modules below the passes (canonical forms, node meta, the cost
model); the pure analyses (:mod:`.support`, :mod:`.placement`) read only what it builds.
"""

from __future__ import annotations

from typing import Optional

import networkx as nx
import torch
import torch.fx as fx

from specfx import cost_model as cm
from specfx import node_meta
from specfx.canonical import conv_site, tensor_info, weight_shape

from .chain import Chain, Member
from .plan import ConvPlan
from .recognize import CHAIN_DTYPES, ChainOp, OpKind, classify, conv_geometry_of, direct_conv_ok, rows_and_size


# --- the graph -----------------------------------------------------------------------------

def _operand_positions(node: fx.Node) -> list[tuple[fx.Node, str]]:
    """Every node ``node`` reads, with where (``args[0][1]``, ``kwargs['x']``), once per read."""
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


# --- members -------------------------------------------------------------------------------

def _conv_member(gm: fx.GraphModule, node: fx.Node, op: ChainOp, rank: int,
                 plan: Optional[ConvPlan]) -> Optional[Member]:
    """A conv as a member: an anchor (``plan``: its ConvPlan) or a conv kept direct."""
    site = op.site
    info_in, info_out = rows_and_size(site.input, rank), rows_and_size(node, rank)
    w_shape = weight_shape(gm, site)
    if info_in is None or info_out is None or w_shape is None:
        return None
    batch, cin, _, dtype = info_in
    _, cout, out_size, _ = info_out
    kernel = tuple(int(k) for k in w_shape[2:])
    if plan is not None:
        g = plan.geometry
        dilation, left, stride, circular = g.dilation, g.shift, g.stride, g.circular
    else:
        dilation, pads = conv_geometry_of(site, kernel)
        left, stride, circular = tuple(p[0] for p in pads), tuple(site.stride), site.padding_mode == "circular"
    shape = cm.ConvShape(batch=batch, in_channels=cin, out_channels=cout, groups=site.groups, kernel_size=kernel,
                         out_size=tuple(out_size), element_bytes=dtype.itemsize)
    return Member(node.name, OpKind.CONV, (site.input.name,), plan is not None, batch * cin, batch * cout, cout,
                  batch, tuple(out_size), kernel, tuple(dilation), tuple(left), tuple(stride), circular, shape,
                  tuple(plan.geometry.fft_size) if plan is not None else ())


def _anchor_excluded(plan: ConvPlan, dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why a lowered conv cannot anchor a chain (None: it can)."""
    g = plan.geometry
    if g.pre_pad is not None:
        return f"{g.pre_pad[0]} padding is done spatially before the transform"
    if g.overlap_save is not None:
        return "blocked (overlap-save) lowering"
    if g.selection is not None:
        # A chain's spectrum holds every sample; this conv's transform must not.
        return "it reads only some of its input's samples, selected before its transform"
    if dtype not in CHAIN_DTYPES or plan.out_dtype != dtype:
        return f"dtype {dtype}: chains run in fp32 or fp64"
    return None


def _member(gm: fx.GraphModule, node: fx.Node, rank: int, written: set[str]) -> Optional[tuple[Member, ChainOp]]:
    """``node`` as a member of a chain of rank ``rank``, if it can be one."""
    plan = node.meta.get(node_meta.PLAN)
    if plan is not None and plan.lowered:
        site = conv_site(gm, node)
        dtype = (tensor_info(site.input) or (None, None))[1]
        if site.rank != rank or _anchor_excluded(plan, dtype) is not None:
            return None
        op = ChainOp(OpKind.CONV, [site.input], site=site)
        member = _conv_member(gm, node, op, rank, plan)
        return None if member is None else (member, op)
    op = classify(gm, node, rank)
    if op is None:
        return None
    out = rows_and_size(node, rank)
    ins = [rows_and_size(i, rank) for i in op.inputs]
    if out is None or any(i is None for i in ins) or out[3] not in CHAIN_DTYPES or any(i[3] != out[3] for i in ins):
        return None
    # An in-place op is a chain op only where nothing else sees its write.
    if op.inplace and op.inputs[0].name in written:
        return None
    if op.kind is OpKind.CONV:
        if direct_conv_ok(op.site) is not None:
            return None
        member = _conv_member(gm, node, op, rank, None)
        return None if member is None else (member, op)
    batch, channels, size, dtype = out
    member = Member(node.name, op.kind, tuple(i.name for i in op.inputs), rows_in=ins[0][0] * ins[0][1],
                    rows_out=batch * channels, channels_out=channels, batch=batch, size_out=size)
    if op.kind is OpKind.POOL:
        member.kernel, member.dilation = op.kernel, (1,) * rank
        member.left, member.stride = op.padding, (1,) * rank
        member.shape = cm.ConvShape(batch=batch, in_channels=channels, out_channels=channels, groups=channels,
                                    kernel_size=op.kernel, out_size=size, element_bytes=dtype.itemsize)
    return member, op


def chain_members(gm: fx.GraphModule, rank: int,
                  written: set[str]) -> tuple[dict[str, Member], dict[str, ChainOp]]:
    """Every anchor and chainable op of spatial rank ``rank`` (``written``:
    :func:`specfx.chains.writes.observed_writes`), with what each reads and the prefix of
    its output anything reads (``Member.needed``)."""
    members, ops = {}, {}
    for node in gm.graph.nodes:
        found = _member(gm, node, rank, written)
        if found is not None:
            members[node.name], ops[node.name] = found
            found[0].written = node.name in written
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, m in members.items():
        needed = [0] * rank
        for user in nodes[name].users:
            reader = members.get(user.name)
            crop = reader is not None and reader.kind.view and reader.inputs[0] == name
            needed = [max(a, b) for a, b in zip(needed, reader.size_out if crop else m.size_out)]
        m.needed = tuple(needed)
    return members, ops


# --- chains --------------------------------------------------------------------------------

def chain_edges(graph: nx.DiGraph, members: dict[str, Member]) -> nx.DiGraph:
    """The edges of the fx ``DiGraph`` along which a value can stay a spectrum: producer →
    member, where the member reads the producer as a chain input (not, e.g., as the
    per-channel factor of a multiplication), and the producer is a member whose output
    can continue (not a strided conv)."""
    edges = nx.DiGraph()
    for name, m in members.items():
        for producer in graph.predecessors(name):
            if producer in m.inputs and producer in members and members[producer].continues:
                edges.add_edge(producer, name, positions=graph.edges[producer, name]["positions"])
    return edges


def components(order: dict[str, int], members: dict[str, Member], graph: nx.DiGraph) -> list[list[str]]:
    """Chains, in graph ``order``: the connected components of anchors and of the
    chainable ops that lie on an anchor → ... → anchor path of chain edges."""
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
    comps = [sorted(c, key=order.__getitem__) for c in nx.connected_components(links)]
    return sorted((c for c in comps if any(members[n].anchor for n in c)), key=lambda c: order[c[0]])


def chain_of(comp: list[str], members: dict[str, Member], ops: dict[str, ChainOp],
             nodes: dict[str, fx.Node], rank: int) -> Chain:
    """The chain ``comp`` with the sizes and readers of the tensors it reads and makes."""
    tensors = list(dict.fromkeys([*comp, *(i for n in comp for i in members[n].inputs)]))
    sizes, readers, elsewhere = {}, {}, {}
    for t in tensors:
        node = nodes[t]
        batch, channels, size, _ = rows_and_size(node, rank)
        sizes[t] = (batch * channels, size)
        chain_reads = [u.name for u in node.users if u.name in ops and node in ops[u.name].inputs]
        readers[t], elsewhere[t] = tuple(chain_reads), len(chain_reads) < len(node.users)
    return Chain(comp, members, sizes, readers, elsewhere)
