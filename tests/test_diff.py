"""specfx.diff: which nodes a known rewrite removes and adds, the text and HTML views."""

from __future__ import annotations

import difflib
import importlib.util
import re
from html.parser import HTMLParser

import pytest
import torch
import torch.nn as nn

import specfx
from specfx.diff import unified_diff
from specfx.html_report import DrawingUnavailable, graph_dot, render_svg

# What lower_convs adds for a conv, and the one node merge_convs makes of it.
SPECTRAL_NODES = {"to_spectrum_default", "spectral_mix_default", "from_spectrum_default"}
MERGED = "lowered_conv_default"


class DepthwiseNet(nn.Module):
    """One 31x31 depthwise conv, then a ReLU: the smallest graph with one lowering."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 31, padding=15, groups=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


@pytest.fixture(scope="module")
def lowered():
    torch.manual_seed(0)
    model = DepthwiseNet().eval()
    fast = specfx.optimize(model, (torch.randn(1, 4, 32, 32),), policy="always")
    return model, fast


def _defined(diff_text: str, sign: str) -> set[str]:
    """Names the ``sign`` ('-' or '+') lines of a unified diff of graph code assign."""
    return {m.group(1) for line in diff_text.splitlines()
            if line.startswith(sign) and not line.startswith(sign * 3)
            for m in [re.match(r"[-+]\s*(\w+)\s*[:=]", line)] if m}


# The lowered conv's call-time checks (specfx.guards): the conv module, the check of its
# geometry that hands on the weight, and the output dtype read from the weight.
CHECK_NODES = {"conv_1", "module_conv_weight", "getattr_1"}


def test_known_rewrite_removes_the_conv_and_adds_the_spectral_nodes(lowered):
    model, fast = lowered
    d = specfx.diff(model, fast)
    assert d.removed == ["conv"]
    assert set(d.added) == {MERGED, *CHECK_NODES, "conv_weight", "conv_bias"}
    assert d.kept == ["x", "relu", "output"]
    assert d.summary() == "3 kept, 1 removed, 6 added"


def test_replacement_is_tracked_through_node_meta(lowered):
    model, fast = lowered
    rows = {(row.status, row.name): row for row in specfx.diff(model, fast).rows}
    conv = rows["removed", "conv"]
    assert conv.replaced_by == MERGED
    assert (conv.op, conv.target, conv.module) == ("call_module", "conv", "conv (Conv2d)")
    assert conv.shape == "(1, 4, 32, 32) float32"
    assert rows["added", MERGED].lowered_from == "conv"
    # The rewrite's nodes carry no shapes of their own: diff ran the graph to find them.
    assert rows["added", MERGED].shape == "(1, 4, 32, 32) float32"
    assert rows["added", "conv_weight"].shape == "(4, 1, 31, 31) float32"


def test_rows_put_removed_nodes_before_what_replaces_them(lowered):
    model, fast = lowered
    order = [(row.status, row.name) for row in specfx.diff(model, fast).rows]
    assert order[:2] == [("kept", "x"), ("removed", "conv")]
    assert order[-2:] == [("kept", "relu"), ("kept", "output")]


def test_unified_diff_shows_exactly_the_rewritten_lines(lowered):
    model, fast = lowered
    text = specfx.diff(model, fast).unified()
    assert text.startswith("--- before\n+++ after\n@@ ")
    # relu is kept but reads another input, so its line changes too.
    assert _defined(text, "-") == {"conv", "relu"}
    assert _defined(text, "+") == {MERGED, *CHECK_NODES, "conv_weight", "conv_bias", "relu"}


def test_table_has_one_row_per_node(lowered):
    model, fast = lowered
    d = specfx.diff(model, fast)
    lines = d.table().splitlines()
    assert lines[0].split()[:4] == ["status", "node", "op", "target"]
    assert len(lines) == 1 + len(d.rows) == 1 + 3 + 1 + 6
    conv_line = next(line for line in lines if line.split()[:2] == ["removed", "conv"])
    assert conv_line.endswith(f"→ {MERGED}")


def test_no_rewrite_means_an_empty_diff():
    model = DepthwiseNet().eval()
    fast = specfx.optimize(model, (torch.randn(1, 4, 32, 32),), policy="never")
    d = specfx.diff(model, fast)
    assert d.removed == [] and d.added == []
    assert d.unified() == ""


def test_per_pass_diffs_show_what_each_pass_changed(lowered):
    _, fast = lowered
    entries = specfx.diff_passes(fast)
    assert [e.name for e in entries] == [p.name for p in fast.specfx_report.passes]
    changed = [e for e in entries if e.diff]
    assert all(e.modified for e in changed)
    (lowering,) = [e for e in changed if _defined(e.diff, "-") & {"conv"}]
    assert lowering.name == "lower_convs"
    assert SPECTRAL_NODES <= _defined(lowering.diff, "+")
    (merging,) = [e for e in changed if e.name == "merge_convs"]
    assert _defined(merging.diff, "-") >= SPECTRAL_NODES and MERGED in _defined(merging.diff, "+")
    assert specfx.diff_passes(fast.specfx_report) == entries


def test_first_pass_is_diffed_against_the_captured_graph(lowered):
    _, fast = lowered
    report = fast.specfx_report
    first = specfx.diff_passes(report)[0]
    expected = unified_diff(report.captured_code, report.passes[0].code,
                            "after capture", f"after {report.passes[0].name}")
    assert first.diff == expected
    assert "conv = self.conv(x)" in report.captured_code


def test_per_pass_needs_a_report():
    model = DepthwiseNet().eval()
    with pytest.raises(ValueError, match="no specfx report"):
        specfx.diff_passes(torch.fx.symbolic_trace(model))


def test_export_graphs_are_diffed_against_an_export_capture():
    model = DepthwiseNet().eval()
    fast = specfx.optimize(model, (torch.randn(1, 4, 32, 32),), policy="always", frontend="export")
    d = specfx.diff(model, fast)  # captures `model` with export too, so node names line up
    assert d.removed == ["conv2d"]
    # the weight's shape check and the output dtype read from the weight
    assert set(d.added) == {MERGED, "conv_weight_1", "getattr_1"}
    (conv,) = [row for row in d.rows if row.status == "removed"]
    assert conv.replaced_by == MERGED
    assert conv.target == "torch.ops.aten.conv2d.default"
    assert conv.module == "conv (Conv2d)"


def test_plain_modules_need_example_inputs():
    with pytest.raises(ValueError, match="pass example_inputs"):
        specfx.diff(DepthwiseNet(), DepthwiseNet())


def test_unified_diff_matches_difflib_format():
    before = "a\nb\nc\nd\n"
    after = "z\na\nc\nd\ne\n"
    expected = "".join(line + "\n" for line in difflib.unified_diff(
        before.splitlines(), after.splitlines(), "before", "after", lineterm=""))
    assert unified_diff(before, after) == expected
    assert unified_diff(before, before) == ""


def test_unified_diff_does_not_junk_repeated_lines():
    # In a text of 200+ lines, difflib's autojunk treats a line repeated in >1% of it as
    # junk and cannot anchor on it: difflib.unified_diff rewrites all 300 lines here.
    before = "\n".join(["    pass"] * 300 + ["moved"])
    after = "\n".join(["moved"] + ["    pass"] * 300)
    lines = unified_diff(before, after).splitlines()
    assert [line for line in lines if line[:1] in "+-" and line[:3] not in ("+++", "---")] == ["+moved", "-moved"]


class _StrictParser(HTMLParser):
    """Records tags and attributes and checks every element is closed in order."""

    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "source", "wbr"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(name, value or "") for name, value in attrs]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [(name, value or "") for name, value in attrs]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-1:]}"
        self.stack.pop()


def parse_html(page: str) -> _StrictParser:
    parser = _StrictParser()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], f"unclosed elements: {parser.stack}"
    return parser


def assert_self_contained(page: str) -> None:
    parser = parse_html(page)
    assert page.startswith("<!DOCTYPE html>")
    assert not {"script", "link", "img", "iframe", "object", "embed"} & set(parser.tags)
    for name, value in parser.attrs:
        assert name not in ("src", "srcset", "href") or value.startswith(("#", "data:")), (name, value)
    assert "://" not in page and "@import" not in page and "url(" not in page


def test_html_report_parses_and_is_self_contained(lowered, tmp_path):
    model, fast = lowered
    d = specfx.diff(model, fast)
    path = d.to_html(tmp_path / "report.html")
    page = path.read_text(encoding="utf-8")
    assert_self_contained(page)
    for text in ("Decisions", "policy=&#x27;always&#x27;", MERGED, "lower_convs",
                 "Conv2d 4→4 k=31x31 depthwise", "Graph drawings omitted"):
        assert text in page, text
    cost = fast.specfx_report.decisions[0].cost
    assert f"{cost.direct_gflop:.3g}" in page and f"{cost.fft_ms:.3g}" in page


def test_html_escapes_text(lowered):
    model, fast = lowered
    page = specfx.diff(model, fast).html(title="<script>alert(1)</script>")
    assert "<script>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert_self_contained(page)


def test_graph_dot_colours_removed_and_added_nodes(lowered):
    model, fast = lowered
    d = specfx.diff(model, fast)
    dot = graph_dot(d.after, {name: "added" for name in d.added}, "after")
    assert '"lowered_conv_default" [label="lowered_conv_default\\ncall_function", fillcolor="#d2f4d3"]' in dot
    assert '"relu" [label="relu\\ncall_function", fillcolor="#ffffff"]' in dot
    assert '"lowered_conv_default" -> "relu";' in dot


@pytest.mark.skipif(any(importlib.util.find_spec(m) for m in ("pydot", "graphviz")),
                    reason="checks the page without a graph renderer")
def test_drawings_are_omitted_without_a_renderer():
    with pytest.raises(DrawingUnavailable, match="neither pydot nor graphviz"):
        render_svg("digraph { a -> b }")
