"""Triton kernels of the channel contraction ``Y[n, g, o, f] = Σ_c X[n, g, c, f]·W[g, o, c, f]``.

Complex spectra are read and written as interleaved real pairs (``torch.view_as_real``),
and every product is done in real arithmetic with fp32 accumulation:

- ``gemm``: one complex GEMM per frequency (batch as M, output channels as N, input
  channels as K), run as four real ``tl.dot``s on ``(frequencies, M, K) x (frequencies,
  K, N)`` tiles: a block of neighbouring frequencies is one batched product, so each
  load reads runs of consecutive frequencies (the contiguous axis of the spectra).
  The four-product form keeps each output's rounding that of an fp32 complex product;
  the three-product (Gauss) form saves a dot but cancels in the imaginary part.
- ``elementwise``: one program element per output ``(n, g, o, f)``, looping over the
  group's input channels: depthwise convs (one input channel per group) are a single
  product, and small groups would leave most of a dot tile empty.

``precision`` trades exactness for tensor-core speed on the GEMM path only: ``"fp32"``
(IEEE fp32 products, the default), ``"tf32"`` or ``"bf16"`` (operands rounded, fp32
accumulation). :func:`fast_path_error` measures what the fast modes cost on real inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .. import contraction

# The kernels use triton.language builtins only, none of the @triton.jit helpers of its
# standard library (tl.cdiv, tl.zeros, ...): those are compiled or interpreted when
# triton is imported, which may come before TRITON_INTERPRET=1 is set for these kernels.

PRECISIONS = ("fp32", "tf32", "bf16")
# tl.dot's input_precision per mode (bf16 operands take the default tensor-core product).
_DOT_PRECISION = {"fp32": "ieee", "tf32": "tf32", "bf16": None}
KERNELS = ("gemm", "elementwise")

# The GEMM path needs full dot tiles (every tile dimension at least 16) to pay.
_MIN_DOT = 16
# Output elements per program of the elementwise kernel (few registers per thread, so
# many programs in flight to stream memory), and outputs (frequencies x M x N) per program
# of the GEMM kernel (its fp32 FMA dots nearly fill the registers at 4 warps per 2048).
_ELEMENTWISE_BLOCK = 256
_GEMM_TILE = 2048


@triton.jit
def _mix_gemm_kernel(x_ptr, w_ptr, y_ptr, N, G, C, O, F,
                     sw_g, sw_o, sw_c, sw_f,
                     BLOCK_F: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_PRECISION: tl.constexpr, BF16: tl.constexpr):
    """Pointers are to the real views; ``sw_*`` are the weight's strides in floats.
    ``DOT_PRECISION`` is ``tl.dot``'s ``input_precision`` for fp32 operands; ``BF16``
    rounds the operands to bf16 first."""
    pid_f = tl.program_id(0)
    pid_mn = tl.program_id(1)
    g = tl.program_id(2).to(tl.int64)
    tiles_n = (O + BLOCK_N - 1) // BLOCK_N
    pid_m = pid_mn // tiles_n
    pid_n = pid_mn % tiles_n

    f = pid_f * BLOCK_F + tl.arange(0, BLOCK_F)
    n = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    o = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    f3 = f[:, None, None]
    n3 = n[None, :, None].to(tl.int64)
    o3 = o[None, None, :]
    in_f = f3 < F
    # complex values move as (real, imaginary) pairs along a trailing axis of 2
    part = tl.arange(0, 2)[None, None, None, :]

    acc_re = tl.full((BLOCK_F, BLOCK_M, BLOCK_N), 0.0, tl.float32)
    acc_im = tl.full((BLOCK_F, BLOCK_M, BLOCK_N), 0.0, tl.float32)
    for k0 in range(0, C, BLOCK_K):
        c_x = (k0 + ks)[None, None, :]
        x_off = ((((n3 * G + g) * C + c_x) * F + f3) * 2)[:, :, :, None] + part
        x_mask = (in_f & (n3 < N) & (c_x < C))[:, :, :, None]
        xr, xi = tl.split(tl.load(x_ptr + x_off, mask=x_mask, other=0.0))
        c_w = (k0 + ks)[None, :, None]
        w_off = (g * sw_g + o3 * sw_o + c_w * sw_c + f3 * sw_f)[:, :, :, None] + part
        w_mask = (in_f & (c_w < C) & (o3 < O))[:, :, :, None]
        wr, wi = tl.split(tl.load(w_ptr + w_off, mask=w_mask, other=0.0))
        if BF16:
            xr, xi, wr, wi = xr.to(tl.bfloat16), xi.to(tl.bfloat16), wr.to(tl.bfloat16), wi.to(tl.bfloat16)
        acc_re = tl.dot(xr, wr, acc_re, input_precision=DOT_PRECISION)
        acc_re = tl.dot(-xi, wi, acc_re, input_precision=DOT_PRECISION)
        acc_im = tl.dot(xr, wi, acc_im, input_precision=DOT_PRECISION)
        acc_im = tl.dot(xi, wr, acc_im, input_precision=DOT_PRECISION)

    y_off = ((((n3 * G + g) * O + o3) * F + f3) * 2)[:, :, :, None] + part
    y_mask = (in_f & (n3 < N) & (o3 < O))[:, :, :, None]
    tl.store(y_ptr + y_off, tl.join(acc_re, acc_im), mask=y_mask)


@triton.jit
def _mix_elementwise_kernel(x_ptr, w_ptr, y_ptr, total, G, C, O, F,
                            sw_g, sw_o, sw_c, sw_f, BLOCK: tl.constexpr):
    """One output ``(n, g, o, f)`` per element, in the order of the contiguous output.
    Each complex value moves as one (real, imaginary) pair: one 8-byte access per element
    instead of two strided 4-byte ones."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    valid = (idx < total)[:, None]
    f = idx % F
    rest = idx // F
    o = rest % O
    rest = rest // O
    g = rest % G
    n = rest // G
    part = tl.arange(0, 2)[None, :]
    x_off = (((n * G + g) * C * F + f) * 2)[:, None] + part
    w_off = (g * sw_g + o * sw_o + f * sw_f)[:, None] + part
    acc_re = tl.full((BLOCK,), 0.0, tl.float32)
    acc_im = tl.full((BLOCK,), 0.0, tl.float32)
    for c in range(C):
        xr, xi = tl.split(tl.load(x_ptr + x_off + c * F * 2, mask=valid, other=0.0))
        wr, wi = tl.split(tl.load(w_ptr + w_off + c * sw_c, mask=valid, other=0.0))
        acc_re += xr * wr - xi * wi
        acc_im += xr * wi + xi * wr
    tl.store(y_ptr + idx[:, None] * 2 + part, tl.join(acc_re, acc_im), mask=valid)


