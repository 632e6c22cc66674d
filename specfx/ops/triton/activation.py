"""Fused Triton kernels of the spectral activations, for grids of at most 64 per axis.

One kernel does inverse transform → per-channel affine → pointwise map → forward
transform on a tile held in registers: the spatial intermediate never reaches global
memory. Both transforms are products with the DFT matrices of :mod:`.dft` (``tl.dot``
in ``tf32x3``: each fp32 product as three TF32 tensor-core products, accurate to about
2^-21 where IEEE fp32 FMAs would keep whole 64 x 64 operand tiles in registers and spill),
so the result is the op's to fp32 tolerance:

- :func:`spectral_activation` (``activation_ops.spectral_activation``): evaluated on
  ``[0, L)`` only (the crop), ``act(scale·x + shift)``, and the forward transform of the
  zero-padded result;
- :func:`poly_activation` (``activation_ops.poly_activation``'s forward, i.e.
  ``poly_reference``): ``Σ_j c_j·u^j`` (Horner) with ``u = scale·x' + shift·m`` and the
  constant term on the mask ``m``, evaluated on the whole grid (on ``[0, L)`` when the
  input is masked, since everything outside is then zero).

A 1D kernel transforms a block of rows with one dot per step; a 2D kernel transforms
one image per program, axis by axis (the leading axis' complex DFT, then the last axis'
real one, and back in reverse order), a block of spatial rows at a time.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl

from .. import fourier
from ..activation_ops import ACTIVATIONS
from .dft import MIN_EDGE, dft_matrices, edge

# Builtins only in the kernels, as in .mix (tl.zeros and the like may not be interpreted).

# Largest FFT size per axis the fused kernels take: a 64 x 33-bin image and its DFT
# matrices are the most a program's registers hold.
MAX_FUSED_SIZE = 64
# Rows per program of the 1D kernel: the M edge of its dots (the smallest, which keeps a
# 64-point transform's tiles in registers).
_ROWS_PER_PROGRAM = 16

# Pointwise map codes (constexpr in the kernels).
_CODES = {name: code for code, name in enumerate(ACTIVATIONS)}
RELU = tl.constexpr(_CODES["relu"])
LEAKY_RELU = tl.constexpr(_CODES["leaky_relu"])
GELU = tl.constexpr(_CODES["gelu"])
GELU_TANH = tl.constexpr(_CODES["gelu_tanh"])
SILU = tl.constexpr(_CODES["silu"])
SQUARE = tl.constexpr(_CODES["square"])
POLY = tl.constexpr(len(ACTIVATIONS))


@triton.jit
def _mm(a, b):
    return tl.dot(a, b, input_precision="tf32x3")


@triton.jit
def _pointwise(x, in_mask, ch, scale_ptr, shift_ptr, coef_ptr, slope,
               ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, DEGREE: tl.constexpr):
    """The map between the transforms, at positions ``in_mask`` (inside ``[0, L)``) and
    outside it; ``ch`` is the channel of each row (or of the image)."""
    u = x
    if HAS_SCALE:
        u = u * tl.load(scale_ptr + ch)
    if HAS_SHIFT:
        u = u + tl.where(in_mask, tl.load(shift_ptr + ch), 0.0)
    if ACT == POLY:
        a = tl.where(in_mask, tl.load(coef_ptr + ch * (DEGREE + 1)), 0.0)
        if DEGREE > 0:
            acc = tl.load(coef_ptr + ch * (DEGREE + 1) + DEGREE)
            for j in tl.static_range(DEGREE - 1, 0, -1):
                acc = acc * u + tl.load(coef_ptr + ch * (DEGREE + 1) + j)
            a = acc * u + a
    elif ACT == RELU:
        a = tl.where(u > 0, u, 0.0)
    elif ACT == LEAKY_RELU:
        a = tl.where(u > 0, u, u * slope)
    elif ACT == GELU:
        a = 0.5 * u * (1.0 + tl.math.erf(u * 0.7071067811865476))
    elif ACT == GELU_TANH:
        # 0.5·(1 + tanh(z)) = sigmoid(2z): no cancellation near zero
        z = 0.7978845608028654 * (u + 0.044715 * u * u * u)
        a = u / (1.0 + tl.exp(-2.0 * z))
    elif ACT == SILU:
        a = u / (1.0 + tl.exp(-u))
    elif ACT == SQUARE:
        a = u * u
    else:
        a = u
    return a


@triton.jit
def _fused_1d_kernel(x_ptr, y_ptr, inv_cos_ptr, inv_sin_ptr, fwd_cos_ptr, fwd_sin_ptr,
                     scale_ptr, shift_ptr, coef_ptr, slope, rows, C, K, L,
                     KP: tl.constexpr, EP: tl.constexpr, BLOCK_R: tl.constexpr, ACT: tl.constexpr,
                     HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, DEGREE: tl.constexpr):
    """Rows of ``K`` one-sided bins (interleaved real pairs) in, the same out."""
    r = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    k = tl.arange(0, KP)[None, :]
    kc = tl.arange(0, KP)[:, None]
    t = tl.arange(0, EP)[None, :]
    tc = tl.arange(0, EP)[:, None]
    bins = (r < rows) & (k < K)
    offs = (r * K + k) * 2
    xr = tl.load(x_ptr + offs, mask=bins, other=0.0)
    xi = tl.load(x_ptr + offs + 1, mask=bins, other=0.0)
    x = _mm(xr, tl.load(inv_cos_ptr + kc * EP + t)) + _mm(xi, tl.load(inv_sin_ptr + kc * EP + t))
    a = _pointwise(x, t < L, r % C, scale_ptr, shift_ptr, coef_ptr, slope, ACT, HAS_SCALE, HAS_SHIFT, DEGREE)
    tl.store(y_ptr + offs, _mm(a, tl.load(fwd_cos_ptr + tc * KP + k)), mask=bins)
    tl.store(y_ptr + offs + 1, _mm(a, tl.load(fwd_sin_ptr + tc * KP + k)), mask=bins)


@triton.jit
def _fused_2d_kernel(x_ptr, y_ptr, inv_cos_ptr, inv_sin_ptr, fwd_cos_ptr, fwd_sin_ptr, lead_cos_ptr, lead_sin_ptr,
                     scale_ptr, shift_ptr, coef_ptr, slope, C, P0, K1, L0, L1, E0,
                     P0P: tl.constexpr, K1P: tl.constexpr, E1P: tl.constexpr, BLOCK_T: tl.constexpr,
                     ACT: tl.constexpr, HAS_SCALE: tl.constexpr, HAS_SHIFT: tl.constexpr, DEGREE: tl.constexpr):
    """One ``(P0, K1)`` one-sided spectrum (interleaved real pairs) per program, its
    spatial rows evaluated ``BLOCK_T`` at a time: each block's share of the forward
    transform is added to the output, so only a block of the image is ever live."""
    row = tl.program_id(0)
    base = row.to(tl.int64) * P0 * K1 * 2
    k0 = tl.arange(0, P0P)[:, None]
    k0r = tl.arange(0, P0P)[None, :]
    k1 = tl.arange(0, K1P)[None, :]
    k1c = tl.arange(0, K1P)[:, None]
    t1 = tl.arange(0, E1P)[None, :]
    t1c = tl.arange(0, E1P)[:, None]
    tb = tl.arange(0, BLOCK_T)[:, None]
    tbr = tl.arange(0, BLOCK_T)[None, :]
    bins = (k0 < P0) & (k1 < K1)
    offs = base + (k0 * K1 + k1) * 2
    out_re = tl.full((P0P, K1P), 0.0, tl.float32)
    out_im = tl.full((P0P, K1P), 0.0, tl.float32)
    for t0 in range(0, E0, BLOCK_T):
        # The spectrum is read again for every block (from cache): keeping it live across
        # the loop would double the registers the block needs.
        xr = tl.load(x_ptr + offs, mask=bins, other=0.0)
        xi = tl.load(x_ptr + offs + 1, mask=bins, other=0.0)
        # Inverse: the leading axis' complex DFT (cos + i·sin) at this block's rows ...
        lc = tl.load(lead_cos_ptr + (t0 + tb) * P0P + k0r)  # (BLOCK_T, P0)
        ls = tl.load(lead_sin_ptr + (t0 + tb) * P0P + k0r)
        zr = _mm(lc, xr) - _mm(ls, xi)
        zi = _mm(ls, xr) + _mm(lc, xi)
        # ... then the last axis' real inverse of each row.
        x = _mm(zr, tl.load(inv_cos_ptr + k1c * E1P + t1)) + _mm(zi, tl.load(inv_sin_ptr + k1c * E1P + t1))
        a = _pointwise(x, (t0 + tb < L0) & (t1 < L1), row % C, scale_ptr, shift_ptr, coef_ptr, slope,
                       ACT, HAS_SCALE, HAS_SHIFT, DEGREE)
        # Forward: the last axis' real DFT of each row, then these rows' terms of the
        # leading axis' (cos − i·sin).
        br = _mm(a, tl.load(fwd_cos_ptr + t1c * K1P + k1))
        bi = _mm(a, tl.load(fwd_sin_ptr + t1c * K1P + k1))
        lct = tl.load(lead_cos_ptr + (t0 + tbr) * P0P + k0)  # (P0, BLOCK_T), transposed
        lst = tl.load(lead_sin_ptr + (t0 + tbr) * P0P + k0)
        out_re += _mm(lct, br) + _mm(lst, bi)
        out_im += _mm(lct, bi) - _mm(lst, br)
    tl.store(y_ptr + offs, out_re, mask=bins)
    tl.store(y_ptr + offs + 1, out_im, mask=bins)


def not_supported_reasons(x_hat: torch.Tensor, fft_size: list[int]) -> list[str]:
    """Why the fused kernels do not take this spectrum (empty when they do): they take
    complex64 on a 1D or 2D grid of at most :data:`MAX_FUSED_SIZE` per axis."""
    reasons = []
    if x_hat.dtype != torch.complex64:
        reasons.append(f"the spectrum is {x_hat.dtype}, not complex64")
    if len(fft_size) not in (1, 2):
        reasons.append(f"the grid is {len(fft_size)}D, not 1D or 2D")
    if not all(0 < p <= MAX_FUSED_SIZE for p in fft_size):
        reasons.append(f"grid {list(fft_size)}: the fused kernels take at most {MAX_FUSED_SIZE} per axis")
    return reasons


def _channel_vector(v: Optional[torch.Tensor], channels: int, like: torch.Tensor) -> torch.Tensor:
    """A per-channel (or one-element) vector as ``channels`` fp32 values on ``like``'s device."""
    if v is None:
        return like.new_empty(0, dtype=torch.float32)
    return v.reshape(-1).to(device=like.device, dtype=torch.float32).expand(channels).contiguous()


