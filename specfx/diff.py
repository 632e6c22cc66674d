"""What specfx did to a graph: a node-level and a code-level diff, before → after.

:func:`diff` puts the original model's graph next to the optimized one. Nodes are
matched by name, op and target (fx keeps the names of untouched nodes), so each node
is *kept*, *removed* or *added*; a removed convolution's replacement is found through
the ``specfx_replaces`` meta the rewrite leaves on the node that now computes its value,
never by guessing from names. :func:`diff_passes` shows what each pass of the pipeline
changed, from the code the report records after every pass.
"""

from __future__ import annotations

import dataclasses
import difflib
import pathlib
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.node import _get_qualified_name
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from . import node_meta
from .api import ExampleInputs, _as_tuple, _snapshot
from .capture import FRONTENDS, capture, preserved_state
from .html_report import render
from .report import Report

STATUSES = ("kept", "removed", "added")
UNKNOWN = "?"


@dataclasses.dataclass(frozen=True)
class NodeRow:
    """One node of either graph, and what happened to it.

    ``replaced_by`` (removed nodes) names the node of the new graph that computes the
    removed node's value; ``lowered_from`` (added nodes) names the convolution, as the
    report names it, whose rewrite added the node.
    """

    status: str
    name: str
    op: str
    target: str
    shape: str
    module: str
    replaced_by: str = ""
    lowered_from: str = ""

    @property
    def link(self) -> str:
        """``→ replacement`` for a removed node, ``← conv`` for a lowered one, else ''."""
        if self.replaced_by:
            return f"→ {self.replaced_by}"
        return f"← {self.lowered_from}" if self.lowered_from else ""


@dataclasses.dataclass(frozen=True)
class PassDiff:
    """What one pass changed: a unified diff of the graph code before and after it."""

    name: str
    modified: bool
    diff: str


def unified_diff(before: str, after: str, fromfile: str = "before", tofile: str = "after",
                 context: int = 3) -> str:
    """A unified diff of two texts ('' when they are equal).

    ``difflib.unified_diff`` cannot turn off the matcher's "autojunk" heuristic, which
    treats lines repeated in more than 1% of a long text as junk; in graph code those are
    lines like ``return ...`` and blank lines, and junking them misaligns the hunks.
    """
    a, b = before.splitlines(), after.splitlines()
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    lines = []
    for group in matcher.get_grouped_opcodes(context):
        first, last = group[0], group[-1]
        lines.append(f"@@ -{_hunk_range(first[1], last[2])} +{_hunk_range(first[3], last[4])} @@")
        for tag, i1, i2, j1, j2 in group:
            if tag == "equal":
                lines += [" " + line for line in a[i1:i2]]
                continue
            lines += ["-" + line for line in a[i1:i2]]
            lines += ["+" + line for line in b[j1:j2]]
    if not lines:
        return ""
    return "\n".join([f"--- {fromfile}", f"+++ {tofile}", *lines]) + "\n"


def _hunk_range(start: int, stop: int) -> str:
    """A hunk header's ``start,length`` as unified diffs write it (1-based; an empty range
    names the line before it)."""
    length = stop - start
    if length == 1:
        return str(start + 1)
    return f"{start + 1 if length else start},{length}"


def strip_file_comments(code: str) -> str:
    """``code`` without the ``# File: ...`` source-location comments fx prints for nodes
    with a recorded stack trace (and its ``# No stacktrace found`` counterpart)."""
    return "\n".join(line for line in code.splitlines()
                     if not line.lstrip().startswith(("# File:", "# No stacktrace found")))


