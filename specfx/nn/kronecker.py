"""Kronecker layers (Zhou, Wu, Wu, Zhou, "Exploiting Local Structures with the Kronecker
Layer in Convolutional Networks", 2015): a weight that is a sum of Kronecker products of
small matrices, ``W = Σ_r A_r ⊗ B_r``, possibly with terms of different shapes.

Neither layer ever forms its dense weight: a linear layer runs two small GEMMs on reshaped
rows, a conv layer a small conv and a channel mix (:mod:`specfx.nn.kronecker_ops`).
``from_linear`` / ``from_conv`` give the nearest such layer to a dense one.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .factors import FactorSpec, RankSpec, TermGroup, term_groups
from .kronecker_ops import conv_flops, fit_groups, kronecker_conv2d, kronecker_dense, kronecker_linear, linear_flops
from .layer_checks import check_last_dim, relative_error

# Symbolic tracing records each product as one call node (their bodies unpack shapes,
# which a proxy cannot).
fx.wrap("kronecker_linear")
fx.wrap("kronecker_conv2d")

# Block coordinate descent sweeps for mixed factor shapes (one shape has a closed form).
DEFAULT_SWEEPS = 10


def _groups_of(layer: str, a_factors: Sequence[torch.Tensor], b_factors: Sequence[torch.Tensor]) -> list[TermGroup]:
    """The term groups that given factor tensors describe (``a`` of shape ``(r, a1, b1)``,
    ``b`` of shape ``(r, a2, b2)``), checked to agree."""
    if len(a_factors) != len(b_factors) or not a_factors:
        raise ValueError(f"{layer}: needs as many A factors as B factors, at least one (got "
                         f"{len(a_factors)} and {len(b_factors)})")
    groups = []
    for a, b in zip(a_factors, b_factors):
        if a.dim() != 3 or b.dim() != 3 or a.shape[0] != b.shape[0]:
            raise ValueError(f"{layer}: factors must be (rank, a1, b1) and (rank, a2, b2) with the same rank, "
                             f"got {tuple(a.shape)} and {tuple(b.shape)}")
        groups.append(TermGroup(tuple(a.shape[1:]), tuple(b.shape[1:]), a.shape[0]))
    return groups


class KroneckerLinear(nn.Module):
    """A linear layer whose weight is ``W = Σ_r A_r ⊗ B_r``.

    Args:
        in_features, out_features: as ``nn.Linear``.
        rank: Kronecker terms per factor shape (an int, or one per shape in ``factors``).
        factors: ``None`` for balanced shapes (``a1``, ``b1`` the divisors of
            ``out_features``, ``in_features`` nearest their square roots from below),
            ``((a1, b1), (a2, b2))`` for ``A_r`` of shape ``(a1, b1)`` and ``B_r`` of shape
            ``(a2, b2)`` (``a1·a2 = out_features``, ``b1·b2 = in_features``), or a list of
            such pairs: the paper's combination of different shapes, each with its own terms.
        bias: add a learned bias.

    Parameters are ``a_factors[g]`` (``(rank_g, a1, b1)``) and ``b_factors[g]``
    (``(rank_g, a2, b2)``) per shape group ``g``, and ``bias``. Initialized so the output
    has the scale ``nn.Linear``'s default init gives (each entry of ``W`` has variance
    ``1/(3·in_features)``). The input's last dim holds the features; leading dims are
    batch dims.
    """

    def __init__(self, in_features: int, out_features: int, rank: RankSpec = 1, factors: FactorSpec = None,
                 bias: bool = True, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.groups = term_groups(type(self).__name__, out_features, in_features, factors, rank)
        kwargs = dict(device=device, dtype=dtype)
        self.a_factors = nn.ParameterList(nn.Parameter(torch.empty(g.rank, *g.a, **kwargs)) for g in self.groups)
        self.b_factors = nn.ParameterList(nn.Parameter(torch.empty(g.rank, *g.b, **kwargs)) for g in self.groups)
        self.bias = nn.Parameter(torch.empty(out_features, **kwargs)) if bias else None
        # Set by from_linear: relative Frobenius error of the weight it approximates.
        self.fit_error: Optional[float] = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Var(W) = Σ_terms Var(A)·Var(B) = 1/(3·in): B keeps a row's scale (variance 1/b2),
        # A carries the rest, split over every term.
        terms = sum(g.rank for g in self.groups)
        for g, a, b in zip(self.groups, self.a_factors, self.b_factors):
            nn.init.uniform_(b, -math.sqrt(3 / g.b[1]), math.sqrt(3 / g.b[1]))
            nn.init.uniform_(a, -1 / math.sqrt(g.a[1] * terms), 1 / math.sqrt(g.a[1] * terms))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_last_dim(self, x, self.in_features, "features")
        rows = x.reshape(-1, self.in_features)
        y = kronecker_linear(rows, self.a_factors[0], self.b_factors[0])
        for g in range(1, len(self.groups)):
            y = y + kronecker_linear(rows, self.a_factors[g], self.b_factors[g])
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(x.shape[:-1] + (self.out_features,))

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_features, in_features)`` weight the layer applies (formed here only,
        for analysis and tests)."""
        return sum(kronecker_dense(a, b) for a, b in zip(self.a_factors, self.b_factors))

    def flops_per_row(self) -> int:
        """FLOPs of one input row (bias included)."""
        return linear_flops(self.groups) + (self.out_features if self.bias is not None else 0)

    @classmethod
    def from_factors(cls, a_factors: Sequence[torch.Tensor], b_factors: Sequence[torch.Tensor],
                     bias: Optional[torch.Tensor] = None) -> "KroneckerLinear":
        """The layer with the given factors (copied): ``a_factors[g]`` of shape
        ``(rank_g, a1, b1)`` and ``b_factors[g]`` of shape ``(rank_g, a2, b2)``."""
        groups = _groups_of(cls.__name__, a_factors, b_factors)
        (a1, b1), (a2, b2) = groups[0].a, groups[0].b
        first = a_factors[0]
        layer = cls(b1 * b2, a1 * a2, [g.rank for g in groups], [(g.a, g.b) for g in groups], bias is not None,
                    device=first.device, dtype=first.dtype)
        with torch.no_grad():
            for param, value in zip([*layer.a_factors, *layer.b_factors], [*a_factors, *b_factors]):
                param.copy_(value)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: RankSpec = 1, factors: FactorSpec = None,
                    sweeps: int = DEFAULT_SWEEPS) -> "KroneckerLinear":
        """The nearest Kronecker layer to ``linear`` in Frobenius norm of the weight.

        One factor shape: the closed form (Van Loan–Pitsianis rearrangement and the
        truncated SVD), exact when ``linear.weight`` is a sum of ``rank`` Kronecker products
        of that shape. Mixed shapes have no closed form: ``sweeps`` rounds of block
        coordinate descent, each group the nearest to what the others leave.
        The relative error ``‖W − Ŵ‖_F / ‖W‖_F`` is kept as ``fit_error``.
        """
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"{cls.__name__}.from_linear takes an nn.Linear, got {type(linear).__name__}")
        weight = linear.weight
        groups = term_groups(cls.__name__, linear.out_features, linear.in_features, factors, rank)
        fitted = fit_groups(weight, groups, sweeps)
        layer = cls.from_factors([a.to(weight.dtype) for a, _ in fitted], [b.to(weight.dtype) for _, b in fitted],
                                 None if linear.bias is None else linear.bias.detach())
        layer.fit_error = relative_error(layer.dense_weight(), weight)
        return layer

    def extra_repr(self) -> str:
        shapes = " + ".join(g.describe() for g in self.groups)
        fit = f", fit_error={self.fit_error:.3g}" if self.fit_error is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, terms={shapes}, "
                f"bias={self.bias is not None}{fit}")


