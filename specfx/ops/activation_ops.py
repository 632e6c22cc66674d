"""Ops that keep a chain of convolutions in the frequency domain.

A fused chain (see :mod:`specfx.passes.find_chains`) holds spectra ``(*batch, C, *bins)``
on one shared grid ``fft_size`` (P per axis, N = ∏P). A tensor of spatial size ``size``
(L per axis, L ≤ P) sits at grid positions ``[0, L)``; positions outside may hold garbage
(wrap-around of earlier convs) that the chain analysis has proven is never read, or that
an op here masks off. ``m`` below is the indicator of ``[0, L)`` on the grid and
``M = F{m}`` its spectrum: a per-channel constant on a zero-padded grid is ``b·M``, not
``b·N·δ`` (on a circular grid L = P and the two agree).

- ``spectral_activation(X, P, L, scale, shift, activation, slope)`` — the exact spectral
  activation: ``rfftn(pad(act(scale·crop(irfftn(X)) + shift)))``: one inverse transform,
  crop to ``[0, L)`` (the mask), the per-channel affine (conv bias, eval BatchNorm), the
  activation, zero padding and one forward transform at the shared size. Exact to
  rounding. ``activation="identity"`` is the mask alone (zero-padded linear chains).
- ``poly_activation(X, coeffs, P, L, scale, shift, mask_input)`` — the Fourier-domain
  polynomial activation of "Spectral Convolution Networks" (Francesca, Hughes & Gregg):
  ``u = scale·X' + shift·M`` and ``Σ_j c_j·F{u^j}`` with ``F{u^0} := M`` and
  ``F{u^j} = N^{1−j}·U^{⊛j}`` (circular convolution of full spectra), so for degree 2
  ``a·M + b·U + (c/N)·U ⊛ U``. No inverse transform in the forward. ``X' = X``, or
  ``(1/N)·M ⊛ X`` (the mask, applied in the frequency domain) when ``mask_input``.
  ``coeffs`` is ``(C, degree + 1)``, lowest power first. Each ``⊛`` costs O(N_bins·N)
  per channel against O(N log N) for a transform pair: it only pays on tiny grids.
- ``spectral_affine(X, P, L, scale, shift)`` — ``scale·X + shift·M``, per channel.
- ``spectral_add(A, B)`` — ``A + B`` (a residual add of two spectra on the same grid).

Every op is the frequency-domain image of a map on real signals, ``F ∘ f ∘ F⁻¹`` with
``F = rfftn`` and ``F⁻¹ = irfftn`` at size P. ``irfftn`` reads only the Hermitian part of
a one-sided spectrum (it drops the imaginary part of self-conjugate bins); the ops treat
every input that way, so each one is exactly that map, and its backward is its exact
adjoint written out with :mod:`.fourier`'s adjoints (plain tensor code, so double
backward, fake tensors and AOTAutograd work). The poly op's backward goes through the
spatial domain (transforms are O(N log N); its frequency-domain adjoint would be
O(N²)): avoiding the inverse transform is a property of its forward. ``coeffs`` are
fitted constants and get no gradient. Conjugates are materialized (``conj_physical``):
under a ``TorchDispatchMode`` (AOTAutograd's first call) a lazy conj bit is ignored.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

import torch
import torch.nn.functional as F

from . import fourier
from .library import spectral_op

ACTIVATIONS = ("relu", "leaky_relu", "gelu", "gelu_tanh", "silu", "square", "identity")


def _reduce_to_channels(t: torch.Tensor, rank: int) -> torch.Tensor:
    channel_dim = t.dim() - rank - 1
    return t.sum(dim=[d for d in range(t.dim()) if d != channel_dim])


def _window(y: torch.Tensor, size: list[int]) -> torch.Tensor:
    """The window ``[0, L)`` of the grid (the mask), per axis."""
    rank = len(size)
    for axis, n in enumerate(size):
        y = y.narrow(y.dim() - rank + axis, 0, n)
    return y


def _pad_to(y: torch.Tensor, fft_size: list[int]) -> torch.Tensor:
    pads: list[int] = []
    for have, want in zip(reversed(y.shape[-len(fft_size):]), reversed(fft_size)):
        pads += [0, want - have]
    return F.pad(y, pads) if any(pads) else y


def mask_grid(size: list[int], fft_size: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    """``m``: ones on ``[0, L)`` of the ``fft_size`` grid, zeros elsewhere."""
    return _pad_to(torch.ones(list(size), dtype=dtype, device=device), fft_size)


def mask_spectrum(size: list[int], fft_size: list[int], dtype: torch.dtype, device) -> torch.Tensor:
    """``M = rfftn(m)``, one-sided, in the complex dtype matching ``dtype``."""
    return fourier.rfftn(mask_grid(size, fft_size, fourier.real_dtype_for(dtype), device), fft_size)


def _affine(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
            rank: int) -> torch.Tensor:
    if scale is not None:
        x = x * fourier.channel_view(scale.to(x.device, x.dtype), rank)
    if shift is not None:
        x = x + fourier.channel_view(shift.to(x.device, x.dtype), rank)
    return x


def _per_row(v: torch.Tensor, channels: int, rows: int) -> torch.Tensor:
    """A per-channel (or one-element) vector, repeated for rows that run over
    (batch, channel) with the channel fastest."""
    return v.reshape(-1).expand(channels).repeat(rows // channels)


def _affine_(x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
             rank: int) -> torch.Tensor:
    """:func:`_affine` in place on a temporary."""
    if scale is not None:
        x = x.mul_(fourier.channel_view(scale.to(x.device, x.dtype), rank))
    if shift is not None:
        x = x.add_(fourier.channel_view(shift.to(x.device, x.dtype), rank))
    return x


def _activate_(u: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    """:func:`_activate`, in place where torch has an in-place form."""
    if activation == "relu":
        return u.relu_()
    if activation == "leaky_relu":
        return F.leaky_relu_(u, slope)
    if activation == "silu":
        return F.silu(u, inplace=True)
    if activation == "identity":
        return u
    return _activate(u, activation, slope)


def _activate(u: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    if activation == "relu":
        return torch.relu(u)
    if activation == "leaky_relu":
        return F.leaky_relu(u, slope)
    if activation == "gelu":
        return F.gelu(u)
    if activation == "gelu_tanh":
        return F.gelu(u, approximate="tanh")
    if activation == "silu":
        return F.silu(u)
    if activation == "square":
        return u * u
    if activation == "identity":
        return u
    raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


def _activate_backward(grad: torch.Tensor, u: torch.Tensor, activation: str, slope: float) -> torch.Tensor:
    aten = torch.ops.aten
    if activation == "relu":
        return aten.threshold_backward(grad, u, 0)
    if activation == "leaky_relu":
        return aten.leaky_relu_backward(grad, u, slope, False)
    if activation == "gelu":
        return aten.gelu_backward(grad, u, approximate="none")
    if activation == "gelu_tanh":
        return aten.gelu_backward(grad, u, approximate="tanh")
    if activation == "silu":
        return aten.silu_backward(grad, u)
    if activation == "square":
        return 2 * u * grad
    return grad


def _check_activation(activation: str) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")


# --- spectral_activation -----------------------------------------------------------------

@spectral_op("spectral_activation")
def spectral_activation(x_hat: torch.Tensor, fft_size: list[int], size: list[int],
                        scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                        activation: str, negative_slope: float) -> torch.Tensor:
    """``rfftn(pad(act(scale·crop(irfftn(x_hat)) + shift)))`` at ``fft_size``: the exact
    spectral activation (inverse transform, mask, affine, activation, forward transform)."""
    _check_activation(activation)
    if x_hat.numel() == 0:  # an empty batch: MKL refuses a transform of no rows
        return torch.empty_like(x_hat, memory_format=torch.contiguous_format)
    rank = len(fft_size)
    rows = x_hat.reshape(-1, *x_hat.shape[-rank:])
    blocks = fourier.row_blocks(rows.shape[0], fft_size, fourier.real_dtype_for(x_hat.dtype).itemsize)
    if len(blocks) == 1:
        return fourier.rfftn(_activated_grid(fourier.irfftn(x_hat, fft_size), size, scale, shift, activation,
                                             negative_slope), fft_size)
    channels = x_hat.shape[x_hat.dim() - rank - 1]
    row_scale, row_shift = (None if v is None else _per_row(v, channels, rows.shape[0]) for v in (scale, shift))
    out = torch.empty_like(rows)
    for block in blocks:
        grid = _activated_grid(fourier.irfftn(rows[block], fft_size), size,
                               None if row_scale is None else row_scale[block],
                               None if row_shift is None else row_shift[block], activation, negative_slope)
        torch.fft.rfftn(grid, s=list(fft_size), dim=fourier.spatial_dims(rank), out=out[block])
    return out.reshape(x_hat.shape)


def _activated_grid(grid: torch.Tensor, size: list[int], scale: Optional[torch.Tensor],
                    shift: Optional[torch.Tensor], activation: str, slope: float) -> torch.Tensor:
    """``pad(act(scale·crop(grid) + shift))``, in place on the temporary ``grid``: the window
    ``[0, L)`` is transformed where it lies and the rest of the grid zeroed, so that the
    forward transform reads the grid as it is. Cropping to the window and padding it back
    copied the whole signal twice: on conv-ReLU-conv stacks (2, 16, 64, 64) k15 on a 72x72
    grid that was a fifth of the activation's time."""
    rank = len(size)
    window = _window(grid, size)
    activated = _activate_(_affine_(window, scale, shift, rank), activation, slope)
    if activated is not window:  # an activation with no in-place form
        window.copy_(activated)
    for axis, n in enumerate(size):
        dim = grid.dim() - rank + axis
        grid.narrow(dim, n, grid.shape[dim] - n).zero_()
    return grid


