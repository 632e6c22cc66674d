"""The spectral op vocabulary, as operators in the ``specfx`` namespace (:mod:`.library`).

A lowered convolution is three nodes:

    x_hat = specfx.to_spectrum(x, in_size, fft_size)
    y_hat = specfx.spectral_mix(x_hat, weight, fft_size, dilation, shift, groups)
    y     = specfx.from_spectrum(y_hat, fft_size, out_size, stride, bias, out_dtype)

Keeping them separate lets a chain of convs drop a ``from_spectrum → to_spectrum`` pair.
A lowered conv outside any chain then runs as one ``lowered_conv`` call, the three ops'
implementations back to back (passes/merge_convs.py): one dispatch instead of three.
Each op has a fake (meta) implementation, so graphs that hold them can be exported and
compiled, and an autograd formula written from the exact adjoints in :mod:`.fourier`.
Spectra are complex64, or complex128 for fp64 inputs; half-precision inputs are computed
in fp32 and the result is cast back in ``from_spectrum``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

from ..rates import MMAP_CEILING_BYTES
from . import contraction, folding, fourier
from .library import autocast_as_conv, spectral_op
from .weight_spectrum import SPECTRUM_CACHE, is_plain_tensor, kernel_blocks, kernel_gradient


# Transforms run over blocks of (batch x channel) rows (fourier.row_blocks), so that their
# temporaries (the zero-padded input, the inverse transform's copy of its input, its
# full-grid output) stay a few MiB instead of growing with the whole tensor: a lowered
# conv's peak memory is then its two spectra and its output.

# --- to_spectrum -------------------------------------------------------------------------

def check_planned_size(x: torch.Tensor, size: list[int]) -> None:
    """Raise unless ``x``'s trailing spatial dims are ``size``, the size a lowered conv's
    grid was planned for."""
    actual = list(x.shape[x.dim() - len(size):])
    if actual != list(size):
        raise ValueError(
            f"specfx: this lowered convolution was planned for spatial size {list(size)} "
            f"but got {actual}; run specfx.optimize again with an example input of that size")


@autocast_as_conv
@spectral_op("to_spectrum")
def to_spectrum(x: torch.Tensor, in_size: list[int], fft_size: list[int]) -> torch.Tensor:
    """One-sided spectrum of ``x`` over its trailing ``len(fft_size)`` dims, zero-padded at
    the end to ``fft_size``. ``in_size`` is the spatial size the lowering was planned for."""
    rank = len(fft_size)
    check_planned_size(x, in_size)
    real = fourier.real_dtype_for(x.dtype)
    if x.numel() == 0:  # an empty batch: MKL refuses a transform of no rows
        return x.new_zeros((*x.shape[: x.dim() - rank], *fourier.rfft_bins(fft_size)), dtype=fourier.complex_dtype_for(real))
    if fourier.fits_one_block(x.numel() // math.prod(in_size), fft_size, real.itemsize):
        return fourier.rfftn(fourier.as_dtype(x, real), fft_size)
    rows = x.reshape(-1, *in_size)
    out = torch.empty((rows.shape[0], *fourier.rfft_bins(fft_size)), dtype=fourier.complex_dtype_for(real), device=x.device)
    for block in fourier.row_blocks(rows.shape[0], fft_size, real.itemsize):
        torch.fft.rfftn(rows[block].to(real), s=fft_size, dim=fourier.spatial_dims(rank), out=out[block])
    return out.reshape(*x.shape[: x.dim() - rank], *out.shape[1:])


@to_spectrum.register_fake
def _(x, in_size, fft_size):
    batch = x.shape[: x.dim() - len(fft_size)]
    return x.new_empty((*batch, *fourier.rfft_bins(fft_size)), dtype=fourier.complex_dtype_for(x.dtype))


def _to_spectrum_setup(ctx, inputs, output):
    x, in_size, fft_size = inputs
    ctx.in_size, ctx.fft_size, ctx.x_dtype = in_size, fft_size, x.dtype


def _to_spectrum_backward(ctx, grad):
    return to_spectrum_adjoint(grad, ctx.in_size, ctx.fft_size, ctx.x_dtype), None, None


to_spectrum.register_autograd(_to_spectrum_backward, setup_context=_to_spectrum_setup)


@spectral_op("to_spectrum_adjoint")
def to_spectrum_adjoint(grad: torch.Tensor, in_size: list[int], fft_size: list[int],
                        out_dtype: torch.dtype) -> torch.Tensor:
    """Adjoint of :func:`to_spectrum` (its backward): ``N·irfftn`` of ``grad`` with each
    paired bin halved, cropped to ``in_size``, as ``out_dtype``. One inverse transform, run
    over blocks of rows with the scaling applied per block, straight into the result: the
    gradient's spectrum gets no full-size scaled copy."""
    rank = len(fft_size)
    real = fourier.real_dtype_for(grad.dtype)
    scale = fourier.rfftn_adjoint_scale(fft_size, real, grad.device)
    if grad.numel() == 0:
        return grad.new_zeros((*grad.shape[: grad.dim() - rank], *in_size), dtype=out_dtype)
    rows = grad.reshape(-1, *grad.shape[-rank:])
    out = torch.empty((rows.shape[0], *in_size), dtype=out_dtype, device=grad.device)
    ones = [1] * rank
    for block in fourier.row_blocks(rows.shape[0], fft_size, real.itemsize, fourier.INVERSE_BLOCK_BYTES):
        out[block] = _take_outputs(fourier.irfftn(rows[block] * scale, fft_size), in_size, ones, fft_size)
    return out.reshape(*grad.shape[: grad.dim() - rank], *in_size)


