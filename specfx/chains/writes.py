"""In-place writes a chain must not hide.

A chain keeps a tensor as a spectrum from where it is produced to where its chain readers
read it. An in-place write into that tensor (or into a view of it) in between would be
lost on the spectrum, and a write that only the in-place op's own result should see
(``relu_(y)`` while ``y`` is read elsewhere) would be invisible. So a value that some
write can be observed through never continues as a spectrum.
"""

from __future__ import annotations

import torch.fx as fx

from specfx.canonical import conv_site
from specfx.side_effects import written_operands

from .recognize import classify


def _alias_sources(gm: fx.GraphModule, node: fx.Node, rank: int) -> list[fx.Node]:
    """The values whose memory ``node``'s result may share: none for ops known to return a
    fresh tensor (convs, the chain ops but crops and identities, operators whose schema
    returns no alias), the written operand for an in-place op, every input for anything
    else."""
    if node.op in ("placeholder", "get_attr", "output"):
        return []
    written = written_operands(gm, node)
    if written:
        return written
    schema = getattr(node.target, "_schema", None)
    if node.op == "call_function" and schema is not None:
        return node.all_input_nodes if any(r.alias_info is not None for r in schema.returns) else []
    if conv_site(gm, node) is not None:
        return []
    op = classify(gm, node, rank)
    if op is not None and not op.kind.view:
        return []
    return node.all_input_nodes


def observed_writes(gm: fx.GraphModule, rank: int) -> set[str]:
    """Names of the values an in-place write can be observed through: every value sharing
    memory with a written operand, when anything but the writer reads one of them.

    ``z = relu_(y)`` with ``y`` read by nothing else is just ``z = relu(y)``: ``y`` is not
    listed. With ``y`` read elsewhere too (before or after the write: either way the
    reader depends on where the write happens), ``y`` and its views are."""
    sources = {n: _alias_sources(gm, n, rank) for n in gm.graph.nodes}
    views: dict[fx.Node, list[fx.Node]] = {n: [] for n in gm.graph.nodes}
    for node, shared in sources.items():
        for s in shared:
            views[s].append(node)
    observed: set[str] = set()
    for writer in gm.graph.nodes:
        for target in written_operands(gm, writer):
            group, stack = set(), [target]
            while stack:
                value = stack.pop()
                if value in group or value is writer:
                    continue
                group.add(value)
                stack += sources[value] + views[value]
            if any(u is not writer and u not in group for value in group for u in value.users):
                observed |= {value.name for value in group}
    return observed
