"""``specfx.optimize`` and ``specfx.explain``: capture → plan → rewrite → verify.

Also the one place where what the caller asked for becomes :class:`~specfx.pipeline.Settings`
for a run (:func:`resolve_settings`, which the ``torch.compile`` backend uses too).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .capture import capture, check_frontend, describe_inputs, fresh_inputs, run_module
from .cost_model import CostProfile, profile_for_device
from .errors import ExampleInputError
from .pipeline import PassContext, Settings, run_pipeline
from .report import Report, approximate
from .torch_compat import add_deepcopy_hook
from .verify import check_tolerance, measured_error
from .verify import verify as verify_against

ExampleInputs = Union[torch.Tensor, Sequence[Any]]


def _as_tuple(example_inputs: ExampleInputs) -> tuple:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise TypeError(f"example_inputs must be a tensor or a tuple of inputs, got {type(example_inputs).__name__}")


def _prepare(model: nn.Module, example_inputs: ExampleInputs, frontend: str) -> tuple[nn.Module, tuple]:
    """A private copy of ``model`` and of the example inputs, checked to run on them (after
    the arguments are checked, so that a typo fails before any work). The caller's tensors
    are never run on: each run gets its own copy of the private ones."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    check_frontend(frontend)
    inputs = fresh_inputs(_as_tuple(example_inputs))
    # Copied outside inference mode even when called inside it: inference-tensor weights
    # carry no version counter, so the spectrum cache could never keep their spectra and
    # every call of the optimized module would transform its weights again.
    with torch.inference_mode(False):
        work = copy.deepcopy(model)
    try:
        run_module(work, inputs)
    except Exception as err:
        raise ExampleInputError(
            f"{type(model).__name__} raised on the example inputs ({describe_inputs(inputs)}): "
            f"{type(err).__name__}: {err}") from err
    return work, inputs


def input_device(inputs: Sequence[Any]) -> torch.device:
    """The device of the first tensor among ``inputs`` (nested in lists, tuples and
    dicts), the CPU when there is none: where the cost model's rates must come from."""
    for leaf in pytree.tree_leaves(list(inputs)):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")


def resolve_settings(options: Optional[Mapping[str, Any]], example_inputs: Sequence[Any]) -> Settings:
    """The :class:`Settings` that ``options`` (field names to values) ask for, checked,
    with the cost model's rates for the device of ``example_inputs`` unless ``options``
    give a ``profile``: the GPU defaults on CUDA, this machine's CPU profile otherwise.

    Raises:
        ValueError: a key is not a field of :class:`Settings` (all such keys are named),
            or a value is not one the field accepts.
    """
    options = dict(options or {})
    known = [field.name for field in dataclasses.fields(Settings)]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown specfx option(s) {', '.join(map(repr, unknown))}: the options are {known}")
    if options.get("profile") is None:
        options["profile"] = profile_for_device(input_device(example_inputs))
    return Settings(**options)


def _on_meta(inputs: tuple) -> bool:
    return any(isinstance(leaf, torch.Tensor) and leaf.is_meta for leaf in pytree.tree_leaves(list(inputs)))


@dataclasses.dataclass(frozen=True)
class _ReportOnCopy:
    """Deep-copy hook: ``copy.deepcopy`` of a ``GraphModule`` keeps only its graph, modules
    and a few hook lists, so the copy gets its own copy of the report here. (A class, not a
    closure, so the module still pickles.)"""

    report: Report

    def __call__(self, copied: fx.GraphModule) -> None:
        copied.specfx_report = copy.deepcopy(self.report)


def _attach_report(gm: fx.GraphModule, report: Report) -> None:
    gm.specfx_report = report
    add_deepcopy_hook(gm, _ReportOnCopy(report))


