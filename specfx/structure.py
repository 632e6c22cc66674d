"""``specfx.structure``: capture → plan → rewrite, putting structured layers (Kronecker or
butterfly, :mod:`specfx.nn`) in place of a model's dense linear layers where their output
error on the example inputs is small enough.

It runs its own two passes (``plan_structure``, ``structure_layers``) through
:func:`specfx.pipeline.run_pipeline`, not the convolution pipeline, and reports through
the same :class:`~specfx.report.Report` (``report.structured``).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree

from .api import ExampleInputs, _attach_report, _on_meta, _prepare
from .capture import capture, fresh_inputs
from .nn.structure_plan import StructureOptions
from .pipeline import PassContext, RegisteredPass, Settings, run_pipeline
from .report import Report
from .verify import run_copy


def structure_passes(options: StructureOptions) -> list[RegisteredPass]:
    """The passes of :func:`structure`, in order, bound to ``options``."""
    from specfx.passes.plan_structure import plan_structure
    from specfx.passes.structure_layers import structure_layers

    return [
        RegisteredPass("plan_structure", functools.partial(plan_structure, options=options), analysis=True,
                       doc=f"fit a {options.kind} layer to each dense linear layer and decide by its output error"),
        RegisteredPass("structure_layers", structure_layers, analysis=False,
                       doc="replace the planned dense layers with their structured layers",
                       requires=("plan_structure",)),
    ]


def _relative_error(actual: Any, expected: Any) -> float:
    """``‖actual − expected‖ / ‖expected‖`` over all floating-point output tensors."""
    pairs = [(a, e) for a, e in zip(pytree.tree_leaves(actual), pytree.tree_leaves(expected))
             if isinstance(e, torch.Tensor) and e.is_floating_point()]
    diff = math.sqrt(sum((a.double() - e.double()).square().sum().item() for a, e in pairs))
    scale = math.sqrt(sum(e.double().square().sum().item() for _, e in pairs))
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def structure(model: nn.Module, example_inputs: ExampleInputs, kind: str = "kronecker", *,
              max_error: float = 0.05, min_features: int = 256, rank: Optional[int] = None, steps: int = 50,
              frontend: str = "auto") -> fx.GraphModule:
    """Replace dense linear layers of ``model`` with structured layers of ``kind``.

    Each ``nn.Linear`` (or ``F.linear`` on a module's parameters) with at least
    ``min_features`` inputs and outputs is fitted: ``"kronecker"`` by the closed-form
    nearest sum of Kronecker products of balanced shapes
    (:meth:`specfx.nn.KroneckerLinear.from_linear`), ``"butterfly"`` by
    :meth:`specfx.nn.ButterflyLinear.from_linear`. It is replaced only if the fitted layer
    has fewer parameters and the relative error of its outputs
    (``‖y_structured − y_dense‖_F / ‖y_dense‖_F``, on the inputs the layer receives when
    ``model`` runs on ``example_inputs``) is at most ``max_error``.

    Trained weights are seldom close to either structure, so with a small ``max_error``
    most layers are kept (the report says by how much they missed). To trade accuracy for
    size, raise ``max_error`` (e.g. ``float("inf")``), then fine-tune the result: it is an
    ordinary trainable module.

    Args:
        model: any ``nn.Module``; it is never modified.
        example_inputs: a tensor or tuple of positional inputs.
        kind: ``"kronecker"`` or ``"butterfly"``.
        max_error: the largest relative output error accepted per layer.
        min_features: layers with fewer inputs or outputs are kept (their GEMM is cheap).
        rank: Kronecker terms; ``None`` keeps the smallest of 1, 2, 4, ... within
            ``max_error`` (among ranks with fewer parameters and FLOPs than the dense
            layer); a fixed rank is used as given, if it has fewer parameters.
        steps: L-BFGS iterations of each butterfly fit.
        frontend: ``"auto"`` (``symbolic_trace``, then ``export``), or one of them.

    Returns:
        An ``fx.GraphModule`` whose replaced layers' modules (at the same paths) are
        structured layers, so its ``state_dict`` has their factors in place of the dense
        weights; ``.specfx_report`` lists every dense linear layer with its kind,
        factors, parameters and FLOPs before and after, weight and output errors, and
        whether it was replaced and why. Where a layer was replaced, the report's
        verification note gives the whole model's relative output error on the examples.
    """
    options = StructureOptions(kind, max_error, min_features, rank, steps)
    work, inputs = _prepare(model, example_inputs, frontend)
    notes: list[str] = []
    gm, frontend_used = capture(work, inputs, frontend, notes)
    report = Report(frontend=frontend_used, policy=f"structure:{kind}", capture_notes=notes)
    ctx = PassContext(Settings(measure_budget_s=0), report, fresh_inputs(inputs))
    gm = run_pipeline(gm, ctx, structure_passes(options))
    if any(layer.replaced for layer in report.structured) and not _on_meta(inputs):
        error = _relative_error(run_copy(gm, inputs), run_copy(model, inputs))
        report.verification_notes.append(
            f"structured layers are approximate: the model's output error is {error:.3g} (relative, "
            f"Frobenius) on the example inputs; not verified against a tolerance")
    _attach_report(gm, report)
    return gm
