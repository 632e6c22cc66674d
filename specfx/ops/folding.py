"""Strided output in the frequency domain: fold the spectrum instead of cropping the signal.

Keeping every ``s``-th sample of a length-``P`` signal (``P = s·Q``) is, for its
spectrum, a sum of ``s`` aliases: ``D[k] = (1/s) Σ_m C[k + m·Q]`` for ``k < Q``. So a
strided conv's inverse transform runs at size ``Q`` per axis instead of ``P``, ``s``
times less work. On the half-spectrum (last) axis the aliases above ``P/2`` are the
conjugates of mirrored bins, with the other axes' frequencies negated.

For spectra of real signals (the only ones the lowering produces) this equals the
inverse transform at ``P`` followed by the strided crop; :func:`fold_adjoint` is the
exact adjoint of :func:`fold` as written, so the two stay consistent for any input.
"""

from __future__ import annotations

from typing import Sequence

import torch


def applies(fft_size: Sequence[int], stride: Sequence[int], out_size: Sequence[int]) -> bool:
    """Folding is used when some axis is strided and every strided axis has a grid that
    is a multiple of its stride and outputs that fit the folded grid (no wrap-around)."""
    return any(s > 1 for s in stride) and all(
        s == 1 or (n % s == 0 and out <= n // s) for n, s, out in zip(fft_size, stride, out_size))


def folded_size(fft_size: Sequence[int], stride: Sequence[int]) -> list[int]:
    return [n // s for n, s in zip(fft_size, stride)]


def _last_axis_maps(n: int, s: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """For each alias ``i = k + m·Q`` of the folded bins ``k ≤ Q/2``: the stored bin it
    reads directly (``i ≤ n/2``) or, conjugated and mirrored, ``n − i``. Built from the
    static sizes alone, so traced graphs hold no data-dependent shapes."""
    q = n // s
    aliases = [(k + m * q, k) for m in range(s) for k in range(q // 2 + 1)]
    direct = [(i, k) for i, k in aliases if i <= n // 2]
    mirrored = [(n - i, k) for i, k in aliases if i > n // 2]

    def index(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=device)

    return (index([i for i, _ in direct]), index([k for _, k in direct]),
            index([j for j, _ in mirrored]), index([k for _, k in mirrored]))


def _negate_frequencies(c: torch.Tensor, rank: int) -> torch.Tensor:
    """``c`` at frequencies ``(−k) mod P`` on every full (non-last) spatial axis."""
    for axis in range(rank - 1):
        dim = c.dim() - rank + axis
        n = c.shape[dim]
        c = c.index_select(dim, (-torch.arange(n, device=c.device)) % n)
    return c


def fold(c: torch.Tensor, fft_size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """The one-sided spectrum, at :func:`folded_size`, of every ``stride``-th sample of the
    signal whose one-sided spectrum at ``fft_size`` is ``c``."""
    rank = len(fft_size)
    n, s = fft_size[-1], stride[-1]
    if s > 1:
        # The last axis's full n bins (the stored ones, then the conjugated mirrors of
        # bins n//2+1 .. n-1), summed over the s aliases of each folded bin by a reshape:
        # the same real-linear map as indexing each alias (fold_adjoint's), without the
        # scatter. On a (1, 512, 160000) stride-5 conv the scatter and its index maps
        # took 12 s of a 20 s call. The conjugate is materialized: under a TorchDispatchMode
        # (AOTAutograd's first call of a compiled graph) a lazy conj bit is ignored.
        mirrors = _negate_frequencies(c.narrow(-1, 1, n - n // 2 - 1), rank).flip(-1).conj_physical()
        full = torch.cat([c, mirrors], dim=-1)
        c = full.unflatten(-1, (s, n // s)).sum(-2).narrow(-1, 0, n // s // 2 + 1)
    for axis in range(rank - 1):
        s = stride[axis]
        if s > 1:
            dim = c.dim() - rank + axis
            c = c.unflatten(dim, (s, c.shape[dim] // s)).sum(dim)
    scale = 1
    for s in stride:
        scale *= s
    return c / scale


def fold_adjoint(grad: torch.Tensor, fft_size: Sequence[int], stride: Sequence[int]) -> torch.Tensor:
    """Adjoint of :func:`fold` (as a real-linear map on one-sided spectra)."""
    rank = len(fft_size)
    scale = 1
    for s in stride:
        scale *= s
    grad = grad / scale
    for axis in reversed(range(rank - 1)):
        s = stride[axis]
        if s > 1:
            dim = grad.dim() - rank + axis
            grad = grad.unsqueeze(dim).expand(*grad.shape[:dim], s, *grad.shape[dim:]).flatten(dim, dim + 1)
    n, s = fft_size[-1], stride[-1]
    if s == 1:
        return grad
    src, dst, mirror_src, mirror_dst = _last_axis_maps(n, s, grad.device)
    out = grad.new_zeros((*grad.shape[:-1], n // 2 + 1))
    out.index_add_(-1, src, grad.index_select(-1, dst))
    if len(mirror_src):
        mirrored = grad.new_zeros(out.shape).index_add_(-1, mirror_src, grad.index_select(-1, mirror_dst).conj())
        out = out + _negate_frequencies(mirrored, rank)
    return out
