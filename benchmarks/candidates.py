"""The implementations each benchmark case is run with."""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.nn as nn

import specfx

from suites import Case

CANDIDATES = ("eager", "inductor", "fft_conv_pytorch", "specfx", "specfx_auto", "specfx_inductor")
# torch.compile of the lowered model is timed on the suites where it is a goal only.
COMPILED_LOWERED_SUITES = ("replknet_dw31",)


def _fft_conv_pytorch(case: Case, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    from fft_conv_pytorch import fft_conv

    # fft-conv-pytorch 1.2.0 indexes with a list, which torch warns about on every call.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)

    w, b = module.weight.detach(), module.bias.detach()
    return lambda: fft_conv(x, w, b, padding=case.padding, groups=case.groups)


def make_candidate(name: str, case: Case, module: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    """A zero-argument callable running ``case`` with implementation ``name``."""
    if name == "eager":
        return lambda: module(x)
    if name == "inductor":
        compiled = torch.compile(module)
        return lambda: compiled(x)
    if name == "fft_conv_pytorch":
        return _fft_conv_pytorch(case, module, x)
    if name in ("specfx", "specfx_auto"):
        fast = specfx.optimize(module, (x,), policy="always" if name == "specfx" else "auto")
        return lambda: fast(x)
    if name == "specfx_inductor":
        compiled = torch.compile(specfx.optimize(module, (x,), policy="always"))
        return lambda: compiled(x)
    raise ValueError(f"unknown candidate {name!r}; expected one of {CANDIDATES}")


def auto_choice(case: Case, module: nn.Module, x: torch.Tensor) -> str:
    """What ``policy='auto'`` decided for the case's conv: 'fft' or 'direct'."""
    report = specfx.explain(module, (x,))
    return "fft" if report.lowered else "direct"
