"""The Triton kernels as the CUDA implementations of ``specfx::spectral_mix``,
``specfx::spectral_activation`` and ``specfx::poly_activation``.

Inputs the kernels do not cover (complex128 spectra, grids over 64 per axis or of rank 3
for the fused activations) run the op's own implementation, which on CUDA tensors is the
torch.fft path on cuFFT. The CPU kernels are untouched. :func:`triton_kernels` switches
the Triton kernels off for a block of code (benchmarks compare both paths in one process).

The kernel modules are imported on the first CUDA call, not here: ``@triton.jit`` decides
at import whether a kernel is compiled or interpreted (``TRITON_INTERPRET=1``), and
importing specfx should not fix that choice for a process that sets it later.
"""

from __future__ import annotations

import contextlib
from typing import ContextManager, Iterator, Optional

import torch

from .. import activation_ops, contraction, fourier, spectral_ops
from ..weight_spectrum import SPECTRUM_CACHE

_enabled = True


def triton_enabled() -> bool:
    """Whether the CUDA implementations use the Triton kernels (else the torch.fft path)."""
    return _enabled


@contextlib.contextmanager
def triton_kernels(enabled: bool) -> Iterator[None]:
    """Use the Triton kernels (``True``) or the torch.fft path (``False``) inside the block."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def _on_device(t: torch.Tensor) -> ContextManager:
    """Make ``t``'s GPU the current one: Triton launches on the current device."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def mix_not_supported_reasons(x_hat: torch.Tensor, weight: torch.Tensor) -> list[str]:
    """Why the Triton contraction does not take these operands (empty when it does): it
    computes in fp32 only."""
    reasons = []
    if x_hat.dtype != torch.complex64:
        reasons.append(f"the spectrum is {x_hat.dtype}, not complex64")
    if fourier.real_dtype_for(weight.dtype) != torch.float32:
        reasons.append(f"the weight is {weight.dtype}, which computes in float64")
    return reasons


def spectral_mix_cuda(x_hat: torch.Tensor, weight: torch.Tensor, fft_size: list[int], dilation: list[int],
                      shift: list[int], groups: int) -> torch.Tensor:
    """``specfx::spectral_mix`` with the Triton contraction (fp32)."""
    if not _enabled or mix_not_supported_reasons(x_hat, weight):
        return spectral_ops.spectral_mix.kernel(x_hat, weight, fft_size, dilation, shift, groups)
    from . import mix

    rank = len(fft_size)
    batch = x_hat.shape[: x_hat.dim() - rank - 1].numel()
    # The layout the op's own implementation (and its backward) caches, so that all of them
    # share one weight spectrum; the kernel reads any layout through its strides.
    path = contraction.choose_path(weight.shape[1], batch)
    laid = SPECTRUM_CACHE.get(weight, fft_size, dilation, shift, groups, path)
    with _on_device(x_hat):
        return mix.spectral_mix(x_hat, contraction.group_view(laid, groups, path), groups, rank)


def spectral_activation_cuda(x_hat: torch.Tensor, fft_size: list[int], size: list[int],
                             scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], activation: str,
                             negative_slope: float) -> torch.Tensor:
    """``specfx::spectral_activation`` with the fused Triton kernel on small grids."""
    from . import activation as fused

    if _enabled and not fused.not_supported_reasons(x_hat, fft_size):
        with _on_device(x_hat):
            return fused.spectral_activation(x_hat, fft_size, size, scale, shift, activation, negative_slope)
    return activation_ops.spectral_activation.kernel(x_hat, fft_size, size, scale, shift, activation,
                                                        negative_slope)


def poly_activation_cuda(x_hat: torch.Tensor, coeffs: torch.Tensor, fft_size: list[int], size: list[int],
                         scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                         mask_input: bool) -> torch.Tensor:
    """``specfx::poly_activation`` with the fused Triton kernel on small grids."""
    from . import activation as fused

    if _enabled and not fused.not_supported_reasons(x_hat, fft_size):
        with _on_device(x_hat):
            return fused.poly_activation(x_hat, coeffs, fft_size, size, scale, shift, mask_input)
    return activation_ops.poly_activation.kernel(x_hat, coeffs, fft_size, size, scale, shift, mask_input)


# The ops with Triton kernels, and those kernels (importable without Triton: the kernel
# modules load on the first call).
CUDA_KERNELS = ((spectral_ops.spectral_mix, spectral_mix_cuda),
                (activation_ops.spectral_activation, spectral_activation_cuda),
                (activation_ops.poly_activation, poly_activation_cuda))


def register_cuda_kernels() -> None:
    """Make the Triton kernels the ops' CUDA implementations."""
    for op, kernel in CUDA_KERNELS:
        op.register_kernel("cuda", kernel)
