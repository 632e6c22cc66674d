"""The public functions on one layer: all its singular values, and its operator norm."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn as nn

from ..geometry import PaddingArg, expand
from .asymptotic import asymptotic_singular_values
from .bounds import NormBounds, norm_bounds
from .circular import circular_singular_values
from .layer import Conv, ConvOperator, LayerError, SizeArg, as_operator, periodic

SV_METHODS = ("exact", "asymptotic", "circular")


def layer_operator(conv: Conv, input_size: SizeArg, padding: Optional[PaddingArg] = None, *,
                   stride: SizeArg = 1, dilation: SizeArg = 1, groups: int = 1,
                   name: Optional[str] = None) -> ConvOperator:
    """The operator to analyse: ``conv``'s own (``padding=None``), its periodic model
    (``"circular"``), or, for a module, its zero-padded form (``"zeros"``: its own padding
    amounts with zeros). For a weight tensor ``padding`` is otherwise the conv's zero
    padding as ``F.convNd`` takes it (ints, ``'same'``, ``'valid'``; default 0)."""
    if isinstance(conv, nn.modules.conv._ConvNd):
        if groups != 1 or any(v != 1 for v in expand(stride, 1) + expand(dilation, 1)):
            raise LayerError(f"{name or type(conv).__name__}: stride, dilation and groups come from the module; "
                             f"pass them only with a weight tensor")
        if padding not in (None, "circular", "zeros"):
            raise LayerError(f"{name or type(conv).__name__}: padding for a module is None (its own), 'circular' "
                             f"(its periodic model) or 'zeros' (its padding amounts with zeros), got {padding!r}")
        op = as_operator(conv, input_size, name=name, check=padding != "circular")
        if padding == "circular":
            return periodic(op)
        if padding == "zeros" and op.padding_mode != "zeros":
            return dataclasses.replace(op, padding_mode="zeros")
        return op
    if padding == "zeros":
        raise LayerError(f"{name or 'weight'}: for a weight tensor give the zero padding's amount as F.convNd takes "
                         f"it (an int, a tuple, 'same' or 'valid'), or 'circular'")
    if padding == "circular":
        op = as_operator(conv, input_size, stride=stride, dilation=dilation, groups=groups, name=name, check=False)
        return periodic(op)
    return as_operator(conv, input_size, stride=stride, padding=0 if padding is None else padding,
                       dilation=dilation, groups=groups, name=name)


def singular_values(conv: Conv, input_size: SizeArg, padding: Optional[PaddingArg] = None,
                    method: Optional[str] = None, *, stride: SizeArg = 1, dilation: SizeArg = 1, groups: int = 1,
                    max_dim: Optional[int] = 4096, name: Optional[str] = None) -> torch.Tensor:
    """All singular values of a conv layer as a linear map on inputs of ``input_size``,
    descending, in float64 (``min(in_dim, out_dim)`` of them).

    ``conv`` is an ``nn.Conv1d/2d/3d`` (or ``ConvTranspose``) or a weight tensor with the
    conv's ``stride``, ``dilation``, ``groups`` and (zero) ``padding``. ``padding``:
    ``None`` for the layer's own, ``"circular"`` for its periodic model (Sedghi et al.),
    ``"zeros"`` for a module's padding amounts with zeros. ``method``:

    - ``"exact"`` (default): periodic layers from their per-frequency blocks (any size);
      others from the SVD of the explicit matrix, refused past ``max_dim`` rows or columns;
    - ``"asymptotic"``: Yi's approximation from the spectral density matrix
      (:mod:`.asymptotic`), for non-periodic layers of any size;
    - ``"circular"``: the circulant approximation (the periodic model's values, which
      number ``c·n/s`` per axis, not always the layer's count).
    """
    method = method or "exact"
    if method not in SV_METHODS:
        raise LayerError(f"{name or 'conv'}: method must be one of {SV_METHODS}, got {method!r}")
    op = layer_operator(conv, input_size, padding, stride=stride, dilation=dilation, groups=groups, name=name)
    if op.periodic or method == "circular":
        return circular_singular_values(periodic(op))
    if method == "asymptotic":
        return asymptotic_singular_values(op)
    return torch.linalg.svdvals(op.matrix(max_dim))


def operator_norm(conv: Conv, input_size: SizeArg, padding: Optional[PaddingArg] = None, *,
                  method: str = "auto", stride: SizeArg = 1, dilation: SizeArg = 1, groups: int = 1,
                  steps: int = 80, seed: int = 0, refine: bool = True, max_dim: Optional[int] = 4096,
                  name: Optional[str] = None) -> NormBounds:
    """A certified interval for the spectral norm of a conv layer on inputs of
    ``input_size``, for its own padding, stride, dilation and groups (arguments as for
    :func:`singular_values`).

    ``method``: ``"auto"`` (exact for periodic layers and layers up to 1024 rows and
    columns, bounds beyond), ``"exact"`` (periodic, or dense SVD up to ``max_dim``) or
    ``"bounds"``: ``lower`` from Lanczos on ``AᵀA`` (``steps`` at most, seeded), ``upper``
    from the periodic conv that contains the layer, refined by Lehmann's bounds where they
    apply (``refine``). See :mod:`.bounds` for why each is a true bound.
    """
    op = layer_operator(conv, input_size, padding, stride=stride, dilation=dilation, groups=groups, name=name)
    return norm_bounds(op, method, steps=steps, seed=seed, refine=refine, max_dim=max_dim)
