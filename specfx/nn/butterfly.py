"""Butterfly layers (Ailon, Leibovitch, Nair, "Sparse linear networks with a fixed
butterfly structure: theory and practice", 2020): a dense layer replaced by ``log2 N``
sparse stages of 2x2 mixes, ``2·N·log2 N`` weights in all, trained in its place.

Sizes that are not powers of two run at ``N``, the next power of two: the input is
zero-padded to ``N`` features and the output truncated to ``out_features`` (so a wide
output or input costs the whole ``N``). The stages and their backward pass are in
:mod:`specfx.nn.butterfly_ops`.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn as nn

from .butterfly_ops import butterfly_dense, butterfly_linear, factorize, fit, padded_size
from .layer_checks import check_last_dim, relative_error

# The stages run inside an autograd.Function; symbolic tracing records the call as one node.
fx.wrap("butterfly_linear")

DEFAULT_FIT_STEPS = 50


class ButterflyLinear(nn.Module):
    """A linear layer whose weight is a product of ``log2 N`` butterfly stages.

    Args:
        in_features, out_features: as ``nn.Linear``; any sizes (see the module's note on
            padding and truncation).
        bias: add a learned bias.

    The parameter ``twiddle`` (``(log2 N, 2, 2, N/2)``) holds each stage's 2x2 blocks.
    Each block starts as a random rotation or reflection, scaled so that the product is
    ``c`` times an orthogonal matrix with ``c² = N / (3·in_features)``: the outputs then
    have the variance ``nn.Linear``'s default init gives them (``Var(x)/3``), at every
    width, where i.i.d. blocks would grow or shrink it geometrically with the depth.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        if min(in_features, out_features) < 1:
            raise ValueError(f"{type(self).__name__}: in_features and out_features must be >= 1, got "
                             f"{in_features} and {out_features}")
        self.in_features, self.out_features = in_features, out_features
        self.size = padded_size(in_features, out_features)
        self.stages = int(math.log2(self.size))
        kwargs = dict(device=device, dtype=dtype)
        self.twiddle = nn.Parameter(torch.empty(self.stages, 2, 2, self.size // 2, **kwargs))
        self.bias = nn.Parameter(torch.empty(out_features, **kwargs)) if bias else None
        # Set by from_linear: relative Frobenius error of the weight it approximates.
        self.fit_error: Optional[float] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            angle = torch.rand(self.twiddle.shape[0], self.twiddle.shape[-1], device=self.twiddle.device) * 2 * math.pi
            reflect = torch.where(torch.rand_like(angle) < 0.5, -1.0, 1.0)
            scale = (self.size / (3 * self.in_features)) ** (0.5 / self.stages)
            cos, sin = angle.cos() * scale, angle.sin() * scale
            # Rotation [[c, -s], [s, c]], or the reflection [[c, s], [s, -c]].
            blocks = torch.stack([torch.stack([cos, -sin * reflect], 1), torch.stack([sin, cos * reflect], 1)], 1)
            self.twiddle.copy_(blocks)
            if self.bias is not None:
                bound = 1 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(self, x, self.in_features, "features")
        y = butterfly_linear(x.reshape(-1, self.in_features), self.twiddle, self.bias, self.out_features)
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight the layer applies (formed here only,
        for analysis and tests)."""
        return butterfly_dense(self.twiddle.detach(), self.in_features, self.out_features)

    def flops_per_row(self) -> int:
        """FLOPs of one input row: 4 multiplies and 2 adds per pair and stage, and the bias."""
        return 6 * (self.size // 2) * self.stages + (self.out_features if self.bias is not None else 0)

    @classmethod
    def from_linear(cls, linear: nn.Linear, steps: int = DEFAULT_FIT_STEPS) -> "ButterflyLinear":
        """A butterfly layer fitted to ``linear``'s weight; there is no closed form.

        The start is :func:`~specfx.nn.butterfly_ops.factorize` of the weight (zero-padded
        to ``N x N``), exact when the weight is a butterfly (a Walsh–Hadamard matrix is);
        then up to ``steps`` L-BFGS iterations on the Frobenius error (see
        :func:`~specfx.nn.butterfly_ops.fit`), kept only if they lowered the exact error.
        The relative error ``‖W − Ŵ‖_F / ‖W‖_F`` is kept as ``fit_error``. Dense weights of trained layers are rarely close to a
        butterfly: expect a large error unless the model is fine-tuned afterwards.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear takes an nn.Linear, got {type(linear).__name__}")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"{cls.__name__}.from_linear: steps must be an int >= 0, got {steps!r}")
        weight = linear.weight.detach()
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None,
                    device=weight.device, dtype=weight.dtype)
        padded = weight.new_zeros(layer.size, layer.size, dtype=torch.promote_types(weight.dtype, torch.float32))
        padded[:linear.out_features, :linear.in_features] = weight
        start = factorize(padded)
        candidates = [start] if steps == 0 else [start, fit(weight, start, steps)]
        # Wide layers are fitted on probe rows (butterfly_ops.fit), which can trade error
        # outside the probes' span for error inside it: the exact errors decide.
        errors = [relative_error(butterfly_dense(t, linear.in_features, linear.out_features), weight)
                  for t in candidates]
        best = min(range(len(candidates)), key=errors.__getitem__)
        with torch.no_grad():
            layer.twiddle.copy_(candidates[best])
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        layer.fit_error = errors[best]
        return layer

    def extra_repr(self) -> str:
        fit_text = f", fit_error={self.fit_error:.3g}" if self.fit_error is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, size={self.size}, "
                f"stages={self.stages}, bias={self.bias is not None}{fit_text}")