def diff_passes(source: Union[fx.GraphModule, Report], context: int = 3,
                file_comments: bool = False) -> list[PassDiff]:
    """The diff each pass of the pipeline made, in order.

    Args:
        source: the result of :func:`specfx.optimize` (or its ``specfx_report``, or the
            report of :func:`specfx.explain`, whose passes are analysis passes only).
        context: lines of context around each change.
        file_comments: keep the ``# File:`` comments fx prints for nodes with a stack trace.

    The first pass is diffed against the graph as captured; a pass that did not modify
    the graph has an empty diff.
    """
    report = source if isinstance(source, Report) else getattr(source, "specfx_report", None)
    if report is None:
        raise ValueError(f"{type(source).__name__} has no specfx report: per-pass diffs need the "
                         f"result of specfx.optimize or a specfx Report")
    if report.captured_code is None:
        raise ValueError("the report does not hold the captured graph code, so the first pass "
                         "has nothing to be diffed against")

    def clean(code: str) -> str:
        return code if file_comments else strip_file_comments(code)

    diffs, previous, previous_name = [], clean(report.captured_code), "capture"
    for record in report.passes:
        code = clean(record.code)
        diffs.append(PassDiff(record.name, record.modified,
                              unified_diff(previous, code, f"after {previous_name}", f"after {record.name}", context)))
        previous, previous_name = code, record.name
    return diffs


