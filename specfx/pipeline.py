"""Runs the ordered passes of :mod:`specfx.passes` over a captured graph.

Each pass is ``(gm, ctx) -> PassResult`` and says honestly whether it changed the graph.
After every pass the graph is cleaned (dead code removed), linted and recompiled, and the
code after it is recorded in the report (with the code before the first pass), so each
pass's effect can be inspected.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .cost_model import CostProfile
from .report import PassRecord, Report

POLICIES = ("auto", "measure", "always", "never")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the user asked for. ``profile=None`` means the machine's calibrated profile
    (``python -m specfx.calibrate``), or the built-in defaults when there is none."""

    policy: str = "auto"
    profile: Optional[CostProfile] = None

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.profile is None:
            object.__setattr__(self, "profile", CostProfile.load())


@dataclasses.dataclass
class PassContext:
    """What every pass sees besides the graph: the settings, and the report it adds to."""

    settings: Settings
    report: Report


Pass = Callable[[fx.GraphModule, PassContext], PassResult]


@dataclasses.dataclass(frozen=True)
class RegisteredPass:
    """A pass in the pipeline. Analysis passes only annotate the graph (node meta)."""

    name: str
    run: Pass
    analysis: bool
    doc: str


def cleanup(gm: fx.GraphModule) -> None:
    """Dead-code elimination, lint and recompile: the state every pass leaves."""
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes: list[RegisteredPass],
                 analysis_only: bool = False) -> fx.GraphModule:
    """Run ``passes`` in order (only the analysis ones if ``analysis_only``)."""
    # A report that already holds passes (a second run) keeps the code they started from.
    if ctx.report.captured_code is None:
        ctx.report.captured_code = gm.code
    for registered in passes:
        if analysis_only and not registered.analysis:
            continue
        result = registered.run(gm, ctx)
        gm = result.graph_module
        if result.modified:
            cleanup(gm)
        ctx.report.passes.append(PassRecord(registered.name, bool(result.modified), gm.code))
    return gm


def describe_passes(passes: list[RegisteredPass]) -> list[str]:
    """One line per pass, in order."""
    return [f"{p.name}{' (analysis)' if p.analysis else ''}: {p.doc}" for p in passes]

