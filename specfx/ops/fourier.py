"""Real FFTs over the trailing spatial dims, and their exact adjoints.

Every spectral op is built from these few maps. Each adjoint is written out (rather than
left to autograd) so that the ops' backward formulas are plain tensor code that also runs
under fake tensors, AOTAutograd and double backward.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

# Transforms and kernel-spectrum work run over blocks of rows of about this many bytes, so
# that their temporaries (zero-padded grids, an inverse transform's copy of its input, a
# block of kernel spectra) stay a few MiB instead of growing with the whole tensor.
BLOCK_BYTES = 4 << 20
# An inverse transform holds three block-sized temporaries (torch's irfftn: the transform
# along the leading axes, the copy its last-axis c2r step overwrites, the real output)
# beside the spectrum it reads, so its blocks are smaller.
INVERSE_BLOCK_BYTES = 1 << 20


def row_blocks(rows: int, fft_size: Sequence[int], element_bytes: int,
               block_bytes: Optional[int] = None) -> list[slice]:
    """``rows`` signals on the grid ``fft_size`` in as few blocks as keep each under
    ``block_bytes`` (of real samples; :data:`BLOCK_BYTES` by default), the rows shared evenly between them: 128 rows of
    36 KiB make two blocks of 64, not 113 and 15, whose temporaries would be twice as large
    for the same number of calls."""
    per_row = math.prod(fft_size) * element_bytes
    count = max(1, math.ceil(rows * per_row / (BLOCK_BYTES if block_bytes is None else block_bytes)))
    step = math.ceil(rows / count)
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def fits_one_block(rows: int, fft_size: Sequence[int], element_bytes: int,
                   block_bytes: Optional[int] = None) -> bool:
    """Whether :func:`row_blocks` would make a single block: the common case, checked on
    every call before any slicing."""
    return rows * math.prod(fft_size) * element_bytes <= (BLOCK_BYTES if block_bytes is None else block_bytes)


def as_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t.to(dtype)`` without the call where ``t`` already has it (a call is ~1.5 µs of
    argument parsing, several per lowered conv)."""
    return t if t.dtype == dtype else t.to(dtype)


def spatial_dims(rank: int) -> list[int]:
    """The last ``rank`` dims, as negative indices."""
    return list(range(-rank, 0))


def real_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The real dtype the FFTs run in: fp64 stays fp64; everything else runs in fp32,
    because CPU FFTs have no fp16/bf16 kernels and GPU ones only for powers of two."""
    return torch.float64 if dtype in (torch.float64, torch.complex128) else torch.float32


def complex_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """The complex dtype of the spectra of a ``dtype`` signal (see :func:`real_dtype_for`)."""
    return torch.complex128 if real_dtype_for(dtype) == torch.float64 else torch.complex64


def channel_view(v: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``(..., C, *spatial)`` of ``rank`` spatial dims."""
    return v.reshape(-1, *([1] * rank))


def rfft_bins(fft_size: Sequence[int]) -> list[int]:
    """Shape of the one-sided spectrum of a real signal of ``fft_size``."""
    return [*fft_size[:-1], fft_size[-1] // 2 + 1]


def rfftn(x: torch.Tensor, fft_size: Sequence[int]) -> torch.Tensor:
    """One-sided spectrum of ``x`` zero-padded (at the end) to ``fft_size``."""
    return torch.fft.rfftn(x, s=list(fft_size), dim=spatial_dims(len(fft_size)))


def irfftn(x_hat: torch.Tensor, fft_size: Sequence[int]) -> torch.Tensor:
    """Real signal of ``fft_size`` whose one-sided spectrum is ``x_hat``."""
    return torch.fft.irfftn(x_hat, s=list(fft_size), dim=spatial_dims(len(fft_size)))


def _one_sided_weights(fft_size: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """Multiplicity of each bin of the last axis in the full (two-sided) spectrum:
    1 for DC (and Nyquist when the size is even), 2 for the bins whose mirror is dropped."""
    n = fft_size[-1]
    weights = torch.full((n // 2 + 1,), 2.0, dtype=dtype, device=device)
    weights[0] = 1.0
    if n % 2 == 0:
        weights[-1] = 1.0
    return weights


def rfftn_adjoint_scale(fft_size: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """Per-bin factor (along the last axis) that makes ``irfftn`` the adjoint of
    :func:`rfftn`: ``N`` over the bin's multiplicity."""
    return math.prod(fft_size) / _one_sided_weights(fft_size, dtype, device)


def irfftn_adjoint_scale(fft_size: Sequence[int], dtype: torch.dtype, device) -> torch.Tensor:
    """Per-bin factor (along the last axis) that makes ``rfftn`` the adjoint of
    :func:`irfftn`: the bin's multiplicity over ``N``."""
    return _one_sided_weights(fft_size, dtype, device) / math.prod(fft_size)


def rfftn_adjoint(grad: torch.Tensor, fft_size: Sequence[int]) -> torch.Tensor:
    """Adjoint of :func:`rfftn` (as a real-linear map onto the full ``fft_size`` grid).

    ``rfftn`` keeps one bin of each conjugate pair, so its adjoint is ``N · irfftn`` of the
    gradient with the paired bins weighted by 1/2 (``irfftn`` counts each of them twice).
    """
    return irfftn(grad * rfftn_adjoint_scale(fft_size, grad.real.dtype, grad.device), fft_size)


def irfftn_adjoint(grad: torch.Tensor, fft_size: Sequence[int]) -> torch.Tensor:
    """Adjoint of :func:`irfftn`: ``rfftn`` of the gradient, scaled by each bin's
    multiplicity over ``N``."""
    return rfftn(grad, fft_size) * irfftn_adjoint_scale(fft_size, grad.dtype, grad.device)
