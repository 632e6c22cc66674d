"""The per-frequency channel contraction of a spectral conv, and its adjoints.

``Y[n, g, o, f] = Σ_c X[n, g, c, f] · W[g, o, c, f]`` has two implementations:

- ``"accumulate"``: one broadcast multiply-add per input channel, vectorized over the
  frequencies (which are contiguous in the spectrum). Depthwise convs (one input channel
  per group) are exactly one elementwise product. Best when a group has few input
  channels: no transposes, and no per-frequency GEMM call overhead.
- ``"gemm"``: one complex GEMM per (group, frequency) with the batch as the M dimension
  (the fbfft formulation), on spectra transposed to frequency-major order.

:func:`choose_path` picks between them; each path has its own weight layout, which the
weight-spectrum cache stores so the layout work is paid once.
"""

from __future__ import annotations

import torch

ACCUMULATE, GEMM = "accumulate", "gemm"


def choose_path(in_channels_per_group: int, batch: int) -> str:
    """Accumulate for small contractions (measured on a 2-core x86 CPU: it wins up to 8
    input channels per group, and up to 16 at batch ≤ 2), GEMM otherwise."""
    small = in_channels_per_group <= 8 or (in_channels_per_group <= 16 and batch <= 2)
    return ACCUMULATE if small else GEMM


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


def _flatten(x_hat: torch.Tensor, groups: int, spectral_rank: int) -> torch.Tensor:
    """``(*batch, C, *bins)`` → ``(N, g, C/g, F)``; an unbatched input has N = 1."""
    channels = x_hat.shape[x_hat.dim() - spectral_rank - 1]
    return x_hat.reshape(-1, groups, channels // groups, x_hat.shape[-spectral_rank:].numel())


def _unflatten(y: torch.Tensor, like: torch.Tensor, spectral_rank: int) -> torch.Tensor:
    """``(N, g, C/g, F)`` → the batch and bin shape of ``like``."""
    batch = like.shape[: like.dim() - spectral_rank - 1]
    return y.reshape(*batch, -1, *like.shape[-spectral_rank:])


# Below this many products a single broadcast product and sum beats a Python loop of
# multiply-adds (whose per-call overhead dominates small spectra); the bound keeps its
# temporary under 2 MiB.
_BROADCAST_LIMIT = 1 << 18


def _accumulate(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(N, g, C, F)`` by ``(g, O, C, F)`` → ``(N, g, O, F)``, summing over C."""
    n, g, c, freqs = x.shape
    if c > 1 and n * g * w.shape[1] * c * freqs <= _BROADCAST_LIMIT:
        return (x[:, :, None] * w[None]).sum(dim=3)
    xs, ws = x.unbind(2), w.unbind(2)
    y = xs[0].unsqueeze(2) * ws[0].unsqueeze(0)
    for x_c, w_c in zip(xs[1:], ws[1:]):
        y.addcmul_(x_c.unsqueeze(2), w_c.unsqueeze(0))
    return y


def _gemm(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``(N, g, C, F)`` by ``(g·F, C, O)`` → ``(N, g, O, F)``: batched GEMM over (g, f)."""
    n, g, c, freqs = x.shape
    rows = x.permute(1, 3, 0, 2).contiguous().view(g * freqs, n, c)
    y = torch.bmm(rows, w).view(g, freqs, n, w.shape[-1])
    return y.permute(2, 0, 3, 1).contiguous()


def mix(x_hat: torch.Tensor, w_laid: torch.Tensor, groups: int, spectral_rank: int, path: str) -> torch.Tensor:
    """``Y[n, o, f] = Σ_c X[n, c, f] · W[o, c, f]`` within each group; contiguous."""
    x = _flatten(x_hat, groups, spectral_rank)
    y = _accumulate(x, w_laid) if path == ACCUMULATE else _gemm(x, w_laid)
    return _unflatten(y, x_hat, spectral_rank)


def mix_adjoint_input(grad_y: torch.Tensor, w_laid: torch.Tensor, groups: int, spectral_rank: int,
                      path: str) -> torch.Tensor:
    """Gradient of :func:`mix` with respect to ``x_hat``: the same contraction with
    ``conj(W)`` transposed, laid out for ``path``."""
    g = _flatten(grad_y, groups, spectral_rank)
    if path == ACCUMULATE:
        gx = _accumulate(g, w_laid.conj().transpose(1, 2))
    else:
        gx = _gemm(g, w_laid.conj().transpose(1, 2))
    return _unflatten(gx, grad_y, spectral_rank)


def mix_adjoint_weight(x_hat: torch.Tensor, grad_y: torch.Tensor, groups: int,
                       spectral_rank: int) -> torch.Tensor:
    """Gradient of :func:`mix` with respect to the weight spectrum, as
    ``(C_out, C_in/g, *bins)``: ``Σ_n conj(X[n, c, f]) · gY[n, o, f]``."""
    x = _flatten(x_hat, groups, spectral_rank).conj()
    g = _flatten(grad_y, groups, spectral_rank)
    n, groups_, c_in_g, freqs = x.shape
    if n <= 4 or c_in_g == 1:
        # (g, O, C, F): a sum over the batch of outer products in the channel dims.
        gw = g[0, :, :, None, :] * x[0, :, None, :, :]
        for i in range(1, n):
            gw.addcmul_(g[i, :, :, None, :], x[i, :, None, :, :])
    else:
        rows_x = x.permute(1, 3, 2, 0).reshape(groups_ * freqs, c_in_g, n)
        rows_g = g.permute(1, 3, 0, 2).reshape(groups_ * freqs, n, g.shape[2])
        gw = torch.bmm(rows_x, rows_g).view(groups_, freqs, c_in_g, -1).permute(0, 3, 2, 1)
    return gw.reshape(-1, c_in_g, *x_hat.shape[-spectral_rank:])