def _tile(n: int, cap: int) -> int:
    """A power-of-two tile edge for ``n``, between a dot's minimum and ``cap``."""
    return min(cap, max(_MIN_DOT, triton.next_power_of_2(n)))


def choose_kernel(in_per_group: int, out_per_group: int) -> str:
    """``gemm`` when a group's contraction fills dot tiles, else ``elementwise``."""
    return "gemm" if min(in_per_group, out_per_group) >= _MIN_DOT else "elementwise"


def _check(x_hat: torch.Tensor, w: torch.Tensor, groups: int, precision: str, kernel: Optional[str]) -> None:
    if x_hat.dtype != torch.complex64 or w.dtype != torch.complex64:
        raise TypeError(f"the Triton spectral_mix takes complex64 spectra, got {x_hat.dtype} and {w.dtype}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if kernel is not None and kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if precision == "bf16" and x_hat.device.type == "cpu":
        raise ValueError("precision='bf16' needs CUDA tensors: Triton's CPU interpreter has no bf16 matrix products")
    if w.dim() != 4 or w.shape[0] != groups:
        raise ValueError(f"the weight spectrum must be laid out (groups, C_out/g, C_in/g, F) with groups={groups}, "
                         f"got shape {tuple(w.shape)}")


def spectral_mix(x_hat: torch.Tensor, w: torch.Tensor, groups: int, spectral_rank: int,
                 precision: str = "fp32", kernel: Optional[str] = None) -> torch.Tensor:
    """``Y[n, o, f] = Σ_c X[n, c, f]·W[o, c, f]`` within each group, as
    :func:`specfx.ops.contraction.mix` computes it.

    ``x_hat`` is ``(*batch, C_in, *bins)``; ``w`` the weight spectrum viewed as
    ``(groups, C_out/g, C_in/g, F)`` with any strides (:func:`contraction.group_view` of a
    cached layout). Returns ``(*batch, C_out, *bins)``, contiguous complex64. ``kernel``
    forces one of :data:`KERNELS` (default: :func:`choose_kernel`).
    """
    _check(x_hat, w, groups, precision, kernel)
    x = contraction.flatten_groups(x_hat.resolve_conj().contiguous(), groups, spectral_rank)
    w = w.resolve_conj()
    n, _, c, freqs = x.shape
    _, o, c_w, f_w = w.shape
    if (c_w, f_w) != (c, freqs):
        raise ValueError(f"weight spectrum {tuple(w.shape)} does not match the input's {c} channels per group "
                         f"and {freqs} frequencies")
    batch = x_hat.shape[: x_hat.dim() - spectral_rank - 1]
    y = torch.empty((*batch, groups * o, *x_hat.shape[x_hat.dim() - spectral_rank:]),
                    dtype=torch.complex64, device=x_hat.device)
    xr, wr, yr = torch.view_as_real(x), torch.view_as_real(w), torch.view_as_real(y)
    sw = [wr.stride(d) for d in range(4)]
    if (kernel or choose_kernel(c, o)) == "elementwise":
        total = n * groups * o * freqs
        if total:
            _mix_elementwise_kernel[(triton.cdiv(total, _ELEMENTWISE_BLOCK),)](
                xr, wr, yr, total, groups, c, o, freqs, *sw, BLOCK=_ELEMENTWISE_BLOCK)
        return y
    block_m, block_n = _tile(n, 64), _tile(o, 64)
    block_f = max(1, _GEMM_TILE // (block_m * block_n))
    grid = (triton.cdiv(freqs, block_f), triton.cdiv(n, block_m) * triton.cdiv(o, block_n), groups)
    if n * freqs:
        _mix_gemm_kernel[grid](xr, wr, yr, n, groups, c, o, freqs, *sw,
                               BLOCK_F=block_f, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=_MIN_DOT,
                               DOT_PRECISION=_DOT_PRECISION[precision], BF16=precision == "bf16",
                               num_warps=4 * max(1, block_f * block_m * block_n // _GEMM_TILE))
    return y


def fast_path_error(x_hat: torch.Tensor, w: torch.Tensor, groups: int, spectral_rank: int,
                    precision: str) -> float:
    """Measured error of a reduced-``precision`` contraction on these inputs:
    ``max |Y_precision − Y_fp32| / max |Y_fp32|`` (0 when the exact output is all zero)."""
    exact = spectral_mix(x_hat, w, groups, spectral_rank, "fp32", kernel="gemm")
    fast = spectral_mix(x_hat, w, groups, spectral_rank, precision, kernel="gemm")
    scale = exact.abs().max().item() if exact.numel() else 0.0
    return (fast - exact).abs().max().item() / scale if scale > 0 else 0.0
