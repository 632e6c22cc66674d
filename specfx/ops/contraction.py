"""The per-frequency channel contraction of a spectral conv, and its adjoints.

``Y[n, g, o, f] = Σ_c X[n, g, c, f] · W[g, o, c, f]`` has two implementations:

- ``"accumulate"``: one broadcast multiply-add per input channel, vectorized over the
  frequencies (which are contiguous in the spectrum). Depthwise convs (one input channel
  per group) are exactly one elementwise product. Best when a group has few input
  channels: no transposes, and no per-frequency GEMM call overhead.
- ``"gemm"``: one complex GEMM per (group, frequency) with the batch as the M dimension
  (the fbfft formulation), on spectra transposed to frequency-major order.

:func:`choose_path` (a measured rule the planner reads too, so it lives in
:mod:`specfx.rates`) picks between them; each path has its own weight layout, which the
weight-spectrum cache stores so the layout work is paid once.

The adjoints (the input and kernel gradients) run inside custom ops, like the forward:
their conjugates are materialized (``conj_physical``), because a custom op's kernel called
under a ``TorchDispatchMode`` (AOTAutograd's first call of a compiled graph) runs with the
``Conjugate`` dispatch key excluded, where elementwise ops ignore a lazy conj bit.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch

from ..rates import ACCUMULATE, GEMM, choose_path  # noqa: F401  (choose_path: this module's API too)


def layout_accumulate(w_hat: torch.Tensor, groups: int) -> torch.Tensor:
    """``(C_out, C_in/g, *bins)`` → ``(g, C_out/g, C_in/g, F)`` (a view)."""
    c_out, c_in_g = w_hat.shape[:2]
    return w_hat.reshape(groups, c_out // groups, c_in_g, -1)


def layout_gemm(w_hat: torch.Tensor, groups: int) -> torch.Tensor:
    """``(C_out, C_in/g, *bins)`` → ``(g·F, C_in/g, C_out/g)``, contiguous."""
    laid = layout_accumulate(w_hat, groups)
    g, c_out_g, c_in_g, freqs = laid.shape
    return laid.permute(0, 3, 2, 1).reshape(g * freqs, c_in_g, c_out_g).contiguous()


LAYOUTS = {ACCUMULATE: layout_accumulate, GEMM: layout_gemm}


def laid_shape(c_out: int, c_in_g: int, freqs: int, groups: int, path: str) -> tuple[int, ...]:
    """Shape of a ``(C_out, C_in/g)`` kernel spectrum of ``freqs`` bins laid out for ``path``."""
    if path == ACCUMULATE:
        return (groups, c_out // groups, c_in_g, freqs)
    return (groups * freqs, c_in_g, c_out // groups)


def group_view(laid: torch.Tensor, groups: int, path: str) -> torch.Tensor:
    """A laid-out kernel spectrum viewed as ``(g, C_out/g, C_in/g, F)``: writing a block of
    kernel spectra through this view lays it out."""
    if path == ACCUMULATE:
        return laid
    freqs = laid.shape[0] // groups
    return laid.view(groups, freqs, *laid.shape[1:]).permute(0, 3, 2, 1)


def flatten_groups(x_hat: torch.Tensor, groups: int, spectral_rank: int) -> torch.Tensor:
    """``(*batch, C, *bins)`` → ``(N, g, C/g, F)``; an unbatched input has N = 1. The
    sizes are spelled out: a -1 is ambiguous for an empty batch."""
    channel_dim = x_hat.dim() - spectral_rank - 1
    channels = x_hat.shape[channel_dim]
    return x_hat.reshape(x_hat.shape[:channel_dim].numel(), groups, channels // groups,
                         x_hat.shape[-spectral_rank:].numel())


def _unflatten(y: torch.Tensor, like: torch.Tensor, spectral_rank: int) -> torch.Tensor:
    """``(N, g, C/g, F)`` → the batch and bin shape of ``like``."""
    batch = like.shape[: like.dim() - spectral_rank - 1]
    return y.reshape(*batch, y.shape[1] * y.shape[2], *like.shape[-spectral_rank:])


# Below this many products a single broadcast product and sum beats a Python loop of
# multiply-adds (whose per-call overhead dominates small spectra); the bound keeps its
# temporary under 2 MiB.
_BROADCAST_LIMIT = 1 << 18


def _accumulate(x: torch.Tensor, w: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``(N, g, C, F)`` by ``(g, O, C, F)`` → ``(N, g, O, F)``, summing over C (into
    ``out`` when given)."""
    n, g, c, freqs = x.shape
    if c > 1 and n * g * w.shape[1] * c * freqs <= _BROADCAST_LIMIT:
        return torch.sum(x[:, :, None] * w[None], dim=3, out=out)
    # (N, g, 1, F) against (g, O, F): the views broadcast as they are.
    xs, ws = x.unsqueeze(2).unbind(3), w.unbind(2)
    y = torch.mul(xs[0], ws[0], out=out)
    for x_c, w_c in zip(xs[1:], ws[1:]):
        y.addcmul_(x_c, w_c)
    return y


def _gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(N, g, C, F)`` by ``(g·F, C, O)`` → ``(N, g, O, F)``: batched GEMM over (g, f)."""
    return _gemm_rows(_rows(x), w, x.shape[1])


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``(N, g, C, F)`` → ``(g·F, N, C)``, contiguous: the GEMMs' left operands."""
    n, g, c, freqs = x.shape
    return x.permute(1, 3, 0, 2).contiguous().view(g * freqs, n, c)