def _fused(x_hat: torch.Tensor, fft_size: list[int], size: list[int], eval_size: list[int],
           scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], act: int, slope: float,
           coeffs: Optional[torch.Tensor]) -> torch.Tensor:
    """Launch the 1D or 2D fused kernel; ``act`` is a map code, ``eval_size`` the spatial
    extent evaluated (the rest of the grid is zero before the forward transform)."""
    reasons = not_supported_reasons(x_hat, fft_size)
    if reasons:
        raise ValueError(f"the fused Triton activation does not take this spectrum: {'; '.join(reasons)}")
    rank = len(fft_size)
    bins = fourier.rfft_bins(fft_size)
    if list(x_hat.shape[x_hat.dim() - rank:]) != bins:
        raise ValueError(f"spectrum of shape {tuple(x_hat.shape)} does not end in the {bins} bins of grid {fft_size}")
    x = x_hat.resolve_conj().contiguous()
    y = torch.empty_like(x)
    rows = x.numel() // math.prod(bins)
    channels = x.shape[x.dim() - rank - 1] if x.dim() > rank else 1
    if rows == 0:
        return y
    mats = dft_matrices(tuple(fft_size), tuple(eval_size), str(x.device))
    degree = 0 if coeffs is None else coeffs.shape[1] - 1
    coef = (x.new_empty(0, dtype=torch.float32) if coeffs is None
            else coeffs.to(device=x.device, dtype=torch.float32).expand(channels, -1).contiguous())
    params = dict(ACT=act, HAS_SCALE=scale is not None, HAS_SHIFT=shift is not None, DEGREE=degree)
    common = (_channel_vector(scale, channels, x), _channel_vector(shift, channels, x), coef, float(slope))
    xr, yr = torch.view_as_real(x), torch.view_as_real(y)
    if rank == 1:
        _fused_1d_kernel[(triton.cdiv(rows, _ROWS_PER_PROGRAM),)](
            xr, yr, *mats[:4], *common, rows, channels, bins[0], size[0],
            KP=edge(bins[0]), EP=edge(eval_size[0]), BLOCK_R=_ROWS_PER_PROGRAM, **params)
    else:
        _fused_2d_kernel[(rows,)](
            xr, yr, *mats, *common, channels, fft_size[0], bins[1], size[0], size[1], eval_size[0],
            P0P=edge(fft_size[0]), K1P=edge(bins[1]), E1P=edge(eval_size[1]), BLOCK_T=MIN_EDGE,
            # past 16 per axis, 4 warps' registers cannot hold the tiles (ptxas spills, sm_90)
            num_warps=4 if max(fft_size) <= MIN_EDGE else 8, **params)
    return y


