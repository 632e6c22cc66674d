"""Direct vs FFT cost of one convolution: FLOPs, bytes, and estimated time.

Times are FLOPs (or bytes) over rates from a :class:`CostProfile`. The defaults were
measured on a 2-core x86 CPU with oneDNN (fp32, torch 2.13): dense direct convs run
near peak, depthwise convs in NCHW fall to a slow path at every kernel size (channels-last
ones keep a fast kernel), FFTs and complex GEMMs run at a fraction of peak.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

import torch

from .geometry import SpectralGeometry
from .gpu_costs import CUDA_PROFILE
# CostProfile, default_profile_path and MMAP_CEILING_BYTES are also read from here.
from .rates import (ACCUMULATE, DEFAULT_PROFILE, MMAP_CEILING_BYTES, CostProfile, choose_path,  # noqa: F401
                    default_profile_path)

# Kernels this small are what direct conv libraries are tuned for; policy="auto" lowers
# them only when the FFT is estimated to win by a wide margin (a 'valid' conv on a small
# map, where the grid is no larger than the map), never on a close call.
SMALL_DENSE_KERNEL = 7
SMALL_DENSE_MARGIN = 2.0


def profile_for_device(device: Union[str, torch.device]) -> CostProfile:
    """The rates for convs on ``device``: the GPU defaults of :mod:`specfx.gpu_costs` on
    CUDA, else this machine's CPU profile (calibrated, else the built-in defaults)."""
    if torch.device(device).type == "cuda":
        return CUDA_PROFILE
    return CostProfile.load()


def fresh_pages_ms(tensor_bytes: float, profile: CostProfile = DEFAULT_PROFILE) -> float:
    """Page-fault time of allocating and first writing a tensor of ``tensor_bytes``: zero
    below the mmap ceiling, ``fresh_page_ms_per_mib`` per MiB above it (0.45 ms/MiB on the
    2-core VM the defaults come from: a fresh 50 MB output costs as much as 700 MB of
    memory traffic)."""
    return tensor_bytes / (1 << 20) * profile.fresh_page_ms_per_mib if tensor_bytes > MMAP_CEILING_BYTES else 0.0


@dataclasses.dataclass(frozen=True)
class ConvShape:
    """The sizes that decide a conv's cost."""

    batch: int
    in_channels: int
    out_channels: int
    groups: int
    kernel_size: tuple[int, ...]
    out_size: tuple[int, ...]
    element_bytes: int
    channels_last: bool = False

    @property
    def depthwise(self) -> bool:
        return self.in_channels == self.groups

    @property
    def kernel_volume(self) -> int:
        return math.prod(self.kernel_size)


@dataclasses.dataclass(frozen=True)
class ConvCost:
    """Estimated cost of both paths for one conv."""

    direct_gflop: float
    fft_gflop: float
    direct_ms: float
    fft_ms: float
    fft_size: tuple[int, ...]
    measured_direct_ms: Optional[float] = None
    measured_fft_ms: Optional[float] = None
    block: Optional[int] = None

    @property
    def speedup(self) -> float:
        return self.direct_ms / self.fft_ms if self.fft_ms > 0 else math.inf

    def summary(self) -> str:
        text = (f"direct {self.direct_gflop:.3g} GFLOP ~{self.direct_ms:.3g} ms, "
                f"fft {self.fft_gflop:.3g} GFLOP ~{self.fft_ms:.3g} ms at {'x'.join(map(str, self.fft_size))}")
        if self.block is not None:
            text += f" in overlap-save blocks of {self.block}"
        if self.measured_direct_ms is not None:
            text += f"; measured direct {self.measured_direct_ms:.3g} ms, fft {self.measured_fft_ms:.3g} ms"
        return text


def _transform_flop(size: tuple[int, ...]) -> float:
    """Real FFT of a grid: about 2.5 N log2 N flops."""
    n = math.prod(size)
    return 2.5 * n * math.log2(max(n, 2))


def _direct_rate(shape: ConvShape, profile: CostProfile) -> float:
    volumetric = len(shape.kernel_size) == 3
    if not shape.depthwise:
        out_per_group = shape.out_channels // shape.groups
        peak = profile.dense_direct_3d_gflops if volumetric else profile.dense_direct_gflops
        return peak * min(1.0, out_per_group / profile.direct_channel_block)
    if volumetric:
        return profile.depthwise_3d_gflops
    if shape.channels_last:
        return profile.depthwise_channels_last_gflops
    if max(shape.kernel_size) <= profile.depthwise_fast_max_kernel:
        return profile.depthwise_fast_gflops
    return profile.depthwise_slow_gflops


