"""Exact singular values of periodic (circularly padded) convolutions.

On a periodic grid of ``N`` samples per axis a conv is block circulant, and the unitary
DFT block-diagonalises it (Sedghi, Gupta & Long, ICLR 2019): its singular values are
those of the ``∏N`` per-frequency ``c_out × c_in`` matrices ``K̂(ω)`` of the weight's
spectrum. Three generalisations are exact too:

- **groups**: the per-frequency matrix is block diagonal, one block per group;
- **dilation**: the dilated kernel is a kernel on the grid (taps further apart than the
  grid wraps are summed where they land, as the periodic conv sums them);
- **stride** ``s`` (dividing ``N``): the conv reads ``s^d`` polyphase components, and on the
  output grid ``M = N / s`` the operator is a stride-1 conv of those components. In the
  frequency domain output frequency ``u`` collects the ``s^d`` input frequencies that alias
  onto it: its block is ``s^{-d/2} [K̂(u + a·M)]_a``, ``c_out × c_in·s^d`` (the unitary DFT
  of a subsampled signal sums its aliases; the scale keeps the transform unitary).

A real kernel's spectrum is conjugate symmetric, ``K̂(−ω) = conj K̂(ω)``, so the blocks of
``u`` and ``−u`` have the same singular values: only the half spectrum along the last axis
is decomposed (rfft's layout), each block counted twice except the self-conjugate ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import torch

from .layer import ConvOperator, LayerError

# Blocks with more rows and columns than this go through their Gram matrix: batched complex
# SVDs of 512x512 blocks took 0.4 s each on a 2-core CPU, the Gram matrix and its
# eigenvalues 0.03 s.
SVD_BLOCK_LIMIT = 128


@dataclasses.dataclass(frozen=True)
class Blocks:
    """The per-frequency matrices of a periodic conv on a grid.

    ``matrices`` has shape ``(groups, frequencies, rows, cols)``; ``multiplicity[f]`` is how
    many frequencies of the full spectrum block ``f`` stands for (1 or 2); ``grid`` is the
    input grid and ``out_grid`` the output frequencies' grid (``grid / stride``).
    """

    matrices: torch.Tensor
    multiplicity: torch.Tensor
    grid: tuple[int, ...]
    out_grid: tuple[int, ...]

    @property
    def count(self) -> int:
        """How many singular values the operator has (with multiplicity)."""
        g, _, rows, cols = self.matrices.shape
        return g * int(self.multiplicity.sum()) * min(rows, cols)


def dilated_kernel_on_grid(weight: torch.Tensor, dilation: Sequence[int], grid: Sequence[int]) -> torch.Tensor:
    """The weight's taps placed on a periodic grid: tap ``m`` at position ``m·d mod N`` per
    axis, taps landing on the same position summed. Shape ``(c_out, c_in_g, *grid)``."""
    rank = weight.dim() - 2
    out = weight
    for axis in range(rank):
        dim = 2 + axis
        k, d, n = out.shape[dim], dilation[axis], grid[axis]
        span = d * (k - 1) + 1
        if d > 1:  # insert d - 1 zeros between taps
            shape = list(out.shape)
            shape[dim] = span
            spread = out.new_zeros(shape)
            spread.narrow(dim, 0, span)[(slice(None),) * dim + (slice(None, None, d),)] = out
            out = spread
        if span <= n:
            pad = [0, 0] * (out.dim() - 1 - dim) + [0, n - span]
            out = torch.nn.functional.pad(out, pad)
        else:  # wrap: pad to a multiple of n and sum the periods
            periods = -(-span // n)
            pad = [0, 0] * (out.dim() - 1 - dim) + [0, periods * n - span]
            out = torch.nn.functional.pad(out, pad)
            shape = list(out.shape)
            shape[dim:dim + 1] = [periods, n]
            out = out.reshape(shape).sum(dim)
    return out


# A spectrum on a grid of F frequencies costs F·T multiply-adds per channel pair as a direct
# DFT over the T taps and about 5·N·log₂N as an FFT of the kernel placed on the grid;
# the direct sum is also exact to a few ulps per entry, with no FFT error constant.
DIRECT_DFT_TAPS = 64


@functools.lru_cache(maxsize=64)
def _dft_phases(kernel_size: tuple[int, ...], dilation: tuple[int, ...], grid: tuple[int, ...],
                out_shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` of each (frequency, tap) phase ``2π Σ_axes u·m·d / N`` (reduced
    modulo ``N`` in integers first), float64, ``frequencies × taps``. Cached: a training
    penalty asks for the same geometry every step."""
    rank = len(kernel_size)
    positions = torch.stack(torch.meshgrid(*[torch.arange(k) * d for k, d in zip(kernel_size, dilation)],
                                           indexing="ij"), -1).reshape(-1, rank)
    freqs = torch.stack(torch.meshgrid(*[torch.arange(m) for m in out_shape], indexing="ij"), -1).reshape(-1, rank)
    turns = torch.zeros(freqs.shape[0], positions.shape[0], dtype=torch.float64)
    for axis in range(rank):
        cycles = (freqs[:, axis:axis + 1] * positions[:, axis][None, :]) % grid[axis]
        turns += cycles.to(torch.float64) / grid[axis]
    angle = 2 * math.pi * turns
    return torch.cos(angle), torch.sin(angle)


