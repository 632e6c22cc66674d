"""Which graph nodes write into their operands or act beyond their result, and dead-code
elimination that keeps them.

``torch.fx.Graph.eliminate_dead_code`` treats every ``call_method`` and most Python-level
``call_function`` nodes as pure: ``x.sub_(m)``, ``F.relu(y, inplace=True)`` or
``torch.relu_(y)`` whose result nothing reads would be deleted, and with them the
mutation the rest of the program sees. Every pass of specfx cleans up with
:func:`eliminate_dead_code` from here instead, and chain analysis asks
:func:`written_operands` which values a node writes into.
"""

from __future__ import annotations

import inspect
import operator
from typing import Any, Optional

import torch.fx as fx
import torch.nn as nn

from .canonical import bind_schema

# Python's augmented assignments on tensors (``x += y`` traces to ``operator.iadd``) and
# item assignment write into their first operand.
_WRITING_OPERATORS = frozenset({
    operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.ifloordiv, operator.imod, operator.ipow, operator.imatmul, operator.iand, operator.ior,
    operator.ixor, operator.ilshift, operator.irshift,
})
_AUGMENTED = frozenset({"add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor",
                        "lshift", "rshift"})

# Tensor methods that act on state beyond their result and their operands.
_EFFECTFUL_METHODS = frozenset({"backward", "register_hook", "retain_grad", "record_stream"})


def _inplace_name(name: str) -> bool:
    """``add_``, ``relu_``, ``masked_fill_`` (in-place by torch's naming), the in-place
    dunders (``__iadd__``) and ``__setitem__``/``__delitem__``."""
    if name.startswith("__") and name.endswith("__"):
        return name in ("__setitem__", "__delitem__") or (name.startswith("__i") and name[3:-2] in _AUGMENTED)
    return name.endswith("_")


def _passes_inplace(node: fx.Node) -> bool:
    """Whether the call passes ``inplace=True``, by keyword or position."""
    if node.kwargs.get("inplace") is True:
        return True
    try:
        bound = inspect.signature(node.target).bind_partial(*node.args, **node.kwargs)
    except (TypeError, ValueError):  # builtins without a signature, or a mismatch
        return False
    return bound.arguments.get("inplace") is True


def _owner(gm: Optional[fx.GraphModule], node: fx.Node) -> Optional[fx.GraphModule]:
    return gm if gm is not None else node.graph.owning_module


def _writes_first_operand(gm: Optional[fx.GraphModule], node: fx.Node) -> bool:
    """An in-place method, function, operator or module (``inplace=True``)."""
    if node.op == "call_module":
        owner = _owner(gm, node)
        return owner is not None and getattr(owner.get_submodule(str(node.target)), "inplace", False) is True
    if node.op == "call_method":
        return _inplace_name(str(node.target))
    if node.op == "call_function" and getattr(node.target, "_schema", None) is None:
        return node.target in _WRITING_OPERATORS or _inplace_name(getattr(node.target, "__name__", "") or "") \
            or _passes_inplace(node)
    return False


def _schema_written(node: fx.Node) -> list[Any]:
    """The arguments an operator's schema marks written (``Tensor(a!)``)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return []
    bound = bind_schema(node.target, node.args, node.kwargs)
    return [bound.get(a.name) for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write]


def written_operands(gm: Optional[fx.GraphModule], node: fx.Node) -> list[fx.Node]:
    """The graph values ``node`` writes into: the first operand of an in-place method,
    function, operator or module, an ``out=`` tensor, the arguments an operator's schema
    marks written."""
    written = [node.kwargs["out"]] if isinstance(node.kwargs.get("out"), fx.Node) else []
    written += [v for v in _schema_written(node) if isinstance(v, fx.Node)]
    if _writes_first_operand(gm, node) and node.args and isinstance(node.args[0], fx.Node):
        written.append(node.args[0])
    return written


def _module_has_side_effect(module: nn.Module) -> bool:
    if getattr(module, "_is_impure", False):
        return True
    # Batch norm in training mode updates its running statistics on every call.
    return isinstance(module, nn.modules.batchnorm._NormBase) and module.training \
        and module.track_running_stats


def has_side_effect(node: fx.Node, gm: Optional[fx.GraphModule] = None) -> bool:
    """Whether running ``node`` matters even when nothing reads its result: placeholders
    and outputs, every write into an operand (:func:`written_operands`, or an in-place call
    on a constant), effectful tensor methods (``backward``), impure modules and batch norms
    that update running statistics, and whatever torch itself calls impure."""
    if node.op in ("placeholder", "output"):
        return True
    if node.kwargs.get("out") is not None or _schema_written(node) or _writes_first_operand(gm, node):
        return True
    if node.op == "call_method":
        return str(node.target) in _EFFECTFUL_METHODS
    if node.op == "call_module":
        owner = _owner(gm, node)
        return owner is not None and _module_has_side_effect(owner.get_submodule(str(node.target)))
    return node.op == "call_function" and node.is_impure()


def eliminate_dead_code(gm: fx.GraphModule) -> bool:
    """Remove the nodes whose results nothing reads and that have no side effect
    (:func:`has_side_effect`); returns whether any was removed."""
    removed = False
    for node in reversed(list(gm.graph.nodes)):
        if not node.users and not has_side_effect(node, gm):
            gm.graph.erase_node(node)
            removed = True
    return removed
