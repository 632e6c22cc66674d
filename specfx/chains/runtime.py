"""Run time: the functions a fused chain's graph calls (its eval-mode BatchNorm terms,
and its training-mode fallback)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function


def batch_norm_affine(bn: nn.Module, spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` per channel of the BatchNorm module ``bn`` in eval mode (``bn(u)
    = scale·u + shift``), from two constant probes (0 and 1024, exact in every float type)
    through ``F.batch_norm`` with ``training=False``: what ``bn`` computes in eval mode, with
    no side effect in any mode. (A module call would, in training mode, normalize the
    probes by their own statistics and update the running ones.)

    ``spectrum`` (the spectrum the terms apply to) is not read: it makes the function one
    call when the optimized module is traced again, since ``symbolic_trace`` records a
    Python function as a call only when a traced value flows into it, and would otherwise
    freeze the running statistics into constants."""
    if has_torch_function((spectrum,)):
        return handle_torch_function(batch_norm_affine, (spectrum,), bn, spectrum)
    mean = bn.running_mean
    probes = torch.tensor([0.0, 1024.0], dtype=mean.dtype, device=mean.device).unsqueeze(1).expand(2, mean.shape[0])
    out = F.batch_norm(probes, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return out[0], (out[1] - out[0]) / 1024.0


def chain_outputs(modal: tuple[nn.Module, ...], original: nn.Module, fused: tuple, args: tuple) -> tuple:
    """The values of a fused chain where the rest of the graph reads them: ``fused`` (the
    frequency-domain results) while every module in ``modal`` is in eval mode; otherwise
    ``original(*args)``: the chain's original ops, run as the original module runs them
    (batch statistics, running-statistic updates, autograd through them)."""
    traced = tuple(a for a in (*fused, *args) if a is not None and not isinstance(a, nn.Module))
    if has_torch_function(traced):
        return handle_torch_function(chain_outputs, traced, modal, original, fused, args)
    if any(m.training for m in modal):
        return original(*args)
    return fused
