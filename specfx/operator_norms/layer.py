"""The linear operator of one convolution layer on inputs of a given spatial size.

A conv without its bias is a linear map ``x ↦ conv(x)`` from ``c_in × n₁ × … × n_d`` to
``c_out × m₁ × … × m_d``. :class:`ConvOperator` holds everything that map depends on (the
weight, stride, padding and its mode, dilation, groups, and the input size) and applies
it and its adjoint, so that every analysis here (exact spectra, bounds, power iteration,
clipping) reads one description of the layer. A transposed conv is the adjoint of the
forward conv with the same weight on the transposed conv's output size: it is described
by that forward conv (same singular values), with ``transposed`` set.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..geometry import PaddingArg, expand, resolve_padding

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_TRANSPOSE = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
F_PAD_MODE = {"zeros": "constant", "circular": "circular", "reflect": "reflect", "replicate": "replicate"}

SizeArg = Union[int, Sequence[int]]
Conv = Union[nn.Module, torch.Tensor]


class LayerError(ValueError):
    """A layer (or the arguments describing it) that cannot be analysed as asked; the
    message names the layer and the reason."""


@dataclasses.dataclass(frozen=True)
class ConvOperator:
    """``x ↦ conv(x, weight)`` (no bias) on inputs of spatial size ``input_size``.

    ``padding`` is resolved per axis as ``(left, right)``. With ``transposed`` the layer
    is the conv transpose ``y ↦ Aᵀy`` of this operator ``A``: the same singular values,
    its input being ``A``'s output.
    """

    weight: torch.Tensor
    input_size: tuple[int, ...]
    stride: tuple[int, ...]
    padding: tuple[tuple[int, int], ...]
    dilation: tuple[int, ...]
    groups: int
    padding_mode: str = "zeros"
    name: str = "conv"
    transposed: bool = False

    # --- shapes ------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        return self.weight.dim() - 2

    @property
    def out_channels(self) -> int:
        return self.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.weight.shape[1] * self.groups

    @property
    def kernel_size(self) -> tuple[int, ...]:
        return tuple(self.weight.shape[2:])

    @property
    def span(self) -> tuple[int, ...]:
        """Per axis, the extent of the dilated kernel."""
        return tuple(d * (k - 1) + 1 for k, d in zip(self.kernel_size, self.dilation))

    @property
    def padded_size(self) -> tuple[int, ...]:
        return tuple(n + l + r for n, (l, r) in zip(self.input_size, self.padding))

    @property
    def out_size(self) -> tuple[int, ...]:
        return tuple((p - span) // s + 1 for p, span, s in zip(self.padded_size, self.span, self.stride))

    @property
    def in_dim(self) -> int:
        """Dimension of the operator's domain: ``c_in · ∏ n``."""
        return self.in_channels * math.prod(self.input_size)

    @property
    def out_dim(self) -> int:
        return self.out_channels * math.prod(self.out_size)

    @property
    def periodic(self) -> bool:
        """Whether the layer is exactly the periodic (block-circulant) operator on its input
        grid: circular padding whose outputs are the ``n / s`` rows of that operator."""
        return (self.padding_mode == "circular"
                and all(n % s == 0 and m == n // s
                        for n, s, m in zip(self.input_size, self.stride, self.out_size)))

    def describe(self) -> str:
        """``Conv2d 64→128 k=3x3 s=2 p=1 zeros on 56x56`` (and dilation, groups)."""
        kind = f"ConvTranspose{self.rank}d" if self.transposed else f"Conv{self.rank}d"
        channels = f"{self.in_channels}→{self.out_channels}"
        if self.transposed:
            channels = f"{self.out_channels}→{self.in_channels}"
        parts = [kind, channels, "k=" + "x".join(map(str, self.kernel_size))]
        if any(s != 1 for s in self.stride):
            parts.append("s=" + "x".join(map(str, self.stride)))
        if any(d != 1 for d in self.dilation):
            parts.append("d=" + "x".join(map(str, self.dilation)))
        if self.groups != 1:
            parts.append(f"groups={self.groups}")
        pads = sorted({p for pair in self.padding for p in pair})
        parts.append("p=" + ("/".join(map(str, pads))))
        parts.append(self.padding_mode)
        size = self.out_size if self.transposed else self.input_size
        parts.append("on " + "x".join(map(str, size)))
        return " ".join(parts)

    def with_weight(self, weight: torch.Tensor) -> "ConvOperator":
        """The same layer with another weight of the same shape."""
        return dataclasses.replace(self, weight=weight)

    # --- the map and its adjoint --------------------------------------------------------

    def _pads(self) -> list[int]:
        """``F.pad`` order: last axis first."""
        return [p for pair in reversed(self.padding) for p in pair]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for ``x`` of shape ``(batch, c_in, *input_size)``."""
        w = self.weight.to(x.dtype)
        padded = F.pad(x, self._pads(), mode=F_PAD_MODE[self.padding_mode]) if any(self._pads()) else x
        return _CONV[self.rank](padded, w, None, self.stride, 0, self.dilation, self.groups)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        """``Aᵀ y`` for ``y`` of shape ``(batch, c_out, *out_size)``: the conv transpose onto
        the padded grid, then the adjoint of the padding (a crop for zeros; the copies a
        reflect, replicate or circular pad made are added back to their sources)."""
        w = self.weight.to(y.dtype)
        covered = [(m - 1) * s + sp for m, s, sp in zip(self.out_size, self.stride, self.span)]
        extra = [p - c for p, c in zip(self.padded_size, covered)]  # < stride: never read
        z = _CONV_TRANSPOSE[self.rank](y, w, None, self.stride, 0, tuple(extra), self.groups, self.dilation)
        if not any(self._pads()):
            return z
        if self.padding_mode == "zeros":
            index = tuple(slice(l, l + n) for n, (l, _) in zip(self.input_size, self.padding))
            return z[(Ellipsis, *index)]
        # The padding is linear, so its adjoint is its vector-Jacobian product at any point.
        source = torch.zeros(y.shape[0], self.in_channels, *self.input_size, dtype=y.dtype, device=y.device,
                             requires_grad=True)
        with torch.enable_grad():
            padded = F.pad(source, self._pads(), mode=F_PAD_MODE[self.padding_mode])
            (grad,) = torch.autograd.grad(padded, source, z)
        return grad

    def matrix(self, max_dim: Optional[int] = 4096) -> torch.Tensor:
        """The explicit ``out_dim × in_dim`` matrix of ``A`` in float64, refused past
        ``max_dim`` rows or columns. Built by placing the weight's taps (no arithmetic but
        the sums where padding copies a sample onto one another): entry ``((o, t), (i, j))``
        sums ``w[o, i, m]`` over the taps ``m`` whose padded position ``s·t + d·m`` is sample
        ``j`` (through the padding's index map)."""
        if max_dim is not None and max(self.in_dim, self.out_dim) > max_dim:
            raise LayerError(
                f"{self.name}: the explicit matrix of {self.describe()} would be {self.out_dim} x {self.in_dim}, "
                f"past the limit of {max_dim} rows or columns for dense methods; use method='asymptotic' "
                f"for singular values, or operator_norm() for certified bounds")
        rank, g = self.rank, self.groups
        co_g, ci_g = self.out_channels // g, self.weight.shape[1]
        source, valid = None, None
        for axis, (n, (left, right), s, d, k, m) in enumerate(zip(
                self.input_size, self.padding, self.stride, self.dilation, self.kernel_size, self.out_size)):
            # Which input sample each padded position holds (-1: a zero).
            index = torch.arange(n, dtype=torch.float64).view(1, 1, n)
            mode = F_PAD_MODE[self.padding_mode]
            held = F.pad(index, (left, right), mode=mode, **({"value": -1.0} if mode == "constant" else {}))
            held = held.view(-1).long()
            taps = held[s * torch.arange(m)[:, None] + d * torch.arange(k)[None, :]]  # out x k
            shape = [1] * (2 * rank)
            shape[axis], shape[rank + axis] = m, k
            taps = taps.reshape(shape)
            later = math.prod(self.input_size[axis + 1:])
            source = taps * later if source is None else source + taps * later
            valid = taps >= 0 if valid is None else valid & (taps >= 0)
        # (out_1 … out_d, k_1 … k_d) positions; channels in front.
        grid_shape = (*self.out_size, *self.kernel_size)
        source, valid = source.expand(grid_shape), valid.expand(grid_shape)
        out_positions = torch.arange(math.prod(self.out_size)).reshape(*self.out_size, *([1] * rank))
        out_positions = out_positions.expand_as(source)
        group = torch.arange(g).view(g, 1, 1)
        out_channel = (group * co_g + torch.arange(co_g).view(1, co_g, 1)).reshape(g, co_g, 1, 1)
        in_channel = (group * ci_g + torch.arange(ci_g).view(1, 1, ci_g)).reshape(g, 1, ci_g, 1)
        rows = out_channel * math.prod(self.out_size) + out_positions.reshape(1, 1, 1, -1)
        cols = in_channel * math.prod(self.input_size) + source.reshape(1, 1, 1, -1)
        # w[o, i, m] for each (t, m): the taps' values broadcast over output positions.
        weight = self.weight.detach().to(torch.float64).reshape(g, co_g, ci_g, 1, -1)
        values = weight.expand(g, co_g, ci_g, math.prod(self.out_size), math.prod(self.kernel_size))
        keep = valid.reshape(1, 1, 1, -1).expand(g, co_g, ci_g, -1)
        rows, cols = rows.expand_as(keep), cols.expand_as(keep)
        values = values.reshape(g, co_g, ci_g, -1)
        matrix = torch.zeros(self.out_dim, self.in_dim, dtype=torch.float64)
        matrix.index_put_((rows[keep], cols[keep]), values[keep], accumulate=True)
        return matrix


def _size(value: SizeArg, rank: int, name: str) -> tuple[int, ...]:
    size = expand(value, rank) if isinstance(value, int) or len(value) in (1, rank) else list(value)
    if len(size) != rank or any(int(n) < 1 for n in size):
        raise LayerError(f"{name}: input_size {value!r} must give {rank} positive spatial sizes for a "
                         f"{rank}-D convolution")
    return tuple(int(n) for n in size)


def as_operator(conv: Conv, input_size: SizeArg, *, stride: SizeArg = 1, padding: PaddingArg = 0,
                dilation: SizeArg = 1, groups: int = 1, padding_mode: str = "zeros",
                name: Optional[str] = None, check: bool = True) -> ConvOperator:
    """The operator of ``conv`` on inputs of spatial size ``input_size``.

    ``conv`` is an ``nn.Conv1d/2d/3d`` (or ``nn.ConvTranspose1d/2d/3d``), whose own
    arguments are used, or a weight tensor ``(c_out, c_in / groups, *kernel)`` with the
    conv's arguments given here (as ``F.convNd`` takes them). For a transposed module,
    ``input_size`` is the size of its input, as for any layer. ``check=False`` skips the
    checks that the conv can run on that size, for its periodic model (:func:`periodic`),
    which a kernel wider than the input still has.
    """
    if isinstance(conv, nn.modules.conv._ConvNd):
        return _from_module(conv, input_size, name or type(conv).__name__, check)
    if not isinstance(conv, torch.Tensor):
        raise LayerError(f"{name or 'conv'}: expected an nn.ConvNd module or a weight tensor, "
                         f"got {type(conv).__name__}")
    name = name or "weight"
    if conv.dim() not in (3, 4, 5):
        raise LayerError(f"{name}: a conv weight has 3, 4 or 5 dimensions (c_out, c_in/groups, *kernel), "
                         f"got shape {tuple(conv.shape)}")
    rank = conv.dim() - 2
    if conv.is_complex() or not conv.is_floating_point():
        raise LayerError(f"{name}: the weight must be a real floating-point tensor, got {conv.dtype}")
    if padding_mode not in PADDING_MODES:
        raise LayerError(f"{name}: padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if groups < 1 or conv.shape[0] % groups:
        raise LayerError(f"{name}: {conv.shape[0]} output channels are not divisible into {groups} groups")
    stride_, dilation_ = expand(stride, rank), expand(dilation, rank)
    size = _size(input_size, rank, name)
    try:
        pads = resolve_padding(padding, conv.shape[2:], dilation_, stride_)
    except ValueError as err:
        raise LayerError(f"{name}: {err}") from None
    op = ConvOperator(conv.detach(), size, tuple(stride_), tuple(pads), tuple(dilation_), groups, padding_mode, name)
    if check:
        _check(op)
    return op


def _from_module(module: nn.modules.conv._ConvNd, input_size: SizeArg, name: str, check: bool) -> ConvOperator:
    rank = len(module.kernel_size)
    size = _size(input_size, rank, name)
    weight = module.weight.detach()
    if not module.transposed:
        pads = resolve_padding(module.padding, module.kernel_size, module.dilation, module.stride)
        op = ConvOperator(weight, size, tuple(module.stride), tuple(pads), tuple(module.dilation),
                          module.groups, module.padding_mode, name)
        if check:
            _check(op)
        return op
    # y = convT(x) is Aᵀx for the forward conv A with the same weight, whose input is y's size.
    if module.padding_mode != "zeros":
        raise LayerError(f"{name}: transposed convolutions support only zero padding")
    out = tuple((n - 1) * s - 2 * p + d * (k - 1) + op + 1 for n, s, p, d, k, op in zip(
        size, module.stride, module.padding, module.dilation, module.kernel_size, module.output_padding))
    if any(m < 1 for m in out):
        raise LayerError(f"{name}: input size {size} gives an empty output")
    op = ConvOperator(weight, out, tuple(module.stride), tuple((p, p) for p in module.padding),
                      tuple(module.dilation), module.groups, "zeros", name, transposed=True)
    _check(op)
    return op


def _check(op: ConvOperator) -> None:
    if any(m < 1 for m in op.out_size):
        raise LayerError(f"{op.name}: input size {'x'.join(map(str, op.input_size))} is smaller than the "
                         f"dilated kernel ({'x'.join(map(str, op.span))}) after padding: the output is empty")
    if op.padding_mode == "reflect" and any(max(p) >= n for p, n in zip(op.padding, op.input_size)):
        raise LayerError(f"{op.name}: reflect padding must be smaller than the input size")
    if op.padding_mode == "circular" and any(max(p) > n for p, n in zip(op.padding, op.input_size)):
        raise LayerError(f"{op.name}: circular padding can wrap at most once (padding ≤ input size)")


def periodic(op: ConvOperator) -> ConvOperator:
    """``op``'s kernel, stride, dilation and groups as the periodic conv on its input grid
    (Sedghi et al.'s circular model of a layer): circular padding of ``span − 1`` per axis,
    so each axis has ``n / s`` outputs. A kernel wider than the grid wraps onto it."""
    pads = tuple(((sp - 1) // 2, sp - 1 - (sp - 1) // 2) for sp in op.span)
    return dataclasses.replace(op, padding=pads, padding_mode="circular")
