"""Call-time checks of a lowered convolution, emitted by ``passes/lower_convs.py``.

A lowered conv computes from a plan fixed at optimization time: its FFT grid, the kernel's
size and placement, the channel grouping. Before its weight is used, the lowered graph
checks that the conv's module still is the conv that was planned (or, for a functional
conv, that the weight has the planned shape), so that a swapped submodule, a weight of
another size or an edited ``padding`` gives a clear error, never a result computed with a
stale geometry. (The spectral ops check the input against the weight as torch's conv does:
dims, channels, dtype.) Each check is a few attribute reads and comparisons, about a
microsecond a call. The checks read only the module and its weight, never the conv's
input: inside a fused chain that input is never computed spatially.
"""

from __future__ import annotations

from typing import Union

import torch
import torch.nn as nn

from .errors import StalePlanError

_CONV_FORWARDS = (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward)


def _stale(name: str, what: str) -> StalePlanError:
    return StalePlanError(f"specfx: the module of lowered conv {name!r} changed after specfx.optimize ({what}); "
                          f"run specfx.optimize again on the edited model")


def module_conv_weight(module: nn.Module, weight: torch.Tensor, name: str, stride: tuple[int, ...],
                       padding: Union[str, tuple[int, ...]], dilation: tuple[int, ...], groups: int,
                       padding_mode: str, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """``weight``, read from the conv ``module`` a lowered conv stands for, once the module
    is checked to be the conv that was planned: the same kind of module, stride, padding,
    dilation, groups, padding mode and weight shape, and no forward hooks (a lowered conv
    would not run them)."""
    if type(module).forward not in _CONV_FORWARDS:
        raise _stale(name, f"it is now a {type(module).__name__}")
    planned = (stride, padding, dilation, groups, padding_mode)
    current = (module.stride, module.padding, module.dilation, module.groups, module.padding_mode)
    if current != planned:
        raise _stale(name, f"stride, padding, dilation, groups, padding_mode were {planned}, now {current}")
    if module._forward_hooks or module._forward_pre_hooks:
        raise _stale(name, "it has forward hooks, which the lowered conv would not run")
    if weight.shape != weight_shape:
        raise _stale(name, f"weight of shape {tuple(weight_shape)}, now {tuple(weight.shape)}")
    return weight


def conv_weight(weight: torch.Tensor, name: str, weight_shape: tuple[int, ...]) -> torch.Tensor:
    """``weight`` (of a functional conv), once checked to have the planned shape."""
    if weight.shape != weight_shape:
        raise StalePlanError(f"specfx: lowered conv {name!r} was planned for a weight of shape {tuple(weight_shape)} "
                             f"and got {tuple(weight.shape)}; run specfx.optimize again")
    return weight


# Every check a lowered graph may call (traced as calls when a lowered graph is traced again).
CHECKS = (module_conv_weight, conv_weight)