def spectral_activation(x_hat: torch.Tensor, fft_size: list[int], size: list[int], scale: Optional[torch.Tensor],
                        shift: Optional[torch.Tensor], activation: str, negative_slope: float) -> torch.Tensor:
    """``rfftn(pad(act(scale·crop(irfftn(x_hat)) + shift)))`` at ``fft_size``, as
    ``activation_ops.spectral_activation`` computes it."""
    if activation not in _CODES:
        raise ValueError(f"unknown activation {activation!r}; expected one of {ACTIVATIONS}")
    return _fused(x_hat, fft_size, size, size, scale, shift, _CODES[activation], negative_slope, None)


def poly_activation(x_hat: torch.Tensor, coeffs: torch.Tensor, fft_size: list[int], size: list[int],
                    scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mask_input: bool) -> torch.Tensor:
    """``Σ_j c_j·F{u^j}`` with ``u = scale·x' + shift·m`` and the constant term on the
    mask, as ``activation_ops.poly_activation`` computes it (``coeffs`` is
    ``(C or 1, degree + 1)``, lowest power first)."""
    if coeffs.dim() != 2:
        raise ValueError(f"coeffs must be (channels, degree + 1), got shape {tuple(coeffs.shape)}")
    eval_size = size if mask_input else fft_size
    return _fused(x_hat, fft_size, size, eval_size, scale, shift, POLY.value, 0.0, coeffs)