@spectral_activation.register_fake
def _(x_hat, fft_size, size, scale, shift, activation, negative_slope):
    _check_activation(activation)
    return torch.empty_like(x_hat, memory_format=torch.contiguous_format)


def _spectral_activation_setup(ctx, inputs, output):
    x_hat, fft_size, size, scale, shift, activation, negative_slope = inputs
    ctx.save_for_backward(x_hat, scale, shift)
    ctx.args = (fft_size, size, activation, negative_slope)


def _spectral_activation_backward(ctx, grad):
    x_hat, scale, shift = ctx.saved_tensors
    fft_size, size, activation, slope = ctx.args
    if x_hat.numel() == 0:  # an empty batch has zero gradients
        return (torch.zeros_like(x_hat), None, None, None if scale is None else torch.zeros_like(scale),
                None if shift is None else torch.zeros_like(shift), None, None)
    rank = len(fft_size)
    x = _window(fourier.irfftn(x_hat, fft_size), size)
    u = _affine(x, scale, shift, rank)
    g_u = _activate_backward(_window(fourier.rfftn_adjoint(grad, fft_size), size), u, activation, slope)
    grad_scale = grad_shift = None
    if scale is not None and ctx.needs_input_grad[3]:
        grad_scale = _reduce_to_channels(g_u * x, rank).to(scale.dtype)
    if shift is not None and ctx.needs_input_grad[4]:
        grad_shift = _reduce_to_channels(g_u, rank).to(shift.dtype)
    grad_x_hat = None
    if ctx.needs_input_grad[0]:
        g_x = g_u if scale is None else g_u * fourier.channel_view(scale.to(g_u.dtype), rank)
        grad_x_hat = fourier.irfftn_adjoint(_pad_to(g_x, fft_size), fft_size)
    return grad_x_hat, None, None, grad_scale, grad_shift, None, None