class GraphDiff:
    """The difference between two graphs of the same model; see :func:`diff`.

    Attributes:
        before, after: the graph modules compared (copies, with the shapes found filled
            into their node meta; the originals are not modified).
        rows: one :class:`NodeRow` per node of either graph, in graph order.
        report: the specfx report of ``after``, if it has one.
        notes: what could not be worked out (e.g. why shapes are missing).
    """

    def __init__(self, before: fx.GraphModule, after: fx.GraphModule, rows: list[NodeRow],
                 report: Optional[Report], notes: list[str]) -> None:
        self.before, self.after, self.rows, self.report, self.notes = before, after, rows, report, notes

    def names(self, status: str) -> list[str]:
        """Names of the nodes with ``status`` ('kept', 'removed' or 'added'), in order."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        return [row.name for row in self.rows if row.status == status]

    @property
    def removed(self) -> list[str]:
        """Nodes of ``before`` that ``after`` no longer has."""
        return self.names("removed")

    @property
    def added(self) -> list[str]:
        """Nodes of ``after`` that ``before`` did not have."""
        return self.names("added")

    @property
    def kept(self) -> list[str]:
        """Nodes present in both graphs (same name, op and target)."""
        return self.names("kept")

    def summary(self) -> str:
        """One line: how many nodes were kept, removed and added."""
        return ", ".join(f"{len(self.names(status))} {status}" for status in STATUSES)

    def code(self, which: str, file_comments: bool = False) -> str:
        """The readable code (``print_readable``, with shapes) of ``'before'`` or ``'after'``."""
        if which not in ("before", "after"):
            raise ValueError(f"which must be 'before' or 'after', got {which!r}")
        gm = self.before if which == "before" else self.after
        code = gm.print_readable(print_output=False)
        return code if file_comments else strip_file_comments(code)

    def unified(self, context: int = 3, file_comments: bool = False) -> str:
        """A unified diff of the readable graph code, before → after."""
        return unified_diff(self.code("before", file_comments), self.code("after", file_comments),
                            "before", "after", context)

    def table(self) -> str:
        """One line per node: status, op, target, shape and dtype, source module, and the
        node that replaced it (removed nodes) or the conv it was lowered from (added)."""
        header = ("status", "node", "op", "target", "shape", "module", "replaced by / lowered from")
        body = [(row.status, row.name, row.op, row.target, row.shape, row.module, row.link) for row in self.rows]
        widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
        return "\n".join("  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
                         for cells in [header, *body]) + "\n"

    def per_pass(self, context: int = 3, file_comments: bool = False) -> list[PassDiff]:
        """The diff each pass made; see :func:`diff_passes`."""
        if self.report is None:
            raise ValueError("after has no specfx report: per-pass diffs need the result of specfx.optimize")
        return diff_passes(self.report, context, file_comments)

    def html(self, title: str = "specfx diff") -> str:
        """The self-contained HTML page of :meth:`to_html`, as a string."""
        return render(self, title)

    def to_html(self, path: Union[str, pathlib.Path], title: str = "specfx diff") -> pathlib.Path:
        """Write one self-contained HTML page (nothing is fetched from the network): the
        side-by-side diff, the node table, the per-pass diffs, the report's decisions with
        their cost figures, and graph drawings where pydot or graphviz can render them."""
        path = pathlib.Path(path)
        path.write_text(self.html(title), encoding="utf-8")
        return path

    def __repr__(self) -> str:
        return f"GraphDiff({self.summary()})"


def diff(before: nn.Module, after: nn.Module, example_inputs: Optional[ExampleInputs] = None,
         *, frontend: Optional[str] = None) -> GraphDiff:
    """Compare two versions of a model's graph, typically ``model`` and ``specfx.optimize(model, ...)``.

    Args:
        before, after: graph modules, or plain modules, which are captured as
            :func:`specfx.optimize` captures them.
        example_inputs: inputs to capture plain modules with and to fill in the shapes the
            graphs lack (the rewrite's new nodes carry none). Default: tensors of the
            shapes and dtypes recorded on the placeholders of ``after`` (or ``before``).
            Each graph lacking shapes is run once on them.
        frontend: the front end to capture plain modules with. Default: the one that
            produced ``after``'s report, so both graphs have the same node names; else
            ``"auto"``.

    Raises:
        ValueError: a plain module is given and there are no inputs to capture it with.
        specfx.CaptureError: a plain module cannot be captured.
    """
    report = getattr(after, "specfx_report", None)
    report = report if isinstance(report, Report) else None
    if frontend is None:
        frontend = report.frontend if report is not None and report.frontend in FRONTENDS else "auto"
    if example_inputs is not None:
        inputs: Optional[tuple] = _as_tuple(example_inputs)
    else:
        inputs = _inputs_from_placeholders(after) or _inputs_from_placeholders(before)
    notes: list[str] = []
    before_gm, before_root = _graph_with_shapes(before, "before", inputs, frontend, notes)
    after_gm, after_root = _graph_with_shapes(after, "after", inputs, frontend, notes)
    return GraphDiff(before_gm, after_gm, _rows(before_gm, before_root, after_gm, after_root), report, notes)


def _inputs_from_placeholders(module: nn.Module) -> Optional[tuple]:
    """Random inputs of the shapes and dtypes on ``module``'s placeholders, if every one
    has them (fixed seed, so the same module gives the same inputs)."""
    if not isinstance(module, fx.GraphModule):
        return None
    specs = [_tensor_spec(node) for node in module.graph.find_nodes(op="placeholder")]
    if not specs or any(spec is None for spec in specs):
        return None
    return seeded_inputs(specs)


def seeded_inputs(specs: Sequence[tuple[tuple[int, ...], torch.dtype]]) -> tuple[torch.Tensor, ...]:
    """Random inputs of the ``(shape, dtype)`` pairs in ``specs``, from a fixed seed so
    that the same specs always give the same inputs (zeros for integer dtypes, e.g. token
    ids, whose valid range no random draw could know)."""
    generator = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, dtype=dtype, generator=generator) if dtype.is_floating_point
                 else torch.zeros(shape, dtype=dtype) for shape, dtype in specs)


def _tensor_spec(node: fx.Node) -> Optional[tuple[tuple[int, ...], torch.dtype]]:
    value = node.meta.get("tensor_meta", node.meta.get("val"))
    if not isinstance(value, (TensorMetadata, torch.Tensor)):
        return None
    shape = tuple(value.shape)
    # A dynamic (symbolic) size has no concrete value to make an input of.
    return (shape, value.dtype) if all(isinstance(d, int) for d in shape) else None


def _graph_with_shapes(module: nn.Module, role: str, inputs: Optional[tuple], frontend: str,
                       notes: list[str]) -> tuple[fx.GraphModule, fx.GraphModule]:
    """A copy of ``module``'s graph (captured if it is a plain module) whose nodes all
    carry shapes where ``inputs`` allow working them out, and the graph module it was
    copied from, which holds the whole module tree (the copy only holds what its graph
    reads: a module whose call was rewritten away becomes a bare holder of its weights)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"{role} must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(module, fx.GraphModule):
        if inputs is None:
            raise ValueError(f"{role} is a {type(module).__name__}, not a GraphModule: pass "
                             f"example_inputs to capture it")
        module, _ = capture(module, inputs, frontend)
    gm = _snapshot(module)
    if all(_shape_value(node) is not None for node in gm.graph.nodes):
        return gm, module
    if inputs is None:
        notes.append(f"no example inputs: shapes missing from {role} are shown as '{UNKNOWN}'")
        return gm, module
    try:
        with preserved_state(gm), torch.no_grad():
            ShapeProp(gm).propagate(*inputs)
    except Exception as err:  # any error the model raises; the diff stands without shapes
        notes.append(f"shapes missing from {role} are shown as '{UNKNOWN}': running it on the "
                     f"example inputs raised {type(err).__name__}: {err}")
    return gm, module


def _shape_value(node: fx.Node) -> Any:
    return node.meta.get("tensor_meta", node.meta.get("val"))


def _describe_value(value: Any) -> str:
    if isinstance(value, (TensorMetadata, torch.Tensor)):
        return f"{tuple(value.shape)} {str(value.dtype).replace('torch.', '')}"
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_describe_value(v) for v in value) + "]"
    return UNKNOWN if value is None else type(value).__name__