@to_spectrum_adjoint.register_fake
def _(grad, in_size, fft_size, out_dtype):
    batch = grad.shape[: grad.dim() - len(fft_size)]
    return grad.new_empty((*batch, *in_size), dtype=out_dtype)


def _to_spectrum_adjoint_setup(ctx, inputs, output):
    grad, in_size, fft_size, out_dtype = inputs
    ctx.in_size, ctx.fft_size = in_size, fft_size
    ctx.real_dtype = fourier.real_dtype_for(grad.dtype)


def _to_spectrum_adjoint_backward(ctx, v):
    # The adjoint of the adjoint is to_spectrum itself.
    return to_spectrum(v.to(ctx.real_dtype), ctx.in_size, ctx.fft_size), None, None, None


to_spectrum_adjoint.register_autograd(_to_spectrum_adjoint_backward, setup_context=_to_spectrum_adjoint_setup)


# --- spectral_mix ------------------------------------------------------------------------

def check_operands(x_hat: torch.Tensor, weight: torch.Tensor, groups: int, rank: int) -> None:
    """What torch's conv checks of its input against its weight, on the input's spectrum:
    the dims, the channels (``groups`` times the weight's input channels) and the precision
    (a float64 weight needs a float64 input, and the other way round). Integer comparisons
    on every call of a lowered conv, so that a wrong input raises instead of mixing
    channels it does not have."""
    if x_hat.dim() not in (rank + 1, rank + 2):
        raise RuntimeError(f"Expected {rank + 1}D (unbatched) or {rank + 2}D (batched) input to conv{rank}d, "
                           f"but got input with {x_hat.dim()} dims")
    channels = weight.shape[1] * groups
    if x_hat.shape[-rank - 1] != channels:
        raise RuntimeError(f"Given groups={groups}, weight of size {list(weight.shape)}, expected input to have "
                           f"{channels} channels, but got {x_hat.shape[-rank - 1]} channels instead")
    if (x_hat.dtype == torch.complex128) != (weight.dtype == torch.float64):
        raise RuntimeError(f"Input type ({'double' if x_hat.dtype == torch.complex128 else 'float'}) and weight "
                           f"type ({weight.dtype}) should be the same")


