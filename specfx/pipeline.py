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
from .side_effects import eliminate_dead_code

POLICIES = ("auto", "measure", "always", "never")
SPECTRAL_ACTIVATIONS = ("exact", "poly")


@dataclasses.dataclass(frozen=True)
class Settings:
    """What the user asked for. ``profile=None`` means the machine's calibrated profile
    (``python -m specfx.calibrate``), or the built-in defaults when there is none."""

    policy: str = "auto"
    profile: Optional[CostProfile] = None
    # Spectral chains (passes/find_chains.py): fuse conv -> ... -> conv chains at all, the
    # kind of spectral activation between their convs, and the poly activation's degree.
    spectral_activation: str = "exact"
    chains: bool = True
    poly_degree: int = 2

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.spectral_activation not in SPECTRAL_ACTIVATIONS:
            raise ValueError(f"spectral_activation must be one of {SPECTRAL_ACTIVATIONS}, "
                             f"got {self.spectral_activation!r}")
        if not isinstance(self.chains, bool):
            raise ValueError(f"chains must be True or False, got {self.chains!r}")
        if not isinstance(self.poly_degree, int) or isinstance(self.poly_degree, bool) or self.poly_degree < 1:
            raise ValueError(f"poly_degree must be an int >= 1, got {self.poly_degree!r}")
        if self.profile is None:
            object.__setattr__(self, "profile", CostProfile.load())


@dataclasses.dataclass
class PassContext:
    """What every pass sees besides the graph: the settings, the report it adds to, the
    example inputs when the caller has real ones (fitting poly activations needs them),
    and the plans one pass hands to a later one (``chain_plans``: find_chains →
    fuse_chains)."""

    settings: Settings
    report: Report
    example_inputs: Optional[tuple] = None
    chain_plans: list = dataclasses.field(default_factory=list)


Pass = Callable[[fx.GraphModule, PassContext], PassResult]


@dataclasses.dataclass(frozen=True)
class RegisteredPass:
    """A pass in the pipeline. Analysis passes only annotate the graph (node meta)."""

    name: str
    run: Pass
    analysis: bool
    doc: str


def cleanup(gm: fx.GraphModule) -> None:
    """Dead-code elimination (keeping every node with a side effect), lint and recompile:
    the state every pass leaves."""
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes: list[RegisteredPass],
                 analysis_only: bool = False) -> fx.GraphModule:
    """Run ``passes`` in order (only the analysis ones if ``analysis_only``)."""
    # Passes plan on the graph as it computes: a conv whose result nothing reads would be
    # planned into a chain that the cleanup after lowering then takes apart.
    if eliminate_dead_code(gm):
        gm.recompile()
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