spectral_activation.register_autograd(_spectral_activation_backward, setup_context=_spectral_activation_setup)


# --- spectral_affine ---------------------------------------------------------------------

@spectral_op("spectral_affine")
def spectral_affine(x_hat: torch.Tensor, fft_size: list[int], size: list[int],
                    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor]) -> torch.Tensor:
    """``scale·x_hat + shift·M``: a per-channel affine map of the signal's ``[0, L)``
    values (garbage outside ``[0, L)`` is only scaled)."""
    rank = len(fft_size)
    y = x_hat if scale is None else x_hat * fourier.channel_view(scale.to(x_hat.real.dtype), rank)
    if shift is not None:
        m = mask_spectrum(size, fft_size, x_hat.dtype, x_hat.device)
        y = y + fourier.channel_view(shift.to(x_hat.real.dtype), rank) * m
    return y.contiguous() if y is not x_hat else y.clone()


@spectral_affine.register_fake
def _(x_hat, fft_size, size, scale, shift):
    return torch.empty_like(x_hat, memory_format=torch.contiguous_format)


def _spectral_affine_setup(ctx, inputs, output):
    x_hat, fft_size, size, scale, shift = inputs
    ctx.save_for_backward(x_hat, scale)
    ctx.args = (fft_size, size, shift is not None, None if shift is None else shift.dtype)


