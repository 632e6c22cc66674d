"""The ``torch.compile`` backend: ``torch.compile(model, backend="specfx")``.

Dynamo hands the backend one graph per captured region (a model with graph breaks gives
several). Each goes through the same passes as :func:`specfx.optimize` — a planned conv
becomes one ``lowered_conv`` call, or ``to_spectrum → spectral_mix → from_spectrum``
inside a fused chain — and is then compiled by Inductor (``compile_fx``), so everything
else in the graph is compiled as with the default backend, and the spectral ops run as
opaque custom ops inside it.

The backend is registered by the package's ``torch_dynamo_backends`` entry point, never at
import (a second registration raises "duplicate name: specfx"): after installing specfx,
``torch.compile(model, backend="specfx")`` works without importing it. Loading the entry
point imports this module, which imports :mod:`specfx` and so registers the spectral ops.

Options: ``torch.compile(model, backend="specfx", options={"policy": "always"})`` — the
keys are the fields of :class:`specfx.pipeline.Settings`, resolved as
:func:`specfx.optimize` resolves its arguments (:func:`specfx.api.resolve_settings`: the
cost profile follows the example inputs' device); any other key raises. ``mode`` is
passed on to Inductor. Chain fusion (``"chains"``, ``"spectral_activation"``) works
as in :func:`specfx.optimize`, except that Dynamo hands the backend fake example inputs,
so ``spectral_activation="poly"`` can only use polynomials it need not fit (the square);
other activations stay exact, with the reason in the report.

The :class:`~specfx.report.Report` of each compiled graph is kept in this process, the
most recent :data:`MAX_COMPILED_REPORTS` of them (see :func:`compiled_reports` and
:func:`clear_compiled_reports`), and with ``TORCH_TRACE`` set its graph diff is written to the
trace as the artifact ``specfx_graph_diff`` (readable with ``tlparse``).

Shapes: a conv is lowered only where its channel and spatial sizes are concrete in the
graph (the FFT grid is planned for them); with ``dynamic=True``, or after Dynamo marks a
spatial size dynamic on a recompile, such convs stay direct convs, with the reason in the
report. A dynamic batch size does not prevent lowering.

Autocast: a conv inside an autocast region is computed in fp32 from its fp32 operands and
its output cast to the region's dtype (eager autocast rounds the operands first), so it
agrees with eager to that dtype's precision.
"""

from __future__ import annotations

import collections
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.fx as fx
from torch._guards import CompileContext

from .api import resolve_settings
from .diff import unified_diff
from .pipeline import PassContext, run_pipeline
from .report import Report

TRACE_ARTIFACT = "specfx_graph_diff"

MAX_COMPILED_REPORTS = 100
"""How many reports :func:`compiled_reports` keeps: a long-running process that compiles
(and recompiles) graphs must not keep every report it ever made."""

_REPORTS: collections.deque[Report] = collections.deque(maxlen=MAX_COMPILED_REPORTS)


def compiled_reports() -> list[Report]:
    """The reports of the graphs the ``"specfx"`` backend compiled in this process, in
    compile order: the most recent :data:`MAX_COMPILED_REPORTS` since the last
    :func:`clear_compiled_reports`. Each report's ``capture_notes`` name the graph (its
    Dynamo compile id)."""
    return list(_REPORTS)


def clear_compiled_reports() -> None:
    """Forget the reports kept so far; :func:`compiled_reports` then lists only graphs
    compiled after this call."""
    _REPORTS.clear()


def specfx_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], *,
                   options: Optional[Mapping[str, Any]] = None,
                   mode: Optional[str] = None) -> Callable[..., Any]:
    """Rewrite a Dynamo graph with the specfx passes, then compile it with Inductor.

    Args:
        gm: the graph Dynamo captured (parameters arrive as placeholders).
        example_inputs: its (fake) example inputs.
        options: ``torch.compile``'s ``options``: fields of :class:`Settings`.
        mode: ``torch.compile``'s ``mode``, passed on to Inductor.

    Returns:
        The Inductor-compiled callable.
    """
    from torch._inductor import list_mode_options
    from torch._inductor.compile_fx import compile_fx

    from specfx.passes import PIPELINE

    settings = resolve_settings(options, example_inputs)
    compile_id = CompileContext.current_compile_id()
    name = f"graph {compile_id}" if compile_id is not None else "graph"
    report = Report(frontend="dynamo", policy=settings.policy)
    report.capture_notes.append(f"torch.compile {name}")
    gm = run_pipeline(gm, PassContext(settings, report), PIPELINE)
    _REPORTS.append(report)
    before, after = report.captured_code, gm.code
    torch._logging.trace_structured(
        "artifact",
        metadata_fn=lambda: {"name": TRACE_ARTIFACT, "encoding": "string"},
        payload_fn=lambda: unified_diff(before, after, f"{name} (captured)", f"{name} (specfx)"),
    )
    return compile_fx(gm, example_inputs, config_patches=list_mode_options(mode) if mode else None)
