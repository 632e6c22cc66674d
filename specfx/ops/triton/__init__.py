"""Triton kernels of the spectral ops (GPU), registered as the ops' CUDA implementations.

Importing this package registers them when Triton is installed; without it nothing is
registered and the ops run their torch implementation on every device
(:func:`not_used_reasons` says why).

- :mod:`.mix`: the per-frequency channel contraction (GEMM and elementwise kernels);
- :mod:`.activation`: the fused exact and polynomial spectral activations on small grids;
- :mod:`.dft`: the DFT matrices those fused kernels multiply by;
- :mod:`.register`: the registration, and the switch that turns the kernels off.
"""

from __future__ import annotations

from typing import Optional

from .register import CUDA_KERNELS, register_cuda_kernels, triton_enabled, triton_kernels  # noqa: F401  (API)

_MISSING: Optional[str]
try:
    import triton  # noqa: F401
except ImportError as error:
    TRITON_AVAILABLE, _MISSING = False, f"Triton is not installed ({error})"
else:
    TRITON_AVAILABLE, _MISSING = True, None
    register_cuda_kernels()

# The ops that have a Triton kernel (whether or not Triton is here to run it).
TRITON_OPS = frozenset(op.name for op, _ in CUDA_KERNELS)


def not_used_reasons() -> list[str]:
    """Why CUDA calls of :data:`TRITON_OPS` run their torch implementation now (empty when
    they run the Triton kernels, on the inputs those take)."""
    if _MISSING is not None:
        return [_MISSING]
    return [] if triton_enabled() else ["switched off (specfx.ops.triton.triton_kernels(False))"]