def grid_spectrum(weight: torch.Tensor, dilation: Sequence[int], grid: Sequence[int], half_last: bool,
                  dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The weight's DFT on ``grid`` (``(c_out, c_in_g, *grid)``, the last axis halved as rfft
    lays it out where ``half_last``), complex of ``dtype``'s precision."""
    rank = weight.dim() - 2
    taps = math.prod(weight.shape[2:])
    complex_dtype = torch.complex128 if dtype == torch.float64 else torch.complex64
    out_shape = (*grid[:-1], grid[-1] // 2 + 1 if half_last else grid[-1])
    if taps > DIRECT_DFT_TAPS:
        kernel = dilated_kernel_on_grid(weight.to(dtype), dilation, grid)
        axes = tuple(range(2, 2 + rank))
        spectrum = torch.fft.rfftn(kernel, dim=axes) if half_last else torch.fft.fftn(kernel, dim=axes)
        return spectrum.to(complex_dtype)
    cos, sin = _dft_phases(tuple(weight.shape[2:]), tuple(dilation), tuple(grid), out_shape)
    flat = weight.reshape(weight.shape[0] * weight.shape[1], taps).T.to(dtype)  # taps x pairs
    real = cos.to(dtype) @ flat
    imag = -sin.to(dtype) @ flat
    spectrum = torch.complex(real, imag).to(complex_dtype)  # freqs x pairs
    return spectrum.T.reshape(*weight.shape[:2], *out_shape)


def _check_grid(op: ConvOperator, grid: Sequence[int]) -> tuple[int, ...]:
    grid = tuple(int(n) for n in grid)
    for axis, (n, s) in enumerate(zip(grid, op.stride)):
        if n % s:
            raise LayerError(f"{op.name}: stride {s} does not divide the periodic grid size {n} on axis {axis}; "
                             f"a strided conv is block circulant only on a grid that is a multiple of its stride")
    return grid


def _alias_shape(op: ConvOperator, spectrum_shape: Sequence[int], half_last: bool) -> list[int]:
    """``(g, co_g, ci_g, s₁, M₁, …, s_d, M_d)``: each axis of the spectrum split into alias
    ``a`` (major) and output frequency ``u``, full-grid index ``a·M + u``."""
    shape = [op.groups, op.out_channels // op.groups, op.weight.shape[1]]
    for axis in range(op.rank):
        size, s = spectrum_shape[2 + axis], op.stride[axis]
        shape += [1, size] if axis == op.rank - 1 and half_last else [s, size // s]
    return shape


def _block_permutation(rank: int) -> list[int]:
    """From the alias shape to ``(g, u₁ … u_d, co_g, ci_g, a₁ … a_d)``."""
    return [0, *[4 + 2 * axis for axis in range(rank)], 1, 2, *[3 + 2 * axis for axis in range(rank)]]


def periodic_blocks(op: ConvOperator, grid: Sequence[int], dtype: torch.dtype = torch.float64,
                    half: bool = True) -> Blocks:
    """The per-frequency matrices of ``op``'s kernel, stride, dilation and groups as a
    periodic conv on ``grid`` (each grid size a multiple of the stride). The padding only
    shifts a periodic conv, which leaves its singular values unchanged. With ``half`` only
    the half spectrum along the last axis is kept; otherwise every output frequency, in
    the layout :func:`kernel_from_blocks` inverts. The weight is used as it is (a weight
    that requires grad gives differentiable blocks)."""
    grid = _check_grid(op, grid)
    rank, g = op.rank, op.groups
    # Stride 1 on the last axis: the rfft half spectrum there is all that is needed.
    half_last = half and op.stride[-1] == 1
    spectrum = grid_spectrum(op.weight, op.dilation, grid, half_last, dtype)
    co_g = op.out_channels // g
    out_grid = tuple(n // s for n, s in zip(grid, op.stride))
    blocks = spectrum.reshape(_alias_shape(op, spectrum.shape, half_last)).permute(_block_permutation(rank))
    freq_shape = blocks.shape[1:1 + rank]
    stride_count = math.prod(op.stride)
    blocks = blocks.reshape(g, math.prod(freq_shape), co_g, -1)
    if stride_count > 1:
        blocks = blocks / math.sqrt(stride_count)
    m_last = out_grid[-1]
    if half and not half_last:  # keep the half spectrum of the output grid along the last axis
        blocks = blocks.reshape(g, *freq_shape, co_g, -1)[..., : m_last // 2 + 1, :, :]
        freq_shape = (*freq_shape[:-1], m_last // 2 + 1)
        blocks = blocks.reshape(g, math.prod(freq_shape), co_g, -1)
    if half:
        last = torch.arange(freq_shape[-1])
        per_last = torch.where((last == 0) | (2 * last == m_last), 1, 2)
        multiplicity = per_last.repeat(math.prod(freq_shape[:-1]))
    else:
        multiplicity = torch.ones(math.prod(freq_shape), dtype=torch.long)
    return Blocks(blocks.contiguous(), multiplicity, grid, out_grid)


def kernel_from_blocks(op: ConvOperator, blocks: Blocks) -> torch.Tensor:
    """The weight whose periodic conv on ``blocks.grid`` is nearest (in Frobenius norm of the
    operator) to the one the full-spectrum ``blocks`` describe, changing ``op``'s taps as
    little as possible: the blocks' kernel on the grid is cropped to the positions the taps
    land on, and where several (wrapped) taps land on one position the change there is
    shared equally among them. Returned in ``op.weight``'s dtype."""
    rank, grid = op.rank, blocks.grid
    matrices = blocks.matrices * math.sqrt(math.prod(op.stride))
    shape = _alias_shape(op, (0, 0, *grid), half_last=False)
    # Invert the permutation and reshape of periodic_blocks(half=False).
    permuted_shape = [shape[i] for i in _block_permutation(rank)]
    inverse = [0] * len(permuted_shape)
    for position, source in enumerate(_block_permutation(rank)):
        inverse[source] = position
    spectrum = matrices.reshape(permuted_shape).permute(inverse).reshape(op.out_channels, -1, *grid)
    kernel = torch.fft.ifftn(spectrum, dim=tuple(range(2, 2 + rank))).real
    positions = [torch.arange(k) * d % n for k, d, n in zip(op.kernel_size, op.dilation, grid)]
    index = torch.meshgrid(*positions, indexing="ij")
    target = kernel[(slice(None), slice(None), *index)]
    old = op.weight.detach().to(kernel.dtype)
    current = dilated_kernel_on_grid(old, op.dilation, grid)[(slice(None), slice(None), *index)]
    counts = dilated_kernel_on_grid(torch.ones(1, 1, *op.kernel_size, dtype=kernel.dtype), op.dilation, grid)
    counts = counts[(0, 0, *index)]
    return (old + (target - current) / counts).to(op.weight.dtype)


def block_singular_values(matrices: torch.Tensor) -> torch.Tensor:
    """Singular values of each matrix of a batch, descending: batched SVD for small blocks,
    the eigenvalues of the smaller Gram matrix for large ones (there the smallest values
    are accurate to about √ε·σ_max rather than ε·σ_max)."""
    rows, cols = matrices.shape[-2:]
    if min(rows, cols) <= SVD_BLOCK_LIMIT:
        return torch.linalg.svdvals(matrices)
    gram = matrices @ matrices.mH if rows <= cols else matrices.mH @ matrices
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).sqrt()


def expand_values(values: torch.Tensor, multiplicity: torch.Tensor) -> torch.Tensor:
    """``values`` of shape ``(groups, frequencies, r)`` as one descending list, each
    frequency's values repeated by its multiplicity."""
    g, f, r = values.shape
    repeated = values.transpose(0, 1).reshape(f, g * r).repeat_interleave(multiplicity.to(values.device), dim=0)
    return repeated.reshape(-1).sort(descending=True).values


def circular_singular_values(op: ConvOperator, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """All singular values of ``op``'s kernel as a periodic conv on its input grid
    (Sedghi et al.'s operator), descending. Exact: the layer's own operator when it is
    circularly padded with ``n / s`` outputs per axis (:attr:`ConvOperator.periodic`)."""
    blocks = periodic_blocks(op, op.input_size, dtype)
    return expand_values(block_singular_values(blocks.matrices), blocks.multiplicity)
