"""``spectral_penalty``: a differentiable upper bound on a model's operator norms.

Each conv contributes the largest singular value of the periodic conv that bounds it (the
same grids as the certified bounds: the layer's own for a periodic conv, the containing
grid for zero padding, the padded grid's valid conv times ``√copies`` for other padding),
computed from the live weight with autograd; each linear layer its weight's spectral norm.
These are upper bounds on the true norms — exact ones for periodic layers — without the
Lehmann refinement and the rounding margins of :func:`specfx.operator_norm` (they are
training signals, not certificates). ``reduction`` combines them: their ``"sum"``, their
``"max"``, or the network's composed Lipschitz bound (``"lipschitz"``, or its log), which
bounds BatchNorm with its running statistics and dropout as the identity whatever mode
the model is in. With a ``target`` only the excess counts — each norm's ``relu(σ − target)``
(or the bound's, or ``relu(log L − log target)``) — a soft form of clipping: a penalty
without one rewards shrinking the network without end, which a measured run of the log
bound at λ = 0.05 did, down to chance accuracy.

The model is captured once per input signature (shapes and dtypes) and the capture kept
beside the model; weights are read anew from the model, by qualified name, on every call,
so the penalty is never stale. The capture runs a copy of the model: capturing restores
the state a run may change by writing it back, which would bump the version of
parameters a pending backward still needs. Changing the model's structure after a call
needs a new call with ``refresh=True``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import weakref
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .bounds import dominating_grid, pad_copies
from .circular import periodic_blocks
from .graph import ExampleInputs, LayerSite, as_inputs, capture_graph, current_weight, find_layers
from .layer import ConvOperator, LayerError
from .network import Composer, Unknown

REDUCTIONS = ("sum", "max", "lipschitz", "log_lipschitz")
_CAPTURES: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def conv_norm_bound(op: ConvOperator, weight: torch.Tensor) -> torch.Tensor:
    """A differentiable upper bound on ``op``'s norm with ``weight`` (see the module docstring)."""
    factor = 1.0
    if op.periodic:
        target, grid = op, op.input_size
    elif op.padding_mode == "zeros":
        target, grid = op, dominating_grid(op)
    else:
        target = dataclasses.replace(op, input_size=op.padded_size, padding=((0, 0),) * op.rank,
                                     padding_mode="zeros")
        grid, factor = dominating_grid(target), math.sqrt(pad_copies(op))
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    matrices = periodic_blocks(target.with_weight(weight), grid, dtype).matrices
    # The largest eigenvalue of the smaller Gram matrix: σ_max² exactly, and its gradient
    # costs a Hermitian eigendecomposition rather than an SVD (half the time on 16x16 blocks).
    rows, cols = matrices.shape[-2:]
    gram = matrices @ matrices.mH if rows <= cols else matrices.mH @ matrices
    return torch.linalg.eigvalsh(gram)[..., -1].max().clamp_min(0).sqrt() * factor


def _signature(inputs: tuple) -> tuple:
    return tuple((tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else type(t) for t in inputs)


def _captured(model: nn.Module, inputs: tuple, frontend: str, refresh: bool) -> tuple[fx.GraphModule, list]:
    cache = _CAPTURES.setdefault(model, {})
    key = (_signature(inputs), frontend)
    if refresh or key not in cache:
        gm, _ = capture_graph(copy.deepcopy(model), inputs, frontend)
        cache[key] = (gm, find_layers(gm))
    return cache[key]


def spectral_penalty(model: nn.Module, example_inputs: ExampleInputs, *, reduction: str = "sum",
                     target: Optional[float] = None, frontend: str = "auto", refresh: bool = False) -> torch.Tensor:
    """A differentiable upper bound on the operator norms of ``model``'s conv and linear
    layers at the sizes ``example_inputs`` give them, combined by ``reduction``, counting
    only the excess over ``target`` if one is given (see the module docstring). Add
    ``λ · spectral_penalty(model, x)`` to a training loss."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    inputs = as_inputs(example_inputs)
    gm, layers = _captured(model, inputs, frontend, refresh)
    norms: dict[fx.Node, Any] = {}
    for layer in layers:
        norms[layer.node] = _layer_norm(model, layer)
    if reduction in ("sum", "max"):
        values = [v for v in norms.values() if not isinstance(v, Unknown)]
        unknown = [v for v in norms.values() if isinstance(v, Unknown)]
        if unknown:
            raise LayerError(f"spectral_penalty: {unknown[0]}")
        if not values:
            return torch.zeros(())
        stacked = torch.stack([torch.as_tensor(v, dtype=torch.float64) for v in values])
        if target is not None:
            stacked = torch.relu(stacked - target)
        return stacked.sum() if reduction == "sum" else stacked.max()
    bound = Composer(gm, lambda node: norms.get(node, Unknown(node.name, "a layer specfx could not read")),
                     inference=True, root=model).run()
    if isinstance(bound, Unknown):
        raise LayerError(f"spectral_penalty: the network's Lipschitz bound is unknown at {bound}")
    bound = torch.as_tensor(bound, dtype=torch.float64)
    if reduction == "log_lipschitz":
        return bound.log() if target is None else torch.relu(bound.log() - math.log(target))
    return bound if target is None else torch.relu(bound - target)


def _layer_norm(model: nn.Module, layer: LayerSite) -> Any:
    if layer.problem is not None:
        return Unknown(layer.node.name, f"{layer.name} not analysed: {layer.problem}")
    weight = current_weight(model, layer)
    if layer.kind == "linear":
        return torch.linalg.matrix_norm(weight, ord=2)
    return conv_norm_bound(layer.op, weight)