def _gemm_rows(rows: torch.Tensor, w: torch.Tensor, groups: int) -> torch.Tensor:
    """:func:`_gemm` of operands already laid out by :func:`_rows`."""
    n = rows.shape[1]
    y = torch.bmm(rows, w).view(groups, rows.shape[0] // groups, n, w.shape[-1])
    # Before the result's copy, where the caller kept no reference (as in _gemm): three
    # spectra at the peak, not four.
    del rows
    return y.permute(2, 0, 3, 1).contiguous()


def mix_blocks(x_hat: torch.Tensor, w_laid: torch.Tensor, groups: int, spectral_rank: int, path: str,
               blocks: list[tuple[slice, slice]]) -> Iterator[tuple[int, torch.Tensor]]:
    """:func:`mix` one block of output channels at a time, for ``blocks`` of ``(groups,
    output channels within each group)`` that each cover a contiguous channel range (whole
    groups, or a slice of one group): yields each block's first output channel and its
    ``(N, channels, *bins)`` result. The whole output spectrum never exists at once."""
    x = flatten_groups(x_hat, groups, spectral_rank)
    n, _, c, _ = x.shape
    w = group_view(w_laid, groups, path)
    out_per_group = w.shape[1]
    bins = x_hat.shape[x_hat.dim() - spectral_rank:]
    rows, rows_of = None, None
    for group_block, out_block in blocks:
        w_block = w[group_block, out_block]
        if path == ACCUMULATE:
            y = _accumulate(x[:, group_block], w_block)
        else:
            if rows_of != group_block:  # one layout per block of groups, not per block of channels
                rows, rows_of = _rows(x[:, group_block]), group_block
            y = _gemm_rows(rows, w_block.permute(0, 3, 2, 1).reshape(-1, c, w_block.shape[1]), w_block.shape[0])
        yield group_block.start * out_per_group + (out_block.start or 0), y.view(n, -1, *bins)


def mix(x_hat: torch.Tensor, w_laid: torch.Tensor, groups: int, spectral_rank: int, path: str) -> torch.Tensor:
    """``Y[n, o, f] = Σ_c X[n, c, f] · W[o, c, f]`` within each group; contiguous."""
    x = flatten_groups(x_hat, groups, spectral_rank)
    y = _accumulate(x, w_laid) if path == ACCUMULATE else _gemm(x, w_laid)
    return _unflatten(y, x_hat, spectral_rank)


# The accumulate path conjugates the weight spectrum a block of groups of about this many
# bytes at a time: the backward's peak is three spectra of the input's size, and a whole
# conjugated copy of the weight spectrum would add to it.
_CONJ_BLOCK_BYTES = 1 << 18


def mix_adjoint_input(grad_y: torch.Tensor, w_laid: torch.Tensor, groups: int, spectral_rank: int,
                      path: str) -> torch.Tensor:
    """Gradient of :func:`mix` with respect to ``x_hat``: ``Σ_o gY[n, o, f]·conj(W[o, c, f])``
    within each group, with ``W`` laid out for ``path``; contiguous.

    The conjugate is materialized on the smaller operand: ``conj(W)`` (on the accumulate
    path a block of groups at a time, written into the result), or, where the kernel
    spectrum is the larger (wide convs on short signals), ``conj(Σ_o conj(gY)·W)``,
    conjugating the result in place.
    """
    g = flatten_groups(grad_y, groups, spectral_rank)
    if w_laid.numel() > g.numel():
        contract = _accumulate if path == ACCUMULATE else _gemm
        gx = contract(g.conj_physical(), w_laid.transpose(1, 2)).conj_physical_()
    elif path == GEMM:
        gx = _gemm(g, w_laid.conj_physical().transpose(1, 2))
    else:
        n, _, _, freqs = g.shape
        gx = g.new_empty((n, groups, w_laid.shape[2], freqs))
        step = max(1, _CONJ_BLOCK_BYTES // (w_laid[0].numel() * w_laid.element_size()))
        for start in range(0, groups, step):
            block = slice(start, start + step)
            _accumulate(g[:, block], w_laid[block].conj_physical().transpose(1, 2), out=gx[:, block])
    return _unflatten(gx, grad_y, spectral_rank)


def batch_outer(x: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """``K[j, o, c, f] = Σ_n x[n, j, c, f]·g[n, j, o, f]``: ``(N, g, C, F)`` and
    ``(N, g, O, F)`` → ``(g, O, C, F)``, contiguous; the kernel-gradient contraction (the
    caller passes the conjugates it needs)."""
    n, groups, c, freqs = x.shape
    if n <= 4 or c == 1:
        # A sum over the batch of outer products in the channel dims.
        k = g[0, :, :, None, :] * x[0, :, None, :, :]
        for i in range(1, n):
            k.addcmul_(g[i, :, :, None, :], x[i, :, None, :, :])
        return k
    rows_x = x.permute(1, 3, 2, 0).reshape(groups * freqs, c, n)
    rows_g = g.permute(1, 3, 0, 2).reshape(groups * freqs, n, g.shape[2])
    k = torch.bmm(rows_x, rows_g).view(groups, freqs, c, -1)
    return k.permute(0, 3, 2, 1).contiguous()