def _spectral_affine_backward(ctx, grad):
    x_hat, scale = ctx.saved_tensors
    fft_size, size, has_shift, shift_dtype = ctx.args
    rank = len(fft_size)
    grad_x = grad_scale = grad_shift = None
    if ctx.needs_input_grad[0]:
        grad_x = grad if scale is None else grad * fourier.channel_view(scale.to(grad.real.dtype), rank)
    if scale is not None and ctx.needs_input_grad[3]:
        grad_scale = _reduce_to_channels((grad.conj_physical() * x_hat).real, rank).to(scale.dtype)
    if has_shift and ctx.needs_input_grad[4]:
        m = mask_spectrum(size, fft_size, grad.dtype, grad.device)
        grad_shift = _reduce_to_channels((grad.conj_physical() * m).real, rank).to(shift_dtype)
    return grad_x, None, None, grad_scale, grad_shift


spectral_affine.register_autograd(_spectral_affine_backward, setup_context=_spectral_affine_setup)


# --- spectral_add ------------------------------------------------------------------------

@spectral_op("spectral_add")
def spectral_add(a_hat: torch.Tensor, b_hat: torch.Tensor) -> torch.Tensor:
    """``a_hat + b_hat``: two spectra on the same grid (a residual add)."""
    return a_hat + b_hat


@spectral_add.register_fake
def _(a_hat, b_hat):
    return torch.empty(torch.broadcast_shapes(a_hat.shape, b_hat.shape), dtype=a_hat.dtype, device=a_hat.device)


def _spectral_add_setup(ctx, inputs, output):
    ctx.shapes = (inputs[0].shape, inputs[1].shape)