def _pair(value: Union[int, Sequence[int]], name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v >= 1 for v in pair):
        raise ValueError(f"KroneckerConv2d: {name} must be an int >= 1 or a pair of them, got {value!r}")
    return pair  # type: ignore[return-value]


class KroneckerConv2d(nn.Module):
    """A 2D conv whose kernel is ``K = Σ_r A_r ⊗ S_r``: ``A_r`` (``(o1, i1)``) mixes
    channel groups, ``S_r`` (``(o2, i2, kh, kw)``) is a small conv kernel, and
    ``K[(p1, p2), (q1, q2)] = Σ_r A_r[p1, q1] S_r[p2, q2]`` (output channel ``p1·o2 + p2``,
    input channel ``q1·i2 + q2``).

    It runs as the conv with ``S`` on each of the ``i1`` groups of ``i2`` input channels
    plus one batched GEMM with ``A`` (or the mix first, when that is cheaper): about
    ``rank/o1`` of the dense conv's multiply-adds for the spatial part.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias,
            padding_mode: as ``nn.Conv2d`` (``groups=1`` only).
        rank: Kronecker terms per factor shape (an int, or one per shape).
        factors: ``None`` (balanced: ``o1``, ``i1`` the divisors of the channel counts
            nearest their square roots from below), ``((o1, i1), (o2, i2))``, or a list of
            such pairs (mixed shapes).

    Parameters are ``channel_factors[g]`` (``(rank_g, o1, i1)``), ``spatial_factors[g]``
    (``(rank_g, o2, i2, kh, kw)``) and ``bias``, initialized so the output has the scale of
    ``nn.Conv2d``'s default init.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: Union[int, Sequence[int]],
                 rank: RankSpec = 1, factors: FactorSpec = None, stride: Union[int, Sequence[int]] = 1,
                 padding: Union[str, int, Sequence[int]] = 0, dilation: Union[int, Sequence[int]] = 1,
                 bias: bool = True, padding_mode: str = "zeros", device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__()
        name = type(self).__name__
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = _pair(kernel_size, "kernel_size")
        self.stride, self.dilation = _pair(stride, "stride"), _pair(dilation, "dilation")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"{name}: padding_mode must be 'zeros', 'reflect', 'replicate' or 'circular', "
                             f"got {padding_mode!r}")
        self.padding_mode = padding_mode
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"{name}: padding must be 'same', 'valid', an int or a pair, got {padding!r}")
            if padding == "same" and self.stride != (1, 1):
                raise ValueError(f"{name}: padding='same' needs stride 1, got stride {self.stride}")
            self.padding: Union[str, tuple[int, int]] = padding
        else:
            self.padding = (padding, padding) if isinstance(padding, int) else tuple(padding)
            if len(self.padding) != 2 or any(p < 0 for p in self.padding):
                raise ValueError(f"{name}: padding must be >= 0, got {padding!r}")
        self._reversed_padding = self._pad_amounts()
        self.groups = term_groups(name, out_channels, in_channels, factors, rank,
                                  self.kernel_size[0] * self.kernel_size[1])
        kwargs = dict(device=device, dtype=dtype)
        self.channel_factors = nn.ParameterList(nn.Parameter(torch.empty(g.rank, *g.a, **kwargs))
                                                for g in self.groups)
        self.spatial_factors = nn.ParameterList(nn.Parameter(torch.empty(g.rank, *g.b, *self.kernel_size, **kwargs))
                                                for g in self.groups)
        self.bias = nn.Parameter(torch.empty(out_channels, **kwargs)) if bias else None
        self.fit_error: Optional[float] = None
        self.reset_parameters()

    def _pad_amounts(self) -> list[int]:
        """``F.pad``'s amounts (last dim first) for the padding modes other than zeros."""
        if self.padding == "valid":
            return [0, 0, 0, 0]
        if self.padding == "same":
            amounts = []
            for k, d in zip(reversed(self.kernel_size), reversed(self.dilation)):
                total = d * (k - 1)
                amounts += [total // 2, total - total // 2]
            return amounts
        return [self.padding[1], self.padding[1], self.padding[0], self.padding[0]]

    def reset_parameters(self) -> None:
        # As KroneckerLinear, with a kernel tap per input channel: Var(K) = 1/(3·in·kh·kw).
        terms = sum(g.rank for g in self.groups)
        taps = self.kernel_size[0] * self.kernel_size[1]
        for g, a, s in zip(self.groups, self.channel_factors, self.spatial_factors):
            bound = math.sqrt(3 / (g.b[1] * taps))
            nn.init.uniform_(s, -bound, bound)
            nn.init.uniform_(a, -1 / math.sqrt(g.a[1] * terms), 1 / math.sqrt(g.a[1] * terms))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels * taps)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, fx.Proxy) and (x.dim() not in (3, 4) or x.shape[-3] != self.in_channels):
            raise ValueError(f"{type(self).__name__}: expected input (N, {self.in_channels}, H, W) or "
                             f"({self.in_channels}, H, W), got {tuple(x.shape)}")
        # An unbatched (C, H, W) input runs as a batch of one, with no branch on its rank
        # (symbolic tracing could not take one).
        batch = x.reshape((-1,) + x.shape[-3:])
        padding = self.padding
        if self.padding_mode != "zeros":
            # Padding is per channel and the channel mix acts per pixel, so padding the input
            # once serves both orders of the two factors.
            batch = F.pad(batch, self._reversed_padding, mode=self.padding_mode)
            padding = (0, 0)
        y = kronecker_conv2d(batch, self.channel_factors[0], self.spatial_factors[0], self.stride, padding,
                             self.dilation)
        for g in range(1, len(self.groups)):
            y = y + kronecker_conv2d(batch, self.channel_factors[g], self.spatial_factors[g], self.stride, padding,
                                     self.dilation)
        if self.bias is not None:
            y = y + self.bias.view(-1, 1, 1)
        return y.reshape(x.shape[:-3] + y.shape[-3:])

    def dense_weight(self) -> torch.Tensor:
        """The ``(out_channels, in_channels, kh, kw)`` kernel the layer applies (formed here
        only, for analysis and tests)."""
        return sum(kronecker_dense(a, s) for a, s in zip(self.channel_factors, self.spatial_factors))

    def flops_per_position(self) -> int:
        """FLOPs of one output position (all output channels, bias included)."""
        return (conv_flops(self.groups, self.kernel_size, self.stride)
                + (self.out_channels if self.bias is not None else 0))

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, rank: RankSpec = 1, factors: FactorSpec = None,
                  sweeps: int = DEFAULT_SWEEPS) -> "KroneckerConv2d":
        """The nearest Kronecker conv to ``conv`` in Frobenius norm of the kernel (the
        rearrangement of :meth:`KroneckerLinear.from_linear` with the kernel's taps on the
        spatial factor): exact when the kernel is a sum of ``rank`` such products. The
        relative error is kept as ``fit_error``."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"{cls.__name__}.from_conv takes an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise ValueError(f"{cls.__name__}.from_conv takes groups=1 only (a grouped conv's kernel is not one "
                             f"matrix to factor), got groups={conv.groups}")
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, rank, factors, conv.stride, conv.padding,
                    conv.dilation, conv.bias is not None, conv.padding_mode, device=conv.weight.device,
                    dtype=conv.weight.dtype)
        fitted = fit_groups(conv.weight, layer.groups, sweeps)
        with torch.no_grad():
            for (a, s), a_param, s_param in zip(fitted, layer.channel_factors, layer.spatial_factors):
                a_param.copy_(a)
                s_param.copy_(s)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
        layer.fit_error = relative_error(layer.dense_weight(), conv.weight)
        return layer

    def extra_repr(self) -> str:
        shapes = " + ".join(f"{g.rank} x ({g.a[0]}x{g.a[1]} ⊗ {g.b[0]}x{g.b[1]}x"
                            f"{self.kernel_size[0]}x{self.kernel_size[1]})" for g in self.groups)
        fit = f", fit_error={self.fit_error:.3g}" if self.fit_error is not None else ""
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, padding_mode={self.padding_mode!r}, "
                f"terms={shapes}, bias={self.bias is not None}{fit}")
