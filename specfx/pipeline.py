"""Runs the ordered passes of :mod:`specfx.passes` over a captured graph.

Each pass is ``(gm, ctx) -> PassResult`` and says honestly whether it changed the graph.
A pass declares the passes it ``requires``; :func:`run_pipeline` refuses an order that
runs a pass before what it requires, and turns an exception a pass raises into a
:class:`PassError` naming the pass (and the node, where the pass says which one it was
handling, see :func:`at_node`). After every pass the graph is cleaned (dead code removed),
linted and recompiled, and the code after it is recorded in the report (with the code
before the first pass), so each pass's effect can be inspected.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from typing import Any, Callable, Iterator, Optional, Sequence

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from .close_calls import DEFAULT_BUDGET_S, Measurements
from .cost_model import CostProfile
from .errors import PassError, SpecfxError
from .report import PassRecord, Report
from .side_effects import eliminate_dead_code

POLICIES = ("auto", "measure", "always", "never")
SPECTRAL_ACTIVATIONS = ("exact", "poly")


def _option(default: Any, help: str, **metadata: Any) -> Any:
    """A :class:`Settings` field; ``help`` (and ``choices``, ``metavar``, ``parse`` where
    given) is what ``specfx.cli`` builds the field's command-line flag from."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Settings:
    """What the user asked for: the options of :func:`specfx.optimize` and
    :func:`specfx.explain` shared with ``torch.compile(..., backend="specfx",
    options=...)`` and the ``specfx`` command's flags, each described once, here.

    Build it by keyword. ``profile=None`` means this machine's CPU profile
    (``python -m specfx.calibrate``, else the built-in defaults); :func:`specfx.api.
    resolve_settings` instead picks the profile for the example inputs' device.
    """

    policy: str = _option("auto", "which convs to lower: the cost model decides, timing the close calls "
                                  "('auto'), timing both paths of every conv decides ('measure'), every conv "
                                  "that can be ('always'), none ('never')",
                          choices=POLICIES)
    measure_budget_s: Optional[float] = _option(
        None, "seconds policy='auto' may spend per optimize timing close calls, cached on disk per machine "
              f"(default: $SPECFX_MEASURE_BUDGET_S, else {DEFAULT_BUDGET_S:g}; 0 decides by the estimates alone)",
        metavar="SECONDS", parse=float)
    profile: Optional[CostProfile] = _option(
        None, "the cost model's rates, as written by python -m specfx.calibrate (default: the profile "
              "for the inputs' device)", metavar="PATH", parse=CostProfile.load)
    # Spectral chains (passes/find_chains.py): fuse conv -> ... -> conv chains at all, the
    # kind of spectral activation between their convs, and the poly activation's degree.
    spectral_activation: str = _option(
        "exact", "activation between the convs of a fused chain: inverse transform, activation, forward "
                 "transform ('exact'), or a fitted Fourier-domain polynomial ('poly', approximate)",
        choices=SPECTRAL_ACTIVATIONS)
    chains: bool = _option(True, "fuse conv -> ... -> conv chains in the frequency domain")
    poly_degree: int = _option(2, "degree of fitted poly activations", metavar="N")

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
        if self.measure_budget_s is None:
            text = os.environ.get("SPECFX_MEASURE_BUDGET_S", "").strip()
            try:
                object.__setattr__(self, "measure_budget_s", float(text) if text else DEFAULT_BUDGET_S)
            except ValueError:
                raise ValueError(f"SPECFX_MEASURE_BUDGET_S must be a number of seconds >= 0, got {text!r}") from None
        budget = self.measure_budget_s
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0 <= budget < math.inf:
            raise ValueError(f"measure_budget_s must be a number of seconds >= 0, got {budget!r}")


@dataclasses.dataclass
class PassContext:
    """What every pass sees besides the graph: the settings, the report it adds to, the
    example inputs when the caller has real ones (fitting poly activations needs them),
    the plans one pass hands to a later one (``chain_plans``: find_chains →
    fuse_chains), and the timing of close calls shared by the passes that decide."""

    settings: Settings
    report: Report
    example_inputs: Optional[tuple] = None
    chain_plans: list = dataclasses.field(default_factory=list)
    # Chains whose fusion is a close call (find_chains → time_chains).
    close_chains: list = dataclasses.field(default_factory=list)
    # The close calls timed during this run, within the settings' budget (specfx.close_calls).
    measurements: Optional[Measurements] = None

    def __post_init__(self) -> None:
        if self.measurements is None:
            self.measurements = Measurements(self.settings.measure_budget_s)


