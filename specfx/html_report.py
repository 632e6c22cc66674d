"""A graph diff (:class:`specfx.diff.GraphDiff`) as one self-contained HTML page.

Everything is inline: CSS in a ``<style>`` element, drawings as inline SVG, no scripts,
fonts, images or links to fetch, so the page reads the same offline and can be mailed or
attached to an issue. All text from graphs and reports is escaped.
"""

from __future__ import annotations

import difflib
import html
import importlib.util
import re
from typing import Any, Iterable, Optional, Protocol, Sequence

import torch.fx as fx

from .report import Report


class GraphDiffView(Protocol):
    """What a page is drawn from: the members of :class:`specfx.diff.GraphDiff` read here.
    (diff.py renders through this module, so this module names only the shape it needs.)"""

    before: fx.GraphModule
    after: fx.GraphModule
    rows: Sequence[Any]
    report: Optional[Report]
    notes: list[str]

    def summary(self) -> str: ...

    def code(self, which: str, file_comments: bool = False) -> str: ...

    def per_pass(self, context: int = 3, file_comments: bool = False) -> list[Any]: ...


# Unchanged runs of code longer than this many lines around a change are folded.
CONTEXT_LINES = 3

STATUS_COLOURS = {"kept": "#ffffff", "removed": "#ffd7d5", "added": "#d2f4d3"}

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em; color: #1f2328; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.15em; margin-top: 1.6em;
  border-bottom: 1px solid #d0d7de; padding-bottom: 0.2em; }
