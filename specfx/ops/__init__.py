"""Spectral ops (``torch.ops.specfx.*``); importing this package registers them.

=========================  ================================  ===============================  ==========================
op                         emitted by                        consumed by                      merged
=========================  ================================  ===============================  ==========================
``to_spectrum``            passes/lower_convs.py,            ``spectral_mix``, chain ops      into ``lowered_conv`` by
                           passes/fuse_chains.py (a chain's                                   passes/merge_convs.py when
                           forward transforms)                                                only its conv reads it
``spectral_mix``           passes/lower_convs.py             ``from_spectrum``, chain ops     into ``lowered_conv`` (as
                                                                                              above)
``from_spectrum``          passes/lower_convs.py,            the graph's spatial ops          into ``lowered_conv`` (as
                           passes/fuse_chains.py (a chain's                                   above)
                           inverse transforms)
``lowered_conv``           passes/merge_convs.py;            the graph's spatial ops          is the merge (runs the
                           :func:`specfx.spectral_conv`                                       three ops' implementations)
``spectral_activation``    passes/fuse_chains.py             the next op of its chain         never
``poly_activation``        passes/fuse_chains.py             the next op of its chain         never
``spectral_affine``        passes/fuse_chains.py             the next op of its chain         never
``spectral_add``           passes/fuse_chains.py             the next op of its chain         never
``to_spectrum_adjoint``    ``to_spectrum``'s backward        autograd                         never
``spectral_mix_grad_*``    ``spectral_mix``'s backward       autograd                         never
=========================  ================================  ===============================  ==========================

``lowered_conv`` is differentiated as its three ops (so training graphs hold those), and
:func:`implementations` says which implementation each op runs on a device (the report's
``implementations``). The ops are registered by one of two routes (:mod:`.library`).
"""

from __future__ import annotations

from typing import Iterable

import torch

from .activation_ops import poly_activation, spectral_activation, spectral_add, spectral_affine
from .library import ROUTE, ROUTE_REASONS
from .spectral_ops import from_spectrum, lowered_conv, spectral_mix, to_spectrum
from .weight_spectrum import SPECTRUM_CACHE
# Registers the Triton kernels as the ops' CUDA implementations where Triton is installed.
from .triton import TRITON_AVAILABLE, TRITON_OPS, not_used_reasons


def implementations(op_names: Iterable[str], device: torch.device) -> dict[str, str]:
    """The implementation each of ``op_names`` runs on ``device``: ``"triton"`` (on the
    inputs its kernel takes; others run the torch one), or ``"torch (<DEVICE>)"``, with why
    the Triton kernel is not used where an op has one."""
    kind = device.type.upper()
    reasons = not_used_reasons() if device.type == "cuda" else []
    names = {}
    for name in op_names:
        if device.type != "cuda" or name not in TRITON_OPS:
            names[name] = f"torch ({kind})"
        elif reasons:
            names[name] = f"torch ({kind}, triton unavailable: {'; '.join(reasons)})"
        else:
            names[name] = "triton"
    return names


__all__ = ["to_spectrum", "spectral_mix", "from_spectrum", "lowered_conv", "spectral_activation", "poly_activation",
           "spectral_affine", "spectral_add", "SPECTRUM_CACHE", "TRITON_AVAILABLE", "ROUTE", "ROUTE_REASONS",
           "implementations"]