def _target_name(node: fx.Node) -> str:
    if node.op == "call_function":
        return _get_qualified_name(node.target)
    return str(node.target)


def _module_name(root: nn.Module, path: str) -> str:
    try:
        return f"{path} ({type(root.get_submodule(path)).__name__})"
    except AttributeError:  # e.g. an attribute set on a module after tracing
        return path


def _source_module(root: nn.Module, node: fx.Node) -> str:
    """The module whose forward produced ``node``: a called module, the owner of a fetched
    attribute, or the innermost entry of the node's module stack ('' for the root)."""
    if node.op == "call_module":
        return _module_name(root, str(node.target))
    if node.op == "get_attr":
        owner = str(node.target).rpartition(".")[0]
        return _module_name(root, owner) if owner else ""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path, kind = list(stack.values())[-1]
    if not path:
        return ""
    kind_name = kind.__name__ if isinstance(kind, type) else str(kind).rpartition(".")[2]
    return f"{path} ({kind_name})"


def _key(node: fx.Node) -> tuple[str, str, str]:
    return node.name, node.op, _target_name(node)


def _rows(before: fx.GraphModule, before_root: nn.Module, after: fx.GraphModule,
          after_root: nn.Module) -> list[NodeRow]:
    """One row per node, merged in graph order: each run of added nodes comes right after
    the removed nodes it stands in place of, as in a unified diff."""
    before_nodes, after_nodes = list(before.graph.nodes), list(after.graph.nodes)
    before_pos = {_key(node): i for i, node in enumerate(before_nodes)}
    after_keys = {_key(node) for node in after_nodes}
    replaced_by = {node.meta[node_meta.REPLACES]: node.name for node in after_nodes
                   if node_meta.REPLACES in node.meta}

    def row(root: nn.Module, node: fx.Node, status: str) -> NodeRow:
        return NodeRow(status, node.name, node.op, _target_name(node), _describe_value(_shape_value(node)),
                       _source_module(root, node),
                       replaced_by.get(node.name, "") if status == "removed" else "",
                       str(node.meta.get(node_meta.LOWERED_FROM, "")) if status == "added" else "")

    # Position in `before` of the next kept node at or after each node of `after`.
    next_kept = [len(before_nodes)] * (len(after_nodes) + 1)
    for i in range(len(after_nodes) - 1, -1, -1):
        next_kept[i] = before_pos.get(_key(after_nodes[i]), next_kept[i + 1])

    rows: list[NodeRow] = []
    cursor = 0  # nodes of `before` up to here have been placed

    def flush_removed(stop: int) -> None:
        rows.extend(row(before_root, node, "removed") for node in before_nodes[cursor:stop]
                    if _key(node) not in after_keys)

    for i, node in enumerate(after_nodes):
        stop = next_kept[i]
        if stop >= cursor:  # a kept node moved earlier than its old place flushes nothing
            flush_removed(stop)
            cursor = stop
        kept = _key(node) in before_pos
        rows.append(row(after_root, node, "kept" if kept else "added"))
        if kept and before_pos[_key(node)] == cursor:
            cursor += 1
    flush_removed(len(before_nodes))
    return rows