Pass = Callable[[fx.GraphModule, PassContext], PassResult]


@dataclasses.dataclass(frozen=True)
class RegisteredPass:
    """A pass in the pipeline. Analysis passes only annotate the graph (node meta);
    ``requires`` names the passes that must have run before this one (what it reads)."""

    name: str
    run: Pass
    analysis: bool
    doc: str
    requires: tuple[str, ...] = ()


# The attribute at_node leaves on an exception for run_pipeline to read.
_FAILED_NODE = "specfx_failed_node"


@contextlib.contextmanager
def at_node(node: fx.Node) -> Iterator[None]:
    """Wrap a pass's handling of one node, so that a failure there names the node. The
    exception itself goes on unchanged (a pass called on its own raises what it raised);
    :func:`run_pipeline` puts the node into its :class:`PassError`."""
    try:
        yield
    except Exception as err:
        if not hasattr(err, _FAILED_NODE):  # an inner node's failure is the more precise one
            setattr(err, _FAILED_NODE, node.name)
        raise


def check_order(passes: Sequence[RegisteredPass]) -> None:
    """Raise :class:`PassError` if a pass in ``passes`` runs before (or without) a pass it
    requires."""
    seen: set[str] = set()
    for registered in passes:
        missing = [name for name in registered.requires if name not in seen]
        if missing:
            order = ", ".join(p.name for p in passes)
            raise PassError(f"pass {registered.name!r} requires {', '.join(map(repr, missing))}, which must "
                            f"run before it (pipeline order: {order})", registered.name)
        seen.add(registered.name)


def cleanup(gm: fx.GraphModule) -> None:
    """Dead-code elimination (keeping every node with a side effect), lint and recompile:
    the state every pass leaves."""
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()


def _run_pass(registered: RegisteredPass, gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """``registered.run(gm, ctx)``, its failures named. specfx's own errors pass through
    as they are: each already names its cause, and callers catch them by type. Anything
    else a pass raises is a failure of that pass (a graph it did not expect, or a bug):
    it becomes a :class:`PassError` that names the pass and keeps the original (type,
    message, traceback) as its cause."""
    try:
        return registered.run(gm, ctx)
    except SpecfxError:
        raise
    except Exception as error:
        node = getattr(error, _FAILED_NODE, None)
        where = f" at node {node!r}" if node is not None else ""
        raise PassError(f"pass {registered.name!r} failed{where}: {type(error).__name__}: {error}",
                        registered.name, node) from error


def run_pipeline(gm: fx.GraphModule, ctx: PassContext, passes: Sequence[RegisteredPass],
                 analysis_only: bool = False) -> fx.GraphModule:
    """Run ``passes`` in order (only the analysis ones if ``analysis_only``), after
    checking that each runs after the passes it requires."""
    selected = [p for p in passes if p.analysis or not analysis_only]
    check_order(selected)
    # Passes plan on the graph as it computes: a conv whose result nothing reads would be
    # planned into a chain that the cleanup after lowering then takes apart.
    if eliminate_dead_code(gm):
        gm.recompile()
    # A report that already holds passes (a second run) keeps the code they started from.
    if ctx.report.captured_code is None:
        ctx.report.captured_code = gm.code
    for registered in selected:
        result = _run_pass(registered, gm, ctx)
        gm = result.graph_module
        if result.modified:
            cleanup(gm)
        ctx.report.passes.append(PassRecord(registered.name, bool(result.modified), gm.code))
    ctx.report.timing_notes = ctx.measurements.notes()
    return gm


def describe_passes(passes: Sequence[RegisteredPass]) -> list[str]:
    """One line per pass, in order: its name, whether it only analyses, what it does and
    what it requires."""
    return [f"{p.name}{' (analysis)' if p.analysis else ''}: {p.doc}"
            + (f" [requires {', '.join(p.requires)}]" if p.requires else "") for p in passes]