def _mix_ms(shape: ConvShape, bins: int, profile: CostProfile) -> tuple[float, float]:
    """FLOPs and time of the channel contraction, on the path the op will take.

    Accumulate: one pass over the output spectrum per input channel of a group
    (memory-bound). GEMM: small per-frequency matrices run far below the GEMM's peak
    (efficiency ~ sqrt(m·k·n / 32768), from measured rates), the spectra are transposed
    in and out, and each weight spectrum is read once.
    """
    b, cin, cout, g = shape.batch, shape.in_channels, shape.out_channels, shape.groups
    cin_g, cout_g = cin // g, cout // g
    complex_bytes = 2 * max(shape.element_bytes, 4)
    flop = 8.0 * b * cin_g * cout * bins
    if choose_path(cin_g, b) == ACCUMULATE:
        passes = 2 * cin_g * b * cout * bins + b * cin * bins + cout * cin_g * bins
        return flop, passes * complex_bytes / profile.memory_gbps / 1e6
    efficiency = max(0.1, min(1.0, math.sqrt(b * cin_g * cout_g / 32768)))
    compute_ms = flop / (profile.complex_gemm_gflops * efficiency) / 1e6
    weight_ms = cout * cin_g * bins * complex_bytes / profile.memory_gbps / 1e6
    transpose_ms = 2 * b * (cin + cout) * bins * complex_bytes / profile.memory_gbps / 1e6
    return flop, max(compute_ms, weight_ms) + transpose_ms


