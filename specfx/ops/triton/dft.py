"""DFT matrices that let the fused activation kernels do small real FFTs as ``tl.dot``s.

For an axis of FFT size P, one-sided bins ``k < K = P//2 + 1`` and spatial positions
``t < E`` (the positions the kernel evaluates, E ≤ P):

- the last axis' inverse (the ``irfftn`` step, real output):
  ``x[t] = Σ_k Re X[k]·w_k cos(2πkt/P)/N − Im X[k]·w_k sin(2πkt/P)/N``, with ``w_k`` the
  bin's multiplicity in the two-sided spectrum (1 for DC and an even size's Nyquist bin,
  else 2) and N the whole grid's size. The sine vanishes at DC and Nyquist, so the
  imaginary part of those bins is dropped, as ``irfftn`` drops it: the map reads only the
  Hermitian part of the spectrum;
- the last axis' forward (``rfft``): ``X[k] = Σ_t a[t]·(cos − i·sin)(2πkt/P)``;
- a leading axis (complex in both directions): the plain ``cos``/``sin`` of ``2πkt/P``,
  used as ``cos + i·sin`` for the inverse and transposed as ``cos − i·sin`` for the forward.

Each matrix is zero-padded to power-of-two edges of at least 16 (what ``tl.dot`` takes):
the zero rows and columns are what crop the inverse to ``[0, E)`` and zero-pad the
forward's input beyond it. Angles are reduced as ``kt mod P`` and evaluated in fp64, so
each entry is the fp32 rounding of the exact value.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import NamedTuple

import torch
import triton

# tl.dot needs every tile edge to be at least this.
MIN_EDGE = 16


def edge(n: int) -> int:
    """The padded tile edge for ``n`` entries."""
    return max(MIN_EDGE, triton.next_power_of_2(n))


class DFTMatrices(NamedTuple):
    """fp32, row-major, padded: the last axis' ``inv_cos``/``inv_sin`` ``(K, E)`` and
    ``fwd_cos``/``fwd_sin`` ``(E, K)``; a leading axis' ``cos``/``sin`` ``(E0, P0)``
    (1D grids get empty ones)."""

    inv_cos: torch.Tensor
    inv_sin: torch.Tensor
    fwd_cos: torch.Tensor
    fwd_sin: torch.Tensor
    lead_cos: torch.Tensor
    lead_sin: torch.Tensor


def _angles(rows: int, cols: int, size: int) -> torch.Tensor:
    """``2π·(i·j mod size)/size`` for ``i < rows``, ``j < cols`` (fp64)."""
    i = torch.arange(rows, dtype=torch.float64)[:, None]
    j = torch.arange(cols, dtype=torch.float64)[None, :]
    return 2 * math.pi * torch.remainder(i * j, size) / size


def _padded(m: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    out = torch.zeros(rows, cols, dtype=torch.float64)
    out[: m.shape[0], : m.shape[1]] = m
    return out


@lru_cache(maxsize=64)
def dft_matrices(fft_size: tuple[int, ...], eval_size: tuple[int, ...], device: str) -> DFTMatrices:
    """The matrices for a 1D or 2D grid of ``fft_size`` evaluated on ``[0, eval_size)``."""
    p, e = fft_size[-1], eval_size[-1]
    k = p // 2 + 1
    weights = torch.full((k,), 2.0, dtype=torch.float64)
    weights[0] = 1.0
    if p % 2 == 0:
        weights[-1] = 1.0
    theta = _angles(k, e, p)  # (K, E)
    scale = (weights / math.prod(fft_size))[:, None]
    kp, ep = edge(k), edge(e)
    mats = [_padded(scale * torch.cos(theta), kp, ep), _padded(-scale * torch.sin(theta), kp, ep),
            _padded(torch.cos(theta).T, ep, kp), _padded(-torch.sin(theta).T, ep, kp)]
    if len(fft_size) == 2:
        p0, e0 = fft_size[0], eval_size[0]
        theta0 = _angles(e0, p0, p0)  # (E0, P0)
        mats += [_padded(torch.cos(theta0), edge(e0), edge(p0)), _padded(torch.sin(theta0), edge(e0), edge(p0))]
    else:
        mats += [torch.zeros(0, dtype=torch.float64)] * 2
    return DFTMatrices(*(m.to(device=device, dtype=torch.float32).contiguous() for m in mats))