def _batch(x_hat: torch.Tensor, spectral_rank: int) -> int:
    return x_hat.shape[: x_hat.dim() - spectral_rank - 1].numel()


def _laid_weight(x_hat, weight, fft_size, dilation, shift, groups, path) -> torch.Tensor:
    laid = SPECTRUM_CACHE.get(weight, fft_size, dilation, shift, groups, path)
    return fourier.as_dtype(laid, x_hat.dtype)


def _mix_path(weight: torch.Tensor, spectrum: torch.Tensor, spectral_rank: int) -> str:
    """The contraction path of a spectral conv with this weight and batch. The backward's
    input gradient uses the forward's path too, so that it finds the weight spectrum the
    forward cached, laid out for that path (another layout would transform the weight again)."""
    return contraction.choose_path(weight.shape[1], _batch(spectrum, spectral_rank))


@autocast_as_conv
@spectral_op("spectral_mix")
def spectral_mix(x_hat: torch.Tensor, weight: torch.Tensor, fft_size: list[int],
                 dilation: list[int], shift: list[int], groups: int) -> torch.Tensor:
    """Per-frequency channel contraction of ``x_hat`` with the spectrum of the spatial
    kernel ``weight`` (a conv weight, ``(C_out, C_in/groups, *k)``), placed on the grid
    with ``dilation`` and shifted left by ``shift`` (the conv's left padding)."""
    rank = len(fft_size)
    check_operands(x_hat, weight, groups, rank)
    path = _mix_path(weight, x_hat, rank)
    laid = _laid_weight(x_hat, weight, fft_size, dilation, shift, groups, path)
    return contraction.mix(x_hat, laid, groups, rank, path)


@spectral_mix.register_fake
def _(x_hat, weight, fft_size, dilation, shift, groups):
    rank = len(fft_size)
    batch = x_hat.shape[: x_hat.dim() - rank - 1]
    return x_hat.new_empty((*batch, weight.shape[0], *x_hat.shape[-rank:]))


def _spectral_mix_setup(ctx, inputs, output):
    x_hat, weight, fft_size, dilation, shift, groups = inputs
    # Each gradient needs only the other operand: the input spectrum, the largest tensor
    # here, is kept only when the weight needs a gradient.
    ctx.save_for_backward(x_hat if ctx.needs_input_grad[1] else None, weight)
    ctx.geometry = (fft_size, dilation, shift, groups)


def _spectral_mix_backward(ctx, grad):
    x_hat, weight = ctx.saved_tensors
    fft_size, dilation, shift, groups = ctx.geometry
    grad_x = grad_w = None
    # The kernel gradient first: the input gradient's spectrum is not yet allocated while
    # its blocks run.
    if ctx.needs_input_grad[1]:
        grad_w = spectral_mix_grad_weight(x_hat, grad, list(weight.shape[2:]), fft_size, dilation, shift,
                                          groups, weight.dtype)
    if ctx.needs_input_grad[0]:
        grad_x = spectral_mix_grad_input(grad, weight, fft_size, dilation, shift, groups)
    return grad_x, grad_w, None, None, None, None


spectral_mix.register_autograd(_spectral_mix_backward, setup_context=_spectral_mix_setup)


# --- spectral_mix's gradients ------------------------------------------------------------
#
# Both are custom ops too, so that a compiled backward graph holds them as single nodes:
# the input gradient then reads the weight spectrum the forward cached (traced into plain
# tensor code, it would transform the weight again), and both run over blocks, as the
# forward does. Each one's own gradient is again one of the three mix ops, so gradients of
# any order stay in the frequency domain:
#   grad_input(G, w)  = Σ_o G[o]·conj(Ŵ[o, c])   — linear in G, and in w
#   grad_weight(X, G) = S*(Σ_n conj(X[n, c])·G[n, o])   (S* the adjoint of w ↦ Ŵ)
# with vector-Jacobian products (V the incoming gradient)
#   grad_input:  d/dG = mix(V, w),            d/dw = grad_weight(V, G)
#   grad_weight: d/dX = grad_input(G, V),     d/dG = mix(X, V)