def weight_spectrum_ms(shape: ConvShape, fft_size: tuple[int, ...], profile: CostProfile = DEFAULT_PROFILE) -> float:
    """Computing a conv's weight spectrum: every kernel placed on the grid and transformed."""
    rows = shape.out_channels * (shape.in_channels // shape.groups)
    eb = max(shape.element_bytes, 4)
    return (rows * _transform_flop(fft_size) / profile.fft_gflops / 1e6
            + rows * (math.prod(fft_size) + _grid_bins(fft_size) * 2) * eb / profile.memory_gbps / 1e6)


def estimate(shape: ConvShape, geometry: SpectralGeometry, profile: CostProfile = DEFAULT_PROFILE,
             weight_per_call: bool = False) -> ConvCost:
    """FLOPs and estimated milliseconds of the direct conv and of its FFT lowering. The
    weight spectrum is cached across calls, unless the weight is a new tensor on every
    call (``weight_per_call``: computed in the graph), when it is computed every call."""
    b, cin, cout, g = shape.batch, shape.in_channels, shape.out_channels, shape.groups
    out_points = math.prod(shape.out_size)
    direct_flop = 2.0 * b * cout * (cin // g) * shape.kernel_volume * out_points
    eb = max(shape.element_bytes, 4)
    direct_ms = direct_flop / _direct_rate(shape, profile) / 1e6 + fresh_pages_ms(b * cout * out_points * eb, profile)

    bins = math.prod(geometry.fft_size[:-1]) * (geometry.fft_size[-1] // 2 + 1)
    forward_flop = b * cin * _transform_flop(geometry.fft_size)
    inverse_flop = b * cout * _transform_flop(geometry.fft_size)
    transform_flop = forward_flop + inverse_flop
    mix_flop, mix_ms = _mix_ms(shape, bins, profile)
    transform_ms = (forward_flop / profile.fft_gflops + inverse_flop / profile.inverse_fft_gflops) / 1e6
    # Zero-padding the input onto the grid, and cropping the output off it (plus bias).
    copy_bytes = (b * cin * math.prod(geometry.fft_size) + 2 * b * cout * out_points) * eb
    if geometry.selection is not None:
        # Taking the samples the conv reads: the input read once, the selection written.
        copy_bytes += b * cin * (math.prod(geometry.selection.size) + math.prod(geometry.in_size)) * eb
    # The input spectrum and the output are fresh allocations of every call. The output
    # spectrum is never whole past the mmap ceiling: a merged conv makes it a block of
    # channels at a time there (ops.spectral_ops.WHOLE_SPECTRUM_BYTES).
    fresh_ms = sum(fresh_pages_ms(t, profile) for t in (b * cin * bins * 2 * eb, b * cout * out_points * eb))
    fft_ms = transform_ms + mix_ms + copy_bytes / profile.memory_gbps / 1e6 + fresh_ms + profile.conv_overhead_ms
    if weight_per_call:
        fft_ms += weight_spectrum_ms(shape, geometry.fft_size, profile)
    return ConvCost(direct_gflop=direct_flop / 1e9, fft_gflop=(transform_flop + mix_flop) / 1e9,
                    direct_ms=direct_ms, fft_ms=fft_ms, fft_size=geometry.fft_size)


# --- Spectral chains ----------------------------------------------------------------------
#
# The cost of the ops a fused chain runs (passes/find_chains.py), in milliseconds, from the
# same profile rates. "rows" is batch x channels of a tensor, ``grid`` the shared FFT size
# P (N = ∏P points, B = N/P_last·(P_last/2+1) one-sided bins), ``size`` the tensor's
# spatial size L, ``eb`` the real element size (≥ 4 bytes; complex = 2·eb):
#
#   forward transform   rows·2.5·N·log2 N / fft_gflops     + rows·N·eb / memory   + overhead
#   inverse transform   rows·2.5·N·log2 N / inverse_fft    + 2·rows·L·eb / memory + overhead
#                       (the copies are the zero-padded input and the cropped output)
#   spatial pointwise   passes·rows·L·eb / memory + overhead     (activation, affine, add)
#   spectral pointwise  passes·rows·B·2eb / memory + overhead    (spectral affine / add)
#   exact activation    inverse + forward transform + 3·rows·L·eb / memory, one overhead
#   poly activation     (degree − 1)·N·(6·rows·N·2eb / memory + 10 µs) + overhead: each
#                       power's ⊛ sums N shifted windows of the spectrum (a strided
#                       multiply-add per shift, measured); the input mask, when needed, is a complex
#                       GEMM rows x N x N (8·rows·N² flops / complex_gemm). O(N²) per row,
#                       against O(N log N) for an exact activation's transform pair
#   conv in the chain   the channel contraction of :func:`estimate` at the shared grid
#   direct conv         its FLOPs at the direct rate of :func:`estimate`
#
# A chain's cost is the sum over its ops in the domain each runs in, plus one transform
# per tensor crossing domains; the min-cut in find_chains minimizes exactly that sum.

def estimate_overlap_save(shape: ConvShape, geometry: SpectralGeometry,
                          profile: CostProfile = DEFAULT_PROFILE, weight_per_call: bool = False) -> ConvCost:
    """:func:`estimate` for a conv in overlap-save blocks (``geometry.overlap_save``): the
    FFT path of ``count`` times the batch on one block each, plus the copies that cut the
    input into windows and lay the blocks' outputs end to end."""
    blocks = geometry.overlap_save
    per_block = dataclasses.replace(shape, batch=shape.batch * blocks.count, out_size=(blocks.block,))
    cost = estimate(per_block, geometry, profile, weight_per_call)
    eb = max(shape.element_bytes, 4)
    copy_bytes = 2 * shape.batch * blocks.count * (shape.in_channels * blocks.window + shape.out_channels * blocks.block)
    fft_ms = cost.fft_ms + copy_bytes * eb / profile.memory_gbps / 1e6 + 2 * profile.per_op_overhead_ms
    return dataclasses.replace(estimate(shape, geometry, profile), fft_gflop=cost.fft_gflop, fft_ms=fft_ms,
                               block=blocks.block)


def _grid_bins(grid: tuple[int, ...]) -> int:
    return math.prod(grid[:-1]) * (grid[-1] // 2 + 1)


def forward_transform_ms(rows: int, grid: tuple[int, ...], element_bytes: int,
                         profile: CostProfile = DEFAULT_PROFILE) -> float:
    """``to_spectrum`` of ``rows`` signals onto ``grid`` (zero-padding copy included)."""
    eb = max(element_bytes, 4)
    return (rows * _transform_flop(grid) / profile.fft_gflops / 1e6
            + rows * math.prod(grid) * eb / profile.memory_gbps / 1e6 + profile.per_op_overhead_ms)


def inverse_transform_ms(rows: int, grid: tuple[int, ...], size: tuple[int, ...], element_bytes: int,
                         profile: CostProfile = DEFAULT_PROFILE) -> float:
    """``from_spectrum`` of ``rows`` spectra on ``grid``, cropped to ``size`` (+ bias)."""
    eb = max(element_bytes, 4)
    return (rows * _transform_flop(grid) / profile.inverse_fft_gflops / 1e6
            + 2 * rows * math.prod(size) * eb / profile.memory_gbps / 1e6 + profile.per_op_overhead_ms)


def spatial_pointwise_ms(rows: int, size: tuple[int, ...], element_bytes: int, passes: int = 2,
                         profile: CostProfile = DEFAULT_PROFILE) -> float:
    """An elementwise op on real tensors (``passes`` reads + writes of the tensor)."""
    return passes * rows * math.prod(size) * max(element_bytes, 4) / profile.memory_gbps / 1e6 \
        + profile.per_op_overhead_ms


def spectral_pointwise_ms(rows: int, grid: tuple[int, ...], element_bytes: int, passes: int = 2,
                          profile: CostProfile = DEFAULT_PROFILE) -> float:
    """An elementwise op on one-sided spectra."""
    return passes * rows * _grid_bins(grid) * 2 * max(element_bytes, 4) / profile.memory_gbps / 1e6 \
        + profile.per_op_overhead_ms


def exact_activation_ms(rows: int, grid: tuple[int, ...], size: tuple[int, ...], element_bytes: int,
                        profile: CostProfile = DEFAULT_PROFILE) -> float:
    """``spectral_activation``: inverse transform, mask, affine, activation, forward
    transform, in one op."""
    eb = max(element_bytes, 4)
    return (rows * _transform_flop(grid) * (1 / profile.fft_gflops + 1 / profile.inverse_fft_gflops) / 1e6
            + rows * (math.prod(grid) + 3 * math.prod(size)) * eb / profile.memory_gbps / 1e6
            + profile.per_op_overhead_ms)


def poly_activation_ms(rows: int, grid: tuple[int, ...], element_bytes: int, degree: int, mask_input: bool,
                       profile: CostProfile = DEFAULT_PROFILE) -> float:
    """``poly_activation``: one circular convolution of spectra per power ≥ 2, each a sum
    over the N shifts of the spectrum (one strided multiply-add per shift: ~6 passes'
    worth of memory traffic, measured, and ~10 µs of launch cost); the input mask is one
    complex GEMM with the mask's circulant (shared by all rows)."""
    n = math.prod(grid)
    complex_bytes = 2 * max(element_bytes, 4)
    per_shift = 6 * rows * n * complex_bytes / profile.memory_gbps / 1e6 + 0.01
    ms = max(degree - 1, 0) * n * per_shift + profile.per_op_overhead_ms
    if mask_input:
        ms += 8.0 * rows * n * n / profile.complex_gemm_gflops / 1e6
    return ms


def chain_mix_ms(shape: ConvShape, grid: tuple[int, ...], profile: CostProfile = DEFAULT_PROFILE) -> float:
    """A conv's channel contraction at the chain's grid (as :func:`estimate` costs it)."""
    return _mix_ms(shape, _grid_bins(grid), profile)[1] + profile.per_op_overhead_ms


def direct_conv_ms(shape: ConvShape, profile: CostProfile = DEFAULT_PROFILE) -> float:
    """A direct conv (as :func:`estimate` costs it)."""
    flop = 2.0 * shape.batch * shape.out_channels * (shape.in_channels // shape.groups) \
        * shape.kernel_volume * math.prod(shape.out_size)
    return flop / _direct_rate(shape, profile) / 1e6 + profile.per_op_overhead_ms


@dataclasses.dataclass(frozen=True)
class ChainCost:
    """Estimated milliseconds of one chain three ways: each conv lowered on its own (with
    the ops between them spatial), fused with exact spectral activations, and fused with
    polynomial activations where requested (``None`` when not)."""

    per_conv_ms: float
    fused_ms: float
    poly_ms: Optional[float] = None

    def summary(self) -> str:
        text = f"per-conv ~{self.per_conv_ms:.3g} ms, fused ~{self.fused_ms:.3g} ms"
        if self.poly_ms is not None:
            text += f", with poly activations ~{self.poly_ms:.3g} ms"
        return text