p.meta { color: #57606a; margin-top: 0; }
table { border-collapse: collapse; font-size: 12px; }
th, td { border: 1px solid #d0d7de; padding: 2px 6px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
code, pre, table.code td, table.nodes td { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
table.code { width: 100%; table-layout: fixed; }
table.code td { border: none; white-space: pre-wrap; word-break: break-all; padding: 0 6px; }
table.code td.ln { width: 3em; color: #8c959f; text-align: right; background: #f6f8fa; }
td.del, tr.removed td { background: #ffebe9; } td.ins, tr.added td { background: #e6ffec; }
td.del span.chg { background: #ffb3ad; } td.ins span.chg { background: #8ee6a0; }
td.empty { background: #f6f8fa; } td.fold { color: #57606a; background: #ddf4ff; text-align: center; }
pre.udiff { font-size: 12px; background: #f6f8fa; padding: 6px; overflow-x: auto; }
pre.udiff span { display: block; min-height: 1em; }
pre.udiff span.del { background: #ffebe9; } pre.udiff span.ins { background: #e6ffec; } pre.udiff span.hunk { color: #8250df; }
.lowered { color: #1a7f37; font-weight: 600; } .direct { color: #57606a; font-weight: 600; }
.note { background: #fff8c5; border: 1px solid #d4a72c; padding: 4px 8px; font-size: 13px; }
.drawings { display: flex; gap: 1em; align-items: flex-start; } .drawings > div { overflow: auto; max-width: 50%; }
td.num { text-align: right; } table.nodes td { white-space: nowrap; }
"""


def render(diff: GraphDiffView, title: str) -> str:
    """The whole page."""
    parts = [f"<h1>{_e(title)}</h1>", f'<p class="meta">{_e(diff.summary())}{_e(_report_line(diff.report))}</p>']
    parts += [f'<p class="note">{_e(note)}</p>' for note in diff.notes]
    if diff.report is not None:
        parts += ["<h2>Decisions</h2>", _decisions(diff.report), "<h2>What each pass did</h2>", _passes(diff)]
    parts += ["<h2>Graph code, before → after</h2>",
              _side_by_side(diff.code("before").splitlines(), diff.code("after").splitlines()),
              "<h2>Nodes</h2>", _nodes(diff), "<h2>Graphs</h2>", _drawings(diff)]
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
            f"<title>{_e(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
            + "\n".join(parts) + "\n</body>\n</html>\n")


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _report_line(report: Optional[Report]) -> str:
    if report is None:
        return ""
    line = f" · front end {report.frontend}, policy {report.policy!r}, {len(report.lowered)} of " \
           f"{len(report.decisions)} convolutions lowered"
    if report.verified_error is not None:
        line += f", verified: max error {report.verified_error:.2e} of the output scale"
    return line


def _table(header: Iterable[str], rows: Iterable[str], css_class: str = "") -> str:
    head = "".join(f"<th>{_e(cell)}</th>" for cell in header)
    attr = f' class="{css_class}"' if css_class else ""
    return f"<table{attr}>\n<tr>{head}</tr>\n" + "\n".join(rows) + "\n</table>"


def _decisions(report: Report) -> str:
    rows = []
    for d in report.decisions:
        mark = '<span class="lowered">FFT</span>' if d.lowered else '<span class="direct">direct</span>'
        c = d.cost
        figures = ["", "", "", "", "", ""] if c is None else [
            f"{c.direct_gflop:.3g}", f"{c.direct_ms:.3g}", f"{c.fft_gflop:.3g}", f"{c.fft_ms:.3g}",
            "x".join(map(str, c.fft_size)), f"{c.speedup:.2f}x"]
        cells = "".join(f'<td class="num">{_e(f)}</td>' for f in figures)
        rows.append(f"<tr><td><code>{_e(d.name)}</code></td><td>{mark}</td><td>{_e(d.description)}</td>"
                    f"<td>{_e(d.reason)}</td>{cells}</tr>")
    notes = "".join(f'<p class="note">{_e(note)}</p>' for note in report.capture_notes)
    return notes + _table(("conv", "path", "description", "reason", "direct GFLOP", "direct ms (est.)",
                           "FFT GFLOP", "FFT ms (est.)", "FFT grid", "est. speedup"), rows)


def _passes(diff: GraphDiffView) -> str:
    blocks = []
    for entry in diff.per_pass():
        lines = entry.diff.splitlines()[2:]  # the ---/+++ header names the passes already
        added = sum(line.startswith("+") for line in lines)
        removed = sum(line.startswith("-") for line in lines)
        state = f"modified: −{removed} +{added} lines" if entry.modified else "graph unchanged"
        body = _unified_html(lines) if lines else "<p>No change to the graph code.</p>"
        blocks.append(f"<details><summary><code>{_e(entry.name)}</code> — {_e(state)}</summary>\n{body}</details>")
    return "\n".join(blocks) or "<p>The report records no passes.</p>"


def _unified_html(lines: list[str]) -> str:
    kinds = {"+": "ins", "-": "del", "@": "hunk"}
    spans = "".join(f'<span class="{kinds.get(line[:1], "ctx")}">{_e(line)}</span>' for line in lines)
    return f'<pre class="udiff">{spans}</pre>'


def _side_by_side(before: list[str], after: list[str]) -> str:
    """Two columns of code with changed lines paired up and long unchanged runs folded."""
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)  # see diff.unified_diff
    rows: list[str] = []
    opcodes = matcher.get_opcodes()
    changed = any(tag != "equal" for tag, *_ in opcodes)
    for index, (tag, i1, i2, j1, j2) in enumerate(opcodes):
        if tag == "equal":
            head = 0 if index == 0 else CONTEXT_LINES
            tail = 0 if index == len(opcodes) - 1 else CONTEXT_LINES
            if changed and i2 - i1 > head + tail + 1:
                rows += [_code_row(i1 + k, before[i1 + k], j1 + k, after[j1 + k], "") for k in range(head)]
                rows.append(f'<tr><td class="fold" colspan="4">⋯ {i2 - i1 - head - tail} unchanged lines ⋯</td></tr>')
                rows += [_code_row(i2 - tail + k, before[i2 - tail + k], j2 - tail + k, after[j2 - tail + k], "")
                         for k in range(tail)]
            else:
                rows += [_code_row(i1 + k, before[i1 + k], j1 + k, after[j1 + k], "") for k in range(i2 - i1)]
            continue
        for i, j in _pair_lines(before[i1:i2], after[j1:j2]):
            rows.append(_code_row(i1 + (i or 0), None if i is None else before[i1 + i],
                                  j1 + (j or 0), None if j is None else after[j1 + j], "changed"))
    if not changed:
        rows.insert(0, '<tr><td class="fold" colspan="4">the two graphs have the same code</td></tr>')
    return ('<table class="code">\n<colgroup><col style="width:3em"/><col/><col style="width:3em"/><col/></colgroup>\n'
            + "\n".join(rows) + "\n</table>")


_DEFINITION = re.compile(r"\s*([A-Za-z_]\w*)\s*[:=]")
_TOKEN = re.compile(r"\w+|\s+|[^\w\s]")


def _pair_lines(left: list[str], right: list[str]) -> list[tuple[Optional[int], Optional[int]]]:
    """Rows for a block of changed lines: lines defining the same variable (the same fx
    node) side by side, in order; every other line alone on its side."""
    def defined(line: str) -> Optional[str]:
        match = _DEFINITION.match(line)
        return match.group(1) if match else None

    right_names = [defined(line) for line in right]
    pairs: list[tuple[Optional[int], Optional[int]]] = []
    j = 0
    for i, line in enumerate(left):
        name = defined(line)
        match = next((k for k in range(j, len(right)) if name is not None and right_names[k] == name), None)
        if match is None:
            pairs.append((i, None))
            continue
        pairs += [(None, k) for k in range(j, match)]
        pairs.append((i, match))
        j = match + 1
    return pairs + [(None, k) for k in range(j, len(right))]


def _code_row(i: int, left: Optional[str], j: int, right: Optional[str], change: str) -> str:
    if change and left is not None and right is not None:
        left_html, right_html = _highlight_pair(left, right)
    else:
        left_html, right_html = _e(left or ""), _e(right or "")
    left_cell = f'<td class="ln">{i + 1}</td><td class="{"del" if change else ""}">{left_html}</td>' \
        if left is not None else '<td class="ln"></td><td class="empty"></td>'
    right_cell = f'<td class="ln">{j + 1}</td><td class="{"ins" if change else ""}">{right_html}</td>' \
        if right is not None else '<td class="ln"></td><td class="empty"></td>'
    return f"<tr>{left_cell}{right_cell}</tr>"


def _highlight_pair(left: str, right: str) -> tuple[str, str]:
    """Both lines with the tokens that differ between them marked (whole identifiers, so
    ``conv`` → ``from_spectrum_default`` is not shown as a scatter of common letters)."""
    left_tokens, right_tokens = _TOKEN.findall(left), _TOKEN.findall(right)
    matcher = difflib.SequenceMatcher(None, left_tokens, right_tokens, autojunk=False)
    out_left, out_right = [], []
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        a, b = _e("".join(left_tokens[i1:i2])), _e("".join(right_tokens[j1:j2]))
        if tag == "equal":
            out_left.append(a)
            out_right.append(b)
            continue
        if a:
            out_left.append(f'<span class="chg">{a}</span>')
        if b:
            out_right.append(f'<span class="chg">{b}</span>')
    return "".join(out_left), "".join(out_right)


def _nodes(diff: GraphDiffView) -> str:
    rows = []
    for row in diff.rows:
        cells = (row.status, row.name, row.op, row.target, row.shape, row.module, row.link)
        rows.append(f'<tr class="{row.status}">' + "".join(f"<td>{_e(c)}</td>" for c in cells) + "</tr>")
    return _table(("status", "node", "op", "target", "shape", "module", "replaced by / lowered from"), rows, "nodes")


def graph_dot(gm: fx.GraphModule, statuses: dict[str, str], name: str) -> str:
    """Graphviz DOT source of ``gm``'s graph, each node filled by its status's colour."""
    lines = [f'digraph "{name}" {{', "  rankdir=TB;",
             '  node [shape=box, style="rounded,filled", fontname="monospace", fontsize=10];']
    for node in gm.graph.nodes:
        colour = STATUS_COLOURS[statuses.get(node.name, "kept")]
        label = _dot_string(f"{node.name}\n{node.op}")
        lines.append(f'  "{node.name}" [label="{label}", fillcolor="{colour}"];')
        lines += [f'  "{source.name}" -> "{node.name}";' for source in node.all_input_nodes]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _dot_string(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class DrawingUnavailable(Exception):
    """The graphs cannot be drawn here; the message says why."""


def render_svg(dot_source: str) -> str:
    """DOT source rendered to an inline ``<svg>`` element by pydot or graphviz (either
    needs Graphviz's ``dot`` program); raises :class:`DrawingUnavailable` otherwise."""
    try:
        if importlib.util.find_spec("pydot") is not None:
            import pydot

            svg = pydot.graph_from_dot_data(dot_source)[0].create_svg()
        elif importlib.util.find_spec("graphviz") is not None:
            import graphviz

            svg = graphviz.Source(dot_source).pipe(format="svg")
        else:
            raise DrawingUnavailable("neither pydot nor graphviz is installed")
    except DrawingUnavailable:
        raise
    except Exception as err:  # each renderer fails its own way (e.g. no `dot` program)
        raise DrawingUnavailable(f"rendering failed: {type(err).__name__}: {err}") from err
    text = svg.decode("utf-8") if isinstance(svg, bytes) else svg
    # Drop the XML prolog and DOCTYPE (which names an external DTD): HTML takes bare <svg>.
    return text[text.index("<svg"):]


def _drawings(diff: GraphDiffView) -> str:
    # Per graph: a removed and an added node may share a name (with another op or target).
    removed = {row.name: "removed" for row in diff.rows if row.status == "removed"}
    added = {row.name: "added" for row in diff.rows if row.status == "added"}
    try:
        before = render_svg(graph_dot(diff.before, removed, "before"))
        after = render_svg(graph_dot(diff.after, added, "after"))
    except DrawingUnavailable as why:
        return (f'<p class="note">Graph drawings omitted: {_e(why)}. Install pydot (or graphviz) and '
                f'Graphviz\'s <code>dot</code> program to include them.</p>')
    return (f'<div class="drawings"><div><h3>before (removed in red)</h3>{before}</div>'
            f'<div><h3>after (added in green)</h3>{after}</div></div>')
