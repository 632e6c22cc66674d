"""What the structured layers share: the check of an input's feature count, and the
relative error a fit reports."""

from __future__ import annotations

import math

import torch
import torch.fx as fx
import torch.nn as nn


def check_last_dim(layer: nn.Module, x: torch.Tensor, size: int, what: str) -> None:
    """Raise ``ValueError`` naming ``layer`` when ``x``'s last dim is not ``size``; a
    reshape of a wrong input could otherwise succeed and mix rows. Under symbolic tracing
    there is no size to check (``x`` is a proxy); the traced graph's run checks it."""
    if not isinstance(x, fx.Proxy) and x.shape[-1] != size:
        raise ValueError(f"{type(layer).__name__}: input has {x.shape[-1]} {what} in its last dim, "
                         f"the layer takes {size}")


def relative_error(approximation: torch.Tensor, target: torch.Tensor) -> float:
    """``‖approximation − target‖_F / ‖target‖_F`` in float64 (0.0 for a zero target that
    is matched exactly, ``inf`` for one that is not)."""
    target64 = target.detach().double()
    diff = (approximation.detach().double() - target64).norm().item()
    scale = target64.norm().item()
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)
