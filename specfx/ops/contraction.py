"""The per-frequency channel contraction of a spectral conv, and its adjoints.

Dense and grouped convs are one complex GEMM per (group, frequency) with the batch as the
M dimension (the fbfft formulation); depthwise convs (one input channel per group) are a
plain elementwise product. The weight spectrum is stored in the layout each form
consumes, so laying it out is paid once per cached spectrum.
"""

from __future__ import annotations

import torch


def is_depthwise(in_channels_per_group: int) -> bool:
    return in_channels_per_group == 1


def layout_weight(w_hat: torch.Tensor, groups: int) -> torch.Tensor:
    """``(C_out, C_in/g, *bins)`` → ``(g, C_out/g, F)`` for depthwise, else
    ``(g, F, C_in/g, C_out/g)``."""
    c_out, c_in_g = w_hat.shape[:2]
    flat = w_hat.reshape(groups, c_out // groups, c_in_g, -1)
    if is_depthwise(c_in_g):
        return flat[:, :, 0, :]
    return flat.permute(0, 3, 2, 1).contiguous()


def _flatten(x_hat: torch.Tensor, groups: int, spectral_rank: int) -> torch.Tensor:
    """``(*batch, C, *bins)`` → ``(N, g, C/g, F)``; an unbatched input has N = 1."""
    channels = x_hat.shape[x_hat.dim() - spectral_rank - 1]
    return x_hat.reshape(-1, groups, channels // groups, x_hat.shape[-spectral_rank:].numel())


def _unflatten(y: torch.Tensor, like: torch.Tensor, spectral_rank: int) -> torch.Tensor:
    """``(N, g, C/g, F)`` → the batch and bin shape of ``like``."""
    batch = like.shape[: like.dim() - spectral_rank - 1]
    return y.reshape(*batch, -1, *like.shape[-spectral_rank:])


def mix(x_hat: torch.Tensor, w_laid: torch.Tensor, groups: int, spectral_rank: int) -> torch.Tensor:
    """``Y[n, o, f] = Σ_c X[n, c, f] · W[o, c, f]`` within each group."""
    x = _flatten(x_hat, groups, spectral_rank)
    if w_laid.dim() == 3:  # depthwise: (g, m, F)
        y = x * w_laid.unsqueeze(0)
    else:
        y = torch.matmul(x.permute(1, 3, 0, 2), w_laid).permute(2, 0, 3, 1)
    return _unflatten(y, x_hat, spectral_rank)


def mix_adjoint_input(grad_y: torch.Tensor, w_laid: torch.Tensor, groups: int,
                      spectral_rank: int) -> torch.Tensor:
    """Gradient of :func:`mix` with respect to ``x_hat``: contract with ``conj(W)``."""
    g = _flatten(grad_y, groups, spectral_rank)
    if w_laid.dim() == 3:
        gx = (g * w_laid.conj().unsqueeze(0)).sum(dim=2, keepdim=True)
    else:
        gx = torch.matmul(g.permute(1, 3, 0, 2), w_laid.conj().transpose(-1, -2)).permute(2, 0, 3, 1)
    return _unflatten(gx, grad_y, spectral_rank)


def mix_adjoint_weight(x_hat: torch.Tensor, grad_y: torch.Tensor, groups: int,
                       spectral_rank: int) -> torch.Tensor:
    """Gradient of :func:`mix` with respect to the weight spectrum, as
    ``(C_out, C_in/g, *bins)``: ``Σ_n conj(X[n, c, f]) · gY[n, o, f]``."""
    x = _flatten(x_hat, groups, spectral_rank)
    g = _flatten(grad_y, groups, spectral_rank)
    if is_depthwise(x.shape[2]):
        gw = (g * x.conj()).sum(dim=0).unsqueeze(2)  # (g, m, 1, F)
    else:
        gw = torch.matmul(x.permute(1, 3, 2, 0).conj(), g.permute(1, 3, 0, 2))  # (g, F, Ci, Co)
        gw = gw.permute(0, 3, 2, 1)
    return gw.reshape(-1, gw.shape[2], *x_hat.shape[-spectral_rank:])