@spectral_op("spectral_mix_grad_input")
def spectral_mix_grad_input(grad: torch.Tensor, weight: torch.Tensor, fft_size: list[int],
                            dilation: list[int], shift: list[int], groups: int) -> torch.Tensor:
    """Gradient of :func:`spectral_mix` with respect to its input spectrum, given the
    gradient ``grad`` of its output: ``Σ_o grad[n, o, f]·conj(Ŵ[o, c, f])`` within each
    group, from the weight spectrum the forward cached (no transform)."""
    rank = len(fft_size)
    path = _mix_path(weight, grad, rank)
    laid = _laid_weight(grad, weight, fft_size, dilation, shift, groups, path)
    return contraction.mix_adjoint_input(grad, laid, groups, rank, path)


@spectral_mix_grad_input.register_fake
def _(grad, weight, fft_size, dilation, shift, groups):
    rank = len(fft_size)
    batch = grad.shape[: grad.dim() - rank - 1]
    return grad.new_empty((*batch, weight.shape[1] * groups, *grad.shape[-rank:]))


def _grad_input_setup(ctx, inputs, output):
    grad, weight, fft_size, dilation, shift, groups = inputs
    ctx.save_for_backward(grad if ctx.needs_input_grad[1] else None, weight)
    ctx.geometry = (fft_size, dilation, shift, groups)


def _grad_input_backward(ctx, v):
    grad, weight = ctx.saved_tensors
    fft_size, dilation, shift, groups = ctx.geometry
    d_grad = d_weight = None
    if ctx.needs_input_grad[0]:
        d_grad = spectral_mix(v, weight, fft_size, dilation, shift, groups)
    if ctx.needs_input_grad[1]:
        d_weight = spectral_mix_grad_weight(v, grad, list(weight.shape[2:]), fft_size, dilation, shift,
                                            groups, weight.dtype)
    return d_grad, d_weight, None, None, None, None


spectral_mix_grad_input.register_autograd(_grad_input_backward, setup_context=_grad_input_setup)