def _sum_to(grad: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    return grad if grad.shape == shape else grad.sum_to_size(shape)


def _spectral_add_backward(ctx, grad):
    a_shape, b_shape = ctx.shapes
    return _sum_to(grad, a_shape), _sum_to(grad, b_shape)


spectral_add.register_autograd(_spectral_add_backward, setup_context=_spectral_add_setup)


# --- poly_activation ---------------------------------------------------------------------

@lru_cache(maxsize=64)
def _grid_tables(fft_size: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Index tables on the flattened full grid (CPU, int64):

    - ``source``, ``conj``: full position → one-sided flat index, and whether to conjugate;
    - ``negate``: full position k → flat index of −k;
    - ``half``: one-sided bin → its full flat index.
    """
    grids = torch.meshgrid(*[torch.arange(n) for n in fft_size], indexing="ij")
    last = fft_size[-1]
    kept = last // 2 + 1
    in_half = grids[-1] < kept
    mirrored = [(-g) % n for g, n in zip(grids, fft_size)]
    src_coords = [torch.where(in_half, g, mg) for g, mg in zip(grids, mirrored)]
    half_shape = [*fft_size[:-1], kept]
    source = torch.zeros(fft_size, dtype=torch.long)
    stride = 1
    for axis in reversed(range(len(fft_size))):
        source += src_coords[axis] * stride
        stride *= half_shape[axis]
    negate = torch.zeros(fft_size, dtype=torch.long)
    stride = 1
    for axis in reversed(range(len(fft_size))):
        negate += mirrored[axis] * stride
        stride *= fft_size[axis]
    full_index = torch.arange(math.prod(fft_size)).reshape(fft_size)
    half = full_index[..., :kept].reshape(-1)
    return source.reshape(-1), (~in_half).reshape(-1), negate.reshape(-1), half


@lru_cache(maxsize=16)
def _difference_table(fft_size: tuple[int, ...], one_sided: bool) -> torch.Tensor:
    """``table[k, q]`` = flat index of ``(k − q) mod P`` (per axis), for output positions
    k (one-sided bins, or the whole grid) and every grid position q."""
    coords = torch.stack(torch.meshgrid(*[torch.arange(n) for n in fft_size], indexing="ij"), -1).reshape(-1, len(fft_size))
    outputs = coords
    if one_sided:
        outputs = coords[coords[:, -1] < fft_size[-1] // 2 + 1]
    diff = (outputs[:, None, :] - coords[None, :, :]) % torch.tensor(fft_size)
    flat = torch.zeros(diff.shape[:2], dtype=torch.long)
    stride = 1
    for axis in reversed(range(len(fft_size))):
        flat += diff[..., axis] * stride
        stride *= fft_size[axis]
    return flat


def full_spectrum(x_hat: torch.Tensor, fft_size: list[int]) -> torch.Tensor:
    """The Hermitian full spectrum ``(*lead, N)`` of the signal ``irfftn(x_hat)`` reads:
    the one-sided spectrum mirrored, then symmetrized (``irfftn`` ignores the
    anti-Hermitian part of the self-conjugate bins)."""
    rank = len(fft_size)
    source, conj, negate, _ = (t.to(x_hat.device) for t in _grid_tables(tuple(fft_size)))
    flat = x_hat.reshape(*x_hat.shape[: x_hat.dim() - rank], -1)
    full = flat.index_select(-1, source)
    full = torch.where(conj, full.conj_physical(), full)
    return (full + full.index_select(-1, negate).conj_physical()) / 2


def _one_sided(full: torch.Tensor, fft_size: list[int]) -> torch.Tensor:
    half = _grid_tables(tuple(fft_size))[3].to(full.device)
    return full.index_select(-1, half).reshape(*full.shape[:-1], *fourier.rfft_bins(fft_size))


def circular_convolve(a_full: torch.Tensor, b_full: torch.Tensor, fft_size: list[int],
                      one_sided: bool) -> torch.Tensor:
    """``(A ⊛ B)[k] = Σ_q A[q]·B[(k − q) mod P]`` on flattened full spectra (broadcast
    over leading dims), at the one-sided bins or at every grid position: O(N_out·N) per
    row. When ``A`` is one spectrum shared by every row (the mask), it is one GEMM of the
    rows of ``B`` with ``A``'s circulant; otherwise a sum over the N shifts of ``B``
    (``Σ_q A[q]·roll(B, q)``, each shift a window of ``B`` tiled twice), which streams
    through memory instead of gathering an N_out x N block per row."""
    rank = len(fft_size)
    n = math.prod(fft_size)
    lead = torch.broadcast_shapes(a_full.shape[:-1], b_full.shape[:-1])
    if a_full.shape[:-1].numel() == 1 and n <= 4096:
        table = _difference_table(tuple(fft_size), one_sided).to(a_full.device)  # (K, N): k − q
        circulant = a_full.reshape(-1)[table].transpose(0, 1)  # (N, K): A[k − q]
        rows = b_full.expand(*lead, n).reshape(-1, n)
        return (rows @ circulant).reshape(*lead, table.shape[0])
    a = a_full.expand(*lead, n).reshape(-1, n, *([1] * rank))
    b = b_full.expand(*lead, n).reshape(-1, *fft_size)
    # B tiled twice along each axis: roll(B, q) is the window of it starting at P − q (a view)
    tiled = b.repeat(1, *([2] * rank))
    out = torch.zeros_like(b)
    shifts = torch.cartesian_prod(*[torch.arange(p) for p in fft_size]).reshape(n, rank).tolist()
    for q, shift in enumerate(shifts):
        window = tiled[(slice(None),) + tuple(slice(p - s, 2 * p - s) for p, s in zip(fft_size, shift))]
        out.addcmul_(window, a[:, q])
    out = out.reshape(-1, n)
    if one_sided:
        out = out.index_select(-1, _grid_tables(tuple(fft_size))[3].to(out.device))
    return out.reshape(*lead, out.shape[-1])


def _poly_forward(x_hat, coeffs, fft_size, size, scale, shift, mask_input):
    n = math.prod(fft_size)
    real = fourier.real_dtype_for(x_hat.dtype)
    m_full = None
    x_full = full_spectrum(x_hat, fft_size)  # (*batch, C, N)
    if mask_input or shift is not None or coeffs.shape[1] > 0:
        m_full = full_spectrum(mask_spectrum(size, fft_size, x_hat.dtype, x_hat.device), fft_size)
    if mask_input:
        x_full = circular_convolve(m_full, x_full, fft_size, one_sided=False) / n
    u = x_full
    if scale is not None:
        u = u * scale.to(real).reshape(-1, 1)
    if shift is not None:
        u = u + shift.to(real).reshape(-1, 1) * m_full
    c = coeffs.to(real)
    degree = c.shape[1] - 1
    out = c[:, 0:1] * m_full
    if degree >= 1:
        out = out + c[:, 1:2] * u
    power = u
    for j in range(2, degree + 1):
        power = circular_convolve(power, u, fft_size, one_sided=False) / n
        out = out + c[:, j:j + 1] * power
    return _one_sided(out, fft_size).to(x_hat.dtype)


@spectral_op("poly_activation")
def poly_activation(x_hat: torch.Tensor, coeffs: torch.Tensor, fft_size: list[int], size: list[int],
                    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
                    mask_input: bool) -> torch.Tensor:
    """``Σ_j c_j·F{u^j}`` with ``u = scale·x' + shift·m`` and the constant term on the
    mask, computed by circular convolutions of spectra (no inverse transform)."""
    if coeffs.dim() != 2:
        raise ValueError(f"coeffs must be (channels, degree + 1), got shape {tuple(coeffs.shape)}")
    if x_hat.numel() == 0:  # an empty batch
        return torch.empty_like(x_hat, memory_format=torch.contiguous_format)
    return _poly_forward(x_hat, coeffs, fft_size, size, scale, shift, mask_input).contiguous()


@poly_activation.register_fake
def _(x_hat, coeffs, fft_size, size, scale, shift, mask_input):
    return torch.empty_like(x_hat, memory_format=torch.contiguous_format)


def _poly_argument(x_hat, fft_size, size, scale, shift, mask_input):
    """The polynomial's argument in the spatial domain, ``u = scale·x' + shift·m``, with
    the mask ``m`` and ``x'`` (``x``, masked when ``mask_input``) it was made from."""
    rank = len(fft_size)
    x = fourier.irfftn(x_hat, fft_size)
    m = mask_grid(size, fft_size, x.dtype, x.device)
    xp = x * m if mask_input else x
    u = xp if scale is None else xp * fourier.channel_view(scale.to(x.dtype), rank)
    if shift is not None:
        u = u + fourier.channel_view(shift.to(x.dtype), rank) * m
    return m, xp, u


def _poly_setup(ctx, inputs, output):
    x_hat, coeffs, fft_size, size, scale, shift, mask_input = inputs
    ctx.save_for_backward(x_hat, coeffs, scale, shift)
    ctx.args = (fft_size, size, mask_input)


def _poly_backward(ctx, grad):
    x_hat, coeffs, scale, shift = ctx.saved_tensors
    fft_size, size, mask_input = ctx.args
    if x_hat.numel() == 0:  # an empty batch has zero gradients
        return (torch.zeros_like(x_hat), None, None, None, None if scale is None else torch.zeros_like(scale),
                None if shift is None else torch.zeros_like(shift), None)
    rank = len(fft_size)
    m, xp, u = _poly_argument(x_hat, fft_size, size, scale, shift, mask_input)
    c = coeffs.to(u.dtype)
    derivative = torch.zeros_like(u)
    power = torch.ones_like(u)
    for j in range(1, c.shape[1]):
        derivative = derivative + j * fourier.channel_view(c[:, j], rank) * power
        power = power * u
    g_u = fourier.rfftn_adjoint(grad, fft_size) * derivative
    grad_scale = grad_shift = grad_x_hat = None
    if scale is not None and ctx.needs_input_grad[4]:
        grad_scale = _reduce_to_channels(g_u * xp, rank).to(scale.dtype)
    if shift is not None and ctx.needs_input_grad[5]:
        grad_shift = _reduce_to_channels(g_u * m, rank).to(shift.dtype)
    if ctx.needs_input_grad[0]:
        g_x = g_u if scale is None else g_u * fourier.channel_view(scale.to(g_u.dtype), rank)
        if mask_input:
            g_x = g_x * m
        grad_x_hat = fourier.irfftn_adjoint(g_x, fft_size)
    return grad_x_hat, None, None, None, grad_scale, grad_shift, None


poly_activation.register_autograd(_poly_backward, setup_context=_poly_setup)


def poly_reference(x_hat: torch.Tensor, coeffs: torch.Tensor, fft_size: list[int], size: list[int],
                   scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None,
                   mask_input: bool = False) -> torch.Tensor:
    """What :func:`poly_activation` computes, through the spatial domain (for tests and
    for measuring a fitted polynomial's error)."""
    rank = len(fft_size)
    m, _, u = _poly_argument(x_hat, fft_size, size, scale, shift, mask_input)
    c = coeffs.to(u.dtype)
    out = fourier.channel_view(c[:, 0], rank) * m
    power = torch.ones_like(u)
    for j in range(1, c.shape[1]):
        power = power * u
        out = out + fourier.channel_view(c[:, j], rank) * power
    return fourier.rfftn(out, fft_size)
