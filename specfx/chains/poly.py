"""Poly fitting: per channel, the least-squares polynomial of an activation over the
pre-activation values the example inputs produce (normal equations from the moments
``E[u^i]`` and ``E[u^i·act(u)]``, in float64, on standardized values), and its error on
those values. The square is a polynomial: it is returned exactly."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def activation_fn(activation: str, slope: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """The activation as a function on tensors."""
    return {
        "relu": torch.relu,
        "leaky_relu": lambda u: F.leaky_relu(u, slope),
        "gelu": F.gelu,
        "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"),
        "silu": F.silu,
        "square": lambda u: u * u,
        "identity": lambda u: u,
    }[activation]


def square(channels: int, degree: int) -> torch.Tensor:
    """``0 + 0·u + 1·u²`` per channel (at least degree 2), lowest power first."""
    coeffs = torch.zeros(channels, max(degree, 2) + 1, dtype=torch.float64)
    coeffs[:, 2] = 1.0
    return coeffs


def fit_poly(samples: torch.Tensor, activation: str, slope: float, degree: int,
             rank: int) -> tuple[torch.Tensor, float]:
    """Per-channel least-squares polynomial of ``activation`` over ``samples``
    (``(*batch, C, *spatial)`` pre-activation values), lowest power first, as a float64
    ``(C, degree + 1)`` tensor, and its error ``max|p(u) − act(u)| / max|act(u)|``.

    The square is returned exactly (:func:`square`, error 0)."""
    u = samples.detach().double()
    channels = u.shape[u.dim() - rank - 1]
    per_channel = u.movedim(u.dim() - rank - 1, 0).reshape(channels, -1)
    if activation == "square":
        return square(channels, degree), 0.0
    target = activation_fn(activation, slope)(per_channel)
    mean = per_channel.mean(dim=1, keepdim=True)
    std = per_channel.std(dim=1, keepdim=True).clamp_min(1e-12)
    t = (per_channel - mean) / std
    powers = torch.stack([t ** i for i in range(2 * degree + 1)], dim=-1)  # (C, S, 2D+1)
    moments = powers.mean(dim=1)  # E[t^i]
    hankel = torch.stack([moments[:, i:i + degree + 1] for i in range(degree + 1)], dim=1)
    rhs = (powers[..., : degree + 1] * target.unsqueeze(-1)).mean(dim=1)
    hankel = hankel + 1e-12 * torch.eye(degree + 1, dtype=torch.float64)
    in_t = torch.linalg.solve(hankel, rhs)  # coefficients in t = (u − μ)/σ
    # Expand Σ_j a_j ((u − μ)/σ)^j into powers of u.
    coeffs = torch.zeros(channels, degree + 1, dtype=torch.float64)
    for j in range(degree + 1):
        for i in range(j + 1):
            coeffs[:, i] += in_t[:, j] * math.comb(j, i) * (-mean[:, 0]) ** (j - i) / std[:, 0] ** j
    fitted = sum(coeffs[:, i:i + 1] * per_channel ** i for i in range(degree + 1))
    scale = target.abs().max().item()
    error = (fitted - target).abs().max().item() / max(scale, 1e-30)
    return coeffs, error
