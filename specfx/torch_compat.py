"""The private torch APIs specfx relies on outside its ops, each behind one function that
checks for it and says what is lost without it.

pyproject accepts a range of torch versions; a private name that a version renames must
cost a feature, not an import error. (The ops' dispatcher route has its own seam in
:mod:`specfx.ops.library`.)
"""

from __future__ import annotations

from typing import Callable

import torch.fx as fx


def add_deepcopy_hook(gm: fx.GraphModule, hook: Callable[[fx.GraphModule], None]) -> bool:
    """Run ``hook(copy)`` on every ``copy.deepcopy`` of ``gm``, through
    ``GraphModule._register_deepcopy_hook`` (``GraphModule.__deepcopy__`` rebuilds the copy
    from its graph and keeps none of the module's other attributes). Returns whether the
    hook could be registered; without it, a copy of an optimized module loses what the
    hook restores (its report, its buffers' non-persistence)."""
    register = getattr(gm, "_register_deepcopy_hook", None)
    if register is None:
        return False
    register(hook)
    return True


def rename_as_fresh(graph: fx.Graph, nodes: list[fx.Node]) -> bool:
    """Give ``nodes`` the names a fresh trace of ``graph`` would give them, through fx's
    private name table (``Graph._graph_namespace``): fx never reuses an erased node's name,
    so a rewritten graph's names differ from those of the same graph traced anew. Returns
    whether it could; names are cosmetic (diffs and a second optimize's code read them), so
    without the table they stay as they are."""
    try:
        namespace = graph._graph_namespace
        namespace._used_names = {n.name for n in graph.nodes} - {n.name for n in nodes}
        namespace._base_count = {}
        for node in nodes:
            base = node.target if node.op == "get_attr" else graph._target_to_str(node.target)
            name = namespace.create_name(base, None)
            node.name = name
            namespace._rename_object(node, name)
    except (AttributeError, TypeError):  # fx internals changed
        return False
    return True