def _snapshot(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph as captured, over the same module (so sharing its parameters)."""
    graph = fx.Graph()
    graph.output(graph.graph_copy(gm.graph, {}))
    return fx.GraphModule(gm, graph)


def optimize(model: nn.Module, example_inputs: ExampleInputs, *, policy: str = "auto",
             verify: bool = True, verify_tol: Optional[float] = None, frontend: str = "auto",
             profile: Optional[CostProfile] = None, spectral_activation: str = "exact",
             chains: bool = True, poly_degree: int = 2, measure_budget_s: Optional[float] = None) -> fx.GraphModule:
    """Rewrite the convolutions of ``model`` that are cheaper as FFT convolutions.

    Args:
        model: any ``nn.Module``; it is never modified (specfx works on a deep copy).
        example_inputs: a tensor or tuple of positional inputs. Spatial sizes are fixed
            by these: a lowered conv raises ``ValueError`` if called with another spatial
            size. The batch size may change (through the ``export`` front end only when
            the example's batch size is > 1: export fixes size-1 dimensions).
        policy: ``"auto"`` (the cost model decides per conv and per chain, and where its
            estimate is a close call both ways are timed on the real shapes: see
            ``measure_budget_s``), ``"measure"`` (time both paths of every conv, and keep
            the faster), ``"always"`` (lower every conv that can be lowered) or
            ``"never"`` (rewrite nothing).
        verify: run ``model`` itself and the optimized module on copies of
            ``example_inputs`` and raise :class:`specfx.VerificationError`, naming the first
            diverging node, if they differ beyond tolerance and the optimized module is
            measurably less accurate than ``model`` against a float64 run of ``model``
            (that judgement applies to the default tolerances, not to ``verify_tol``).
            Inputs on the meta device have no values: the result is then not verified (the
            report says so).
        verify_tol: error accepted, relative to each output's largest magnitude
            (default per dtype: fp64 1e-10, fp32 1e-4, fp16 1e-2, bf16 5e-2).
        frontend: ``"auto"`` (``symbolic_trace``, then ``export``), or one of them.
        profile: the rates the cost model uses; by default those for the example
            inputs' device: the GPU defaults on CUDA, else the profile written by
            ``python -m specfx.calibrate`` on this machine, else built-in defaults.
        spectral_activation: between the convs of a fused chain, ``"exact"`` (inverse
            transform, mask, activation, forward transform in one op; exact) or ``"poly"``
            (opt-in: the Fourier-domain polynomial activation fitted on ``example_inputs``,
            approximate unless the activation is a polynomial; the report gives its error
            and the optimized module is then not verified against ``verify_tol``).
        chains: fuse conv -> ... -> conv chains (``False``: lower each conv on its own).
        poly_degree: the degree of fitted poly activations.
        measure_budget_s: seconds ``policy="auto"`` may spend timing close calls
            (:mod:`specfx.close_calls`); timings are cached on disk per machine
            (:mod:`specfx.timing_cache`), so optimizing the same model again times nothing.
            Default ``$SPECFX_MEASURE_BUDGET_S``, else 2 s; ``0`` decides by estimates alone.

    ``policy``, ``profile``, ``spectral_activation``, ``chains``, ``poly_degree`` and ``measure_budget_s`` are the
    fields of :class:`specfx.pipeline.Settings` (shared with the ``torch.compile`` backend's
    options and the ``specfx`` command's flags), checked before any work is done.

    Returns:
        An ``fx.GraphModule`` with the original's ``state_dict`` keys, and the report of
        what was done as ``.specfx_report``.
    """
    from specfx.passes import PIPELINE

    # Resolved (and so checked) from the caller's inputs, before _prepare copies and runs anything.
    settings = resolve_settings(dict(policy=policy, profile=profile, spectral_activation=spectral_activation,
                                     chains=chains, poly_degree=poly_degree, measure_budget_s=measure_budget_s),
                                _as_tuple(example_inputs))
    check_tolerance(verify_tol)
    work, inputs = _prepare(model, example_inputs, frontend)
    notes: list[str] = []
    gm, frontend_used = capture(work, inputs, frontend, notes)
    reference = _snapshot(gm)
    report = Report(frontend=frontend_used, policy=policy, capture_notes=notes)
    gm = run_pipeline(gm, PassContext(settings, report, fresh_inputs(inputs)), PIPELINE)
    if _on_meta(inputs):
        if verify and report.lowered:
            report.verification_notes.append("not verified: the example inputs are on the meta device")
    elif approximate(report):
        report.output_error = measured_error(model, gm, inputs)
    elif verify and report.lowered:
        verified = verify_against(model, reference, gm, inputs, verify_tol)
        report.verified_error, report.verified_tolerance = verified.error, verified.tolerance
        if verified.note is not None:
            report.verification_notes.append(verified.note)
    _attach_report(gm, report)
    return gm


def explain(model: nn.Module, example_inputs: ExampleInputs, *, policy: str = "auto",
            frontend: str = "auto", profile: Optional[CostProfile] = None,
            spectral_activation: str = "exact", chains: bool = True, poly_degree: int = 2,
            measure_budget_s: Optional[float] = None) -> Report:
    """The report :func:`optimize` would produce, without rewriting anything; the
    arguments are :func:`optimize`'s."""
    from specfx.passes import PIPELINE

    settings = resolve_settings(dict(policy=policy, profile=profile, spectral_activation=spectral_activation,
                                     chains=chains, poly_degree=poly_degree, measure_budget_s=measure_budget_s),
                                _as_tuple(example_inputs))
    work, inputs = _prepare(model, example_inputs, frontend)
    notes: list[str] = []
    gm, frontend_used = capture(work, inputs, frontend, notes)
    report = Report(frontend=frontend_used, policy=policy, applied=False, capture_notes=notes)
    run_pipeline(gm, PassContext(settings, report, fresh_inputs(inputs)), PIPELINE, analysis_only=True)
    return report
