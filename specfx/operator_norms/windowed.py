"""A window-corrected circulant bound: the finite-size effect of zero padding, certified.

The zero-padded conv is ``A = R C E``: the periodic conv ``C`` on a containing grid of ``N``
samples per axis (:func:`.bounds.dominating_grid`), fed through ``E`` (the input sits in a
window of the grid, zeros elsewhere) and read through ``R`` (the output window, strided).
``‖C‖`` bounds ``‖A‖`` but ignores both windows: its top singular vectors are plane waves
over the whole grid, and a window of ``n`` samples cannot hold one. That is the
finite-size excess of the circulant bound, 10-15% on 4x4 grids for random kernels.

Write the unitary DFT ``F`` and ``C = F* D F``, ``D`` block diagonal with the blocks
``K̂(ω) = Σ_m K_m e^{iω·m·d}``. Split every block by its SVD into the components kept,
``σ > s₀`` (``r`` of them over all frequencies), and the rest, of norm ``≤ s₀``:
``A = X Σ Y + A_rest`` with ``X = R F* U_kept`` and ``Y = V_keptᴴ F E``. ``R F*`` and ``F E`` are
partial isometries, so for unit ``x, y`` (``a = Xᴴy``, ``b = Yx``) the rest reaches at most
``s₀ √(1−‖a‖²) √(1−‖b‖²) ≤ s₀ (1 − (‖a‖² + ‖b‖²)/2)``, and

    ‖A‖ ≤ s₀ + λ_max⁺( G^{1/2} [[−s₀, Σ], [Σ, −s₀]] G^{1/2} ),  G = diag(XᴴX, YYᴴ).

``XᴴX`` and ``YYᴴ`` are ``r × r``: a kept component is a channel vector times a plane wave,
so their entries are the channel vectors' inner products times the window's Dirichlet
kernel at the two frequencies' difference, one factor per axis. The bound is ``‖C‖`` at
``r = 0`` and ``‖A‖`` exactly once every component is kept; in between it corrects the
components near the top, which is where the excess is. It needs no spectral gap (that is
Lehmann's condition, which random kernels do not meet).

A real kernel's components come in conjugate pairs (``ω`` and ``−ω``); in the real basis of
each pair (the plane wave's cosine and sine parts) every matrix is real, which makes the
``2r``-sized eigenproblem four times cheaper than its complex form.

Arithmetic is float64; singular values not kept are raised by the Gram matrix's and the
eigensolver's standard error bounds, and the result by :data:`.bounds.F64_MARGIN`.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from .circular import dilated_kernel_on_grid
from .layer import ConvOperator

U64 = 2.0 ** -53
# Relative margin on float64 results: their rounding errors were below 1e-13 in every
# configuration tested; the bounds stay valid by a factor of 10⁴.
F64_MARGIN = 1e-9
# The eigen-decompositions of the blocks dominate for wide layers: skip the correction when
# they would take more than a few seconds (rows³ summed over the half spectrum's blocks).
BLOCK_WORK_LIMIT = 4e9
# Components listed per layer (pairs count once): more than a correction can afford to keep.
MAX_COMPONENTS = 4096


@dataclasses.dataclass(frozen=True)
class Components:
    """The singular triplets of the half spectrum's blocks, largest first.

    ``u``/``v`` are channel vectors in the full ``c_out``/``c_in`` slots (zeros outside their
    group), ``freq`` the frequency's grid index per axis, ``paired`` whether the component
    stands for itself and its conjugate at ``−ω`` (False for self-conjugate frequencies,
    whose vectors are real).
    """

    sigma: torch.Tensor
    u: torch.Tensor
    v: torch.Tensor
    freq: torch.Tensor
    paired: torch.Tensor
    gram_error: float  # added to a squared singular value before it is trusted as an upper bound
    complete: bool  # every nonzero component is listed (none cut at MAX_COMPONENTS)


def block_work(op: ConvOperator, grid: tuple[int, ...]) -> float:
    """Roughly the flops of decomposing the half spectrum's blocks (for the skip rule)."""
    side = min(op.out_channels // op.groups, op.weight.shape[1])
    half = math.prod(grid[:-1]) * (grid[-1] // 2 + 1)
    return float(half * op.groups * side ** 3)


def _partner(grid: tuple[int, ...]) -> torch.Tensor:
    """For every flat frequency index, the flat index of its negative."""
    index = torch.arange(math.prod(grid)).reshape(grid)
    return index.flip(tuple(range(len(grid)))).roll((1,) * len(grid), tuple(range(len(grid)))).reshape(-1)


def components(op: ConvOperator, grid: tuple[int, ...]) -> Components:
    """Every block's singular triplets on ``grid`` (half spectrum, float64), sorted by value."""
    groups, rank = op.groups, op.rank
    rows, cols = op.out_channels // groups, op.weight.shape[1]
    kernel = dilated_kernel_on_grid(op.weight.detach().to(torch.float64), op.dilation, grid)
    axes = tuple(range(2, 2 + rank))
    spectrum = torch.fft.ifftn(kernel, dim=axes) * math.prod(grid)  # Σ_p k[p] e^{+iωp}
    spectrum = spectrum.reshape(groups, rows, cols, -1).permute(0, 3, 1, 2)  # (g, freq, rows, cols)
    partner = _partner(grid)
    flat = torch.arange(partner.numel())
    keep = flat <= partner
    selfconj = (flat == partner)[keep]
    blocks = spectrum[:, keep]
    # Self-conjugate frequencies (0 or π on every axis) have real blocks and real vectors.
    blocks[:, selfconj] = blocks[:, selfconj].real.to(blocks.dtype)
    by_columns = cols <= rows
    gram = blocks.mH @ blocks if by_columns else blocks @ blocks.mH
    values, vectors = torch.linalg.eigh(gram)
    real_values, real_vectors = torch.linalg.eigh(gram[:, selfconj].real)
    values[:, selfconj], vectors[:, selfconj] = real_values, real_vectors.to(vectors.dtype)
    sigma = values.clamp_min(0).sqrt()
    frobenius2 = float(torch.view_as_real(blocks).square().sum((-3, -2, -1)).max())
    gram_error = 2 * (min(rows, cols) + 2) * U64 * frobenius2
    # Only components a correction can use: positive, and at most a few thousand.
    order = torch.argsort(sigma.reshape(-1), descending=True)
    complete = int((sigma > 0).sum()) <= MAX_COMPONENTS
    order = order[:MAX_COMPONENTS]
    order = order[sigma.reshape(-1)[order] > 0]
    g_idx, f_idx, i_idx = torch.unravel_index(order, sigma.shape)
    s = sigma[g_idx, f_idx, i_idx]
    side = vectors[g_idx, f_idx, :, i_idx]  # eigenvectors of the Gram side
    images = blocks @ vectors if by_columns else blocks.mH @ vectors  # K̂v = σu, or K̂ᴴu = σv
    other = images[g_idx, f_idx, :, i_idx] / s[:, None]
    v, u = (side, other) if by_columns else (other, side)
    u_full = torch.zeros(len(s), op.out_channels, dtype=torch.complex128)
    v_full = torch.zeros(len(s), op.in_channels, dtype=torch.complex128)
    for g in range(groups):
        mask = g_idx == g
        u_full[mask, g * rows:(g + 1) * rows] = u[mask]
        v_full[mask, g * cols:(g + 1) * cols] = v[mask]
    rep_freq = flat[keep][f_idx]
    freq = torch.stack(torch.unravel_index(rep_freq, grid), -1)
    return Components(s, u_full, v_full, freq, ~selfconj[f_idx], gram_error, complete)


def _window_gram(vectors: torch.Tensor, freq: torch.Tensor, paired: torch.Tensor,
                 positions: list[torch.Tensor], grid: tuple[int, ...]) -> torch.Tensor:
    """The Gram matrix of the kept components' plane waves restricted to a window, in the real
    basis (cosine and sine part of a pair, ``√2`` times real and imaginary parts)."""
    def dirichlet(sign: int) -> torch.Tensor:
        out = torch.ones(len(freq), len(freq), dtype=torch.complex128)
        for axis, (n, pos) in enumerate(zip(grid, positions)):
            table = torch.exp(2j * math.pi * torch.arange(n, dtype=torch.float64)[:, None] * pos[None, :] / n).sum(1) / n
            j = freq[:, axis]
            out = out * table[(j[None, :] + sign * j[:, None]) % n]
        return out

    plain = (vectors.conj() @ vectors.T) * dirichlet(-1)   # Σ_p conj(z_a) z_b
    twisted = (vectors @ vectors.T) * dirichlet(+1)        # Σ_p z_a z_b
    cos_cos = (plain + twisted).real
    sin_sin = (plain - twisted).real
    cos_sin = (plain + twisted).imag
    real = torch.cat([torch.cat([cos_cos, cos_sin], 1), torch.cat([cos_sin.T, sin_sin], 1)], 0)
    # A self-conjugate component is one real wave: its cosine part over √2, no sine part.
    half = torch.full((len(freq),), 1 / math.sqrt(2), dtype=torch.float64)
    scale = torch.cat([torch.where(paired, 1.0, half), torch.ones(len(freq), dtype=torch.float64)])
    real = real * scale[:, None] * scale[None, :]
    used = torch.cat([torch.ones_like(paired), paired])
    real = real[used][:, used]
    return (real + real.T) / 2


def _positions(op: ConvOperator) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per axis, the grid positions of the input window and of the outputs read."""
    inputs = [torch.arange(n, dtype=torch.float64) for n in op.input_size]
    outputs = [torch.arange(m, dtype=torch.float64) * s - left
               for m, s, (left, _) in zip(op.out_size, op.stride, op.padding)]
    return inputs, outputs


def _cholesky(gram: torch.Tensor) -> torch.Tensor:
    """A factor of ``gram + εI`` (a larger ``G`` only raises the bound), ``ε`` grown until it
    factors."""
    shift = 1e-12 * max(1.0, float(gram.diagonal().max()))
    while True:
        factor, info = torch.linalg.cholesky_ex(gram + shift * torch.eye(len(gram), dtype=gram.dtype))
        if int(info) == 0:
            return factor
        shift *= 100


def corrected_bound(op: ConvOperator, grid: tuple[int, ...], comps: Components, count: int) -> tuple[float, int]:
    """The bound with the ``count`` largest components kept (a pair is kept whole); returns
    the bound and how many real components it kept."""
    paired = comps.paired
    weight = torch.where(paired, 2, 1)
    total = torch.cumsum(weight, 0)
    kept = int((total <= count).sum())
    if kept >= len(comps.sigma) and not comps.complete:  # the rest must cover what was cut
        kept = len(comps.sigma) - 1
    rest_value = float(comps.sigma[kept]) if kept < len(comps.sigma) else 0.0
    s0 = math.sqrt(rest_value ** 2 + comps.gram_error)
    if kept == 0:
        return s0, 0
    sl = slice(0, kept)
    inputs, outputs = _positions(op)
    gx = _window_gram(comps.u[sl], comps.freq[sl], paired[sl], outputs, grid)
    gy = _window_gram(comps.v[sl], comps.freq[sl], paired[sl], inputs, grid)
    sigma = torch.cat([comps.sigma[sl], comps.sigma[sl][paired[sl]]])
    lx, ly = _cholesky(gx), _cholesky(gy)
    middle = (lx.T * sigma[None, :]) @ ly
    pencil = torch.cat([torch.cat([-s0 * (lx.T @ lx), middle], 1), torch.cat([middle.T, -s0 * (ly.T @ ly)], 1)], 0)
    top = float(torch.linalg.eigvalsh((pencil + pencil.T) / 2)[-1])
    return s0 + max(top, 0.0), len(sigma)


def windowed_upper(op: ConvOperator, grid: tuple[int, ...], good_enough: float,
                   max_components: int = 2048) -> Optional[tuple[float, int]]:
    """The smallest window-corrected bound found keeping 64, 128, … up to ``max_components``
    components, stopping once a bound is at most ``good_enough``; ``None`` when the blocks
    are too wide to decompose in time (:data:`BLOCK_WORK_LIMIT`). Returns the bound (with
    float64's margin) and the number of components behind it."""
    if block_work(op, grid) > BLOCK_WORK_LIMIT:
        return None
    comps = components(op, grid)
    if len(comps.sigma) < 2:
        return None
    best: Optional[tuple[float, int]] = None
    count = 64
    while True:
        bound, used = corrected_bound(op, grid, comps, count)
        bound *= 1 + F64_MARGIN
        if best is None or bound < best[0]:
            best = (bound, used)
        if best[0] <= good_enough or count >= max_components or used >= int(comps.paired.sum()) + len(comps.sigma):
            return best
        count *= 2