@spectral_op("spectral_mix_grad_weight")
def spectral_mix_grad_weight(x_hat: torch.Tensor, grad: torch.Tensor, kernel_size: list[int],
                             fft_size: list[int], dilation: list[int], shift: list[int], groups: int,
                             weight_dtype: torch.dtype) -> torch.Tensor:
    """Gradient of :func:`spectral_mix` with respect to its spatial kernel (of
    ``kernel_size``, as ``weight_dtype``), given its input spectrum ``x_hat`` and the
    gradient ``grad`` of its output: one inverse transform of the kernel spectra's gradient,
    run over blocks of output channels."""
    if x_hat.numel() == 0 or grad.numel() == 0:  # an empty batch sums no products
        channel_dim = grad.dim() - len(fft_size) - 1
        return x_hat.new_zeros((grad.shape[channel_dim], x_hat.shape[channel_dim] // groups, *kernel_size),
                               dtype=weight_dtype)
    return kernel_gradient(x_hat, grad, kernel_size, fft_size, dilation, shift, groups, weight_dtype)


@spectral_mix_grad_weight.register_fake
def _(x_hat, grad, kernel_size, fft_size, dilation, shift, groups, weight_dtype):
    channel_dim = grad.dim() - len(fft_size) - 1
    return x_hat.new_empty((grad.shape[channel_dim], x_hat.shape[channel_dim] // groups, *kernel_size),
                           dtype=weight_dtype)


def _grad_weight_setup(ctx, inputs, output):
    x_hat, grad, kernel_size, fft_size, dilation, shift, groups, weight_dtype = inputs
    ctx.save_for_backward(x_hat if ctx.needs_input_grad[1] else None,
                          grad if ctx.needs_input_grad[0] else None)
    ctx.geometry = (fft_size, dilation, shift, groups)


def _grad_weight_backward(ctx, v):
    x_hat, grad = ctx.saved_tensors
    fft_size, dilation, shift, groups = ctx.geometry
    d_x_hat = d_grad = None
    if ctx.needs_input_grad[0]:
        d_x_hat = spectral_mix_grad_input(grad, v, fft_size, dilation, shift, groups)
    if ctx.needs_input_grad[1]:
        d_grad = spectral_mix(x_hat, v, fft_size, dilation, shift, groups)
    return d_x_hat, d_grad, None, None, None, None, None, None


spectral_mix_grad_weight.register_autograd(_grad_weight_backward, setup_context=_grad_weight_setup)


# --- from_spectrum -----------------------------------------------------------------------

def _output_positions(out: int, stride: int, fft_size: int, device) -> torch.Tensor:
    return (torch.arange(out, device=device) * stride) % fft_size


def _take_outputs(y: torch.Tensor, out_size: list[int], stride: list[int], fft_size: list[int]) -> torch.Tensor:
    """Output ``j`` of each axis sits at grid position ``j·stride`` (mod the grid on a
    circular domain)."""
    rank = len(fft_size)
    for axis, (out, s, n) in enumerate(zip(out_size, stride, fft_size)):
        dim = y.dim() - rank + axis
        if s == 1 and out <= n:
            y = y.narrow(dim, 0, out)
        elif (out - 1) * s < n:
            y = y.narrow(dim, 0, (out - 1) * s + 1)[(slice(None),) * dim + (slice(None, None, s),)]
        else:
            y = y.index_select(dim, _output_positions(out, s, n, y.device))
    return y


def _place_outputs(grad: torch.Tensor, out_size: list[int], stride: list[int], fft_size: list[int]) -> torch.Tensor:
    """Adjoint of :func:`_take_outputs` up to zero padding at the end (which the forward transform
    of the result adds): the gradient at its grid positions. Axes the crop only narrowed
    are kept as they are, strided axes are zero-stuffed up to their last output, and
    outputs that wrap around a circular grid are added up on the whole grid."""
    rank = len(fft_size)
    for axis, (out, s, n) in enumerate(zip(out_size, stride, fft_size)):
        dim = grad.dim() - rank + axis
        shape = list(grad.shape)
        if s == 1 and out <= n:
            continue
        if (out - 1) * s < n:
            shape[dim] = (out - 1) * s + 1
            stuffed = grad.new_zeros(shape)
            stuffed[(slice(None),) * dim + (slice(None, None, s),)] = grad
            grad = stuffed
        else:
            shape[dim] = n
            grad = grad.new_zeros(shape).index_add_(dim, _output_positions(out, s, n, grad.device), grad)
    return grad


def _irfftn_take_outputs_adjoint(grad: torch.Tensor, out_size: list[int], stride: list[int], fft_size: list[int]) -> torch.Tensor:
    """Adjoint of an inverse transform at ``fft_size`` followed by :func:`_take_outputs`: the
    gradient back at its positions, one forward transform (``to_spectrum``: run over blocks,
    and differentiable again), and the scale that makes it ``irfftn``'s adjoint."""
    placed = _place_outputs(grad, out_size, stride, fft_size)
    spectrum = to_spectrum(placed, list(placed.shape[placed.dim() - len(fft_size):]), fft_size)
    return spectrum.mul_(fourier.irfftn_adjoint_scale(fft_size, spectrum.real.dtype, spectrum.device))


def _inverse(y_hat: torch.Tensor, fft_size: list[int], out_size: list[int], stride: list[int]) -> torch.Tensor:
    """The conv's output samples from its spectrum: the strided samples' own (folded)
    spectrum inverted at the smaller grid where that applies, else the full inverse
    transform cropped."""
    if folding.applies(fft_size, stride, out_size):
        grid = folding.folded_size(fft_size, stride)
        ones = [1] * len(fft_size)
        return _take_outputs(fourier.irfftn(folding.fold(y_hat, fft_size, stride), grid), out_size, ones, grid)
    return _take_outputs(fourier.irfftn(y_hat, fft_size), out_size, stride, fft_size)


def _inverse_adjoint(grad: torch.Tensor, fft_size: list[int], out_size: list[int], stride: list[int]) -> torch.Tensor:
    if folding.applies(fft_size, stride, out_size):
        grid = folding.folded_size(fft_size, stride)
        folded = _irfftn_take_outputs_adjoint(grad, out_size, [1] * len(fft_size), grid)
        return folding.fold_adjoint(folded, fft_size, stride)
    return _irfftn_take_outputs_adjoint(grad, out_size, stride, fft_size)


@autocast_as_conv
@spectral_op("from_spectrum")
def from_spectrum(y_hat: torch.Tensor, fft_size: list[int], out_size: list[int],
                  stride: list[int], bias: Optional[torch.Tensor],
                  out_dtype: torch.dtype) -> torch.Tensor:
    """Inverse transform of ``y_hat`` at ``fft_size``, the conv's output positions
    (``out_size`` per axis, ``stride`` apart) cropped out, plus ``bias``, as ``out_dtype``."""
    rank = len(fft_size)
    real = fourier.real_dtype_for(y_hat.dtype)
    bins = y_hat.shape[y_hat.dim() - rank:]
    if y_hat.numel() == 0:  # an empty batch: MKL refuses a transform of no rows
        return y_hat.new_zeros((*y_hat.shape[: y_hat.dim() - rank], *out_size), dtype=out_dtype)
    if fourier.fits_one_block(y_hat.numel() // bins.numel(), fft_size, real.itemsize, fourier.INVERSE_BLOCK_BYTES):
        y = _inverse(y_hat, fft_size, out_size, stride)
        if bias is not None:
            y = y + fourier.channel_view(fourier.as_dtype(bias, real), rank)
        return fourier.as_dtype(y, out_dtype).contiguous()
    rows = y_hat.reshape(-1, *bins)
    out = torch.empty((rows.shape[0], *out_size), dtype=out_dtype, device=y_hat.device)
    # One bias per row: rows run over (batch, channel) with the channel fastest.
    row_bias = None if bias is None else bias.to(real).repeat(rows.shape[0] // bias.numel())
    for block in fourier.row_blocks(rows.shape[0], fft_size, real.itemsize, fourier.INVERSE_BLOCK_BYTES):
        y = _inverse(rows[block], fft_size, out_size, stride)
        if row_bias is not None:
            y = y + fourier.channel_view(row_bias[block], rank)
        out[block] = y
    return out.reshape(*y_hat.shape[: y_hat.dim() - rank], *out_size)


@from_spectrum.register_fake
def _(y_hat, fft_size, out_size, stride, bias, out_dtype):
    batch = y_hat.shape[: y_hat.dim() - len(fft_size)]
    return y_hat.new_empty((*batch, *out_size), dtype=out_dtype)


def _from_spectrum_setup(ctx, inputs, output):
    y_hat, fft_size, out_size, stride, bias, out_dtype = inputs
    ctx.geometry = (fft_size, out_size, stride)
    ctx.real_dtype = fourier.real_dtype_for(y_hat.dtype)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _from_spectrum_backward(ctx, grad):
    fft_size, out_size, stride = ctx.geometry
    grad = grad.to(ctx.real_dtype)
    grad_y_hat = _inverse_adjoint(grad, out_size=out_size, stride=stride, fft_size=fft_size)
    grad_bias = None
    if ctx.bias_dtype is not None and ctx.needs_input_grad[4]:
        channel_dim = grad.dim() - len(fft_size) - 1
        reduce = [d for d in range(grad.dim()) if d != channel_dim]
        grad_bias = grad.sum(dim=reduce).to(ctx.bias_dtype)
    return grad_y_hat, None, None, None, grad_bias, None


from_spectrum.register_autograd(_from_spectrum_backward, setup_context=_from_spectrum_setup)


# --- lowered_conv ------------------------------------------------------------------------

# Above this size the output spectrum of a merged conv on the CPU is made a block of output
# channels at a time, each block transformed back into the output: a whole one would be
# fresh mmap'd memory on every call (glibc maps blocks past its threshold, which stops
# rising at 32 MiB). Convnet L1 (8 x 96 channels, 128 x 65 bins: 51 MB) ran in 77.6 ms a
# call in blocks against 99.1 ms whole (one loaded run on this project's 2-core CPU).
WHOLE_SPECTRUM_BYTES = MMAP_CEILING_BYTES


@autocast_as_conv
@spectral_op("lowered_conv")
def lowered_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], in_size: list[int],
                 fft_size: list[int], dilation: list[int], shift: list[int], groups: int,
                 out_size: list[int], stride: list[int], out_dtype: torch.dtype) -> torch.Tensor:
    """A lowered conv whose spectra nothing else reads, as one call: ``from_spectrum(
    spectral_mix(to_spectrum(x)))``, run by the three ops' implementations for ``x``'s
    device (with the output spectrum in blocks of channels past
    :data:`WHOLE_SPECTRUM_BYTES`). Where a gradient is needed it runs as the three ops."""
    device = x.device
    x_hat = to_spectrum.implementation(device)(x, in_size, fft_size)
    rank = len(fft_size)
    check_operands(x_hat, weight, groups, rank)
    spectrum_bytes = x_hat.numel() // x_hat.shape[x_hat.dim() - rank - 1] * weight.shape[0] * x_hat.element_size()
    if device.type == "cpu" and spectrum_bytes > WHOLE_SPECTRUM_BYTES:
        out = _conv_in_channel_blocks(x_hat, weight, bias, fft_size, dilation, shift, groups, out_size, stride,
                                      out_dtype)
    else:
        y_hat = spectral_mix.implementation(device)(x_hat, weight, fft_size, dilation, shift, groups)
        del x_hat  # the input spectrum goes before the output is made
        out = from_spectrum.implementation(device)(y_hat, fft_size, out_size, stride, bias, out_dtype)
    return _finite_or_direct(out, x, weight, bias, fft_size, dilation, shift, groups, out_size, stride, out_dtype)


def _finite_or_direct(out, x, weight, bias, fft_size, dilation, shift, groups, out_size, stride,
                      out_dtype) -> torch.Tensor:
    """``out``, a merged conv's result, or, where it holds a NaN or infinity, the call
    computed again by torch's conv (:func:`_direct_on_grid`). A non-finite input value
    spreads through the transform to every output of its row, where torch's conv makes only
    the outputs that read it non-finite. One sum over the output tells (~9 µs for 65k
    outputs, 1.5% of that conv's time on a 2-core CPU). On a GPU the test would stall the
    stream, and is not made; nor while tracing (fake tensors have no values)."""
    if out.device.type == "cpu" and is_plain_tensor(out) and not bool(out.detach().sum().isfinite()):
        return _direct_on_grid(x, weight, bias, fft_size, dilation, shift, groups, out_size, stride, out_dtype)
    return out


def _direct_on_grid(x, weight, bias, fft_size, dilation, shift, groups, out_size, stride, out_dtype) -> torch.Tensor:
    """What the spectral conv computes, by torch's own conv: the input zero-padded at the
    end to ``fft_size`` and read circularly from ``-shift`` (the grid's modular indexing),
    a strided, dilated 'valid' conv of that."""
    rank = len(fft_size)
    real = fourier.real_dtype_for(x.dtype)
    unbatched = x.dim() == rank + 1
    grid = x.unsqueeze(0) if unbatched else x
    for axis, (n, d, left, out, s) in enumerate(zip(fft_size, dilation, shift, out_size, stride)):
        dim = grid.dim() - rank + axis
        grid = F.pad(grid.movedim(dim, -1), [0, n - grid.shape[dim]]).movedim(-1, dim)
        span = d * (weight.shape[2 + axis] - 1) + 1
        positions = (torch.arange((out - 1) * s + span, device=x.device) - left) % n
        grid = grid.index_select(dim, positions)
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    y = conv(grid.to(real), weight.to(real), None if bias is None else bias.to(real), stride, 0, dilation, groups)
    return (y.squeeze(0) if unbatched else y).to(out_dtype)


def _conv_in_channel_blocks(x_hat, weight, bias, fft_size, dilation, shift, groups, out_size, stride,
                            out_dtype) -> torch.Tensor:
    """``spectral_mix`` and ``from_spectrum`` a block of output channels at a time (of about
    :data:`fourier.BLOCK_BYTES` of spectrum), each block written into the output."""
    rank = len(fft_size)
    path = _mix_path(weight, x_hat, rank)
    laid = _laid_weight(x_hat, weight, fft_size, dilation, shift, groups, path)
    c_out = weight.shape[0]
    out = torch.empty((*x_hat.shape[: x_hat.dim() - rank - 1], c_out, *out_size), dtype=out_dtype,
                      device=x_hat.device)
    channels = out.view(-1, c_out, *out_size)
    per_channel = channels.shape[0] * x_hat.shape[x_hat.dim() - rank:].numel() * x_hat.element_size()
    blocks = kernel_blocks(groups, c_out // groups, per_channel)
    for first, y_hat in contraction.mix_blocks(x_hat, laid, groups, rank, path, blocks):
        last = first + y_hat.shape[1]
        block_bias = None if bias is None else bias[first:last]
        channels[:, first:last] = from_spectrum.kernel(y_hat, fft_size, out_size, stride, block_bias, out_dtype)
    return out


@lowered_conv.register_fake
def _(x, weight, bias, in_size, fft_size, dilation, shift, groups, out_size, stride, out_dtype):
    batch = x.shape[: x.dim() - len(fft_size) - 1]
    return x.new_empty((*batch, weight.shape[0], *out_size), dtype=out_dtype)


class _GradientAfterWeight(torch.autograd.Function):
    """The identity on a conv's bias, made before the conv's other ops: autograd runs a
    node made earlier later, so the bias's gradient is accumulated after the weight's, as
    torch's conv gives them (weight, then bias). DDP rebuilds its buckets in the order
    gradients arrive: with the bias's first (from_spectrum's backward runs before
    spectral_mix's), a bias could land in another bucket than the original's."""

    @staticmethod
    def forward(bias: torch.Tensor) -> torch.Tensor:
        return bias.view_as(bias)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def gradient_after_weight(bias: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``bias``, through :class:`_GradientAfterWeight` where it needs a gradient: called
    before the conv's own ops, it makes the bias's gradient arrive after the weight's (fused
    chains call it on the biases they carry as spectral shifts)."""
    return _GradientAfterWeight.apply(bias) if bias is not None and bias.requires_grad else bias


def _lowered_conv_as_three_ops(x, weight, bias, in_size, fft_size, dilation, shift, groups, out_size, stride,
                               out_dtype):
    late_bias = gradient_after_weight(bias)
    y_hat = spectral_mix(to_spectrum(x, in_size, fft_size), weight, fft_size, dilation, shift, groups)
    out = from_spectrum(y_hat, fft_size, out_size, stride, late_bias, out_dtype)
    return _finite_or_direct(out, x, weight, bias, fft_size, dilation, shift, groups, out_size, stride, out_dtype)


lowered_conv.register_composite_autograd(_lowered_conv_as_three_ops)
