"""The pass runner (:func:`specfx.pipeline.run_pipeline`): declared requirements are
checked, a pass's failure names the pass (and the node), a second run changes nothing."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.infra.pass_base import PassResult

import specfx
from specfx.passes import PIPELINE
from specfx.pipeline import PassContext, PassError, RegisteredPass, Settings, at_node, check_order, run_pipeline
from specfx.report import Report


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(2, 4, 9, padding=4)
        self.second = nn.Conv2d(4, 4, 9, padding=4, groups=4)

    def forward(self, x):
        return self.second(torch.relu(self.first(x)))


def _traced() -> tuple[fx.GraphModule, torch.Tensor]:
    x = torch.randn(1, 2, 16, 16)
    gm = specfx.capture.capture(Net().eval(), (x,), "symbolic_trace")[0]
    return gm, x


def _context(x: torch.Tensor) -> PassContext:
    return PassContext(Settings(policy="always"), Report(frontend="symbolic_trace", policy="always"), (x,))


def _noop(gm, ctx):
    return PassResult(gm, False)


def test_pipeline_declares_what_each_pass_reads():
    requires = {p.name: p.requires for p in PIPELINE}
    assert requires == {"plan_convs": (), "find_chains": ("plan_convs",), "time_chains": ("find_chains",),
                        "lower_convs": ("plan_convs", "find_chains"),
                        "fuse_chains": ("find_chains", "lower_convs"),
                        "merge_convs": ("lower_convs", "fuse_chains")}
    check_order(PIPELINE)


def test_a_pass_before_what_it_requires_is_refused_naming_both():
    swapped = [PIPELINE[0], PIPELINE[3], PIPELINE[1], PIPELINE[2], *PIPELINE[4:]]
    gm, x = _traced()
    code = gm.code
    with pytest.raises(PassError, match=r"pass 'lower_convs' requires 'find_chains', which must run before it "
                                        r"\(pipeline order: plan_convs, lower_convs, find_chains") as info:
        run_pipeline(gm, _context(x), swapped)
    assert info.value.pass_name == "lower_convs"
    assert gm.code == code  # refused before any pass ran


def test_a_missing_requirement_is_refused():
    with pytest.raises(PassError, match=r"pass 'merge_convs' requires 'lower_convs', 'fuse_chains'"):
        check_order([PIPELINE[0], PIPELINE[-1]])


def test_analysis_only_checks_only_the_passes_it_runs():
    gm, x = _traced()
    ctx = _context(x)
    run_pipeline(gm, ctx, PIPELINE, analysis_only=True)
    assert [record.name for record in ctx.report.passes] == ["plan_convs", "find_chains", "time_chains"]


def test_an_exception_in_a_pass_names_the_pass_and_keeps_the_original():
    def broken(gm, ctx):
        raise KeyError("no plan")

    gm, x = _traced()
    with pytest.raises(PassError, match=r"pass 'broken' failed: KeyError: 'no plan'") as info:
        run_pipeline(gm, _context(x), [*PIPELINE[:2], RegisteredPass("broken", broken, True, "test")])
    assert isinstance(info.value, specfx.SpecfxError)
    assert isinstance(info.value.__cause__, KeyError) and info.value.node is None


def test_a_failure_at_a_node_names_the_node():
    def fails_on_second(gm, ctx):
        for node in gm.graph.nodes:
            with at_node(node):
                if node.target == "second":
                    raise RuntimeError("cannot lower")
        return PassResult(gm, False)

    gm, x = _traced()
    with pytest.raises(PassError, match=r"pass 'strict' failed at node 'second': RuntimeError: cannot lower") as info:
        run_pipeline(gm, _context(x), [RegisteredPass("strict", fails_on_second, True, "test")])
    assert (info.value.pass_name, info.value.node) == ("strict", "second")
    assert isinstance(info.value.__cause__, RuntimeError)

    # Called on its own, the pass raises what it raised.
    with pytest.raises(RuntimeError, match="cannot lower"):
        fails_on_second(gm, _context(x))


def test_specfx_errors_pass_through_unwrapped():
    """specfx's own errors already name their cause, and callers catch them by type."""
    def stale(gm, ctx):
        raise specfx.StalePlanError("the plan is stale")

    gm, x = _traced()
    with pytest.raises(specfx.StalePlanError, match="the plan is stale"):
        run_pipeline(gm, _context(x), [RegisteredPass("stale", stale, True, "test")])


def test_a_second_run_is_a_no_op():
    gm, x = _traced()
    gm = run_pipeline(gm, _context(x), PIPELINE)
    code, expected = gm.code, gm(x)
    ctx = _context(x)
    again = run_pipeline(gm, ctx, PIPELINE)
    assert again.code == code
    assert [record.modified for record in ctx.report.passes] == [False] * len(PIPELINE)
    torch.testing.assert_close(again(x), expected, rtol=0, atol=0)


def test_describe_passes_lists_the_pipeline_with_its_requirements():
    lines = specfx.pipeline.describe_passes(PIPELINE)
    assert [line.split()[0].rstrip(":") for line in lines] == [p.name for p in PIPELINE]
    assert lines[0].startswith("plan_convs (analysis): ") and "[requires" not in lines[0]
    assert lines[-1].endswith("[requires lower_convs, fuse_chains]")
