"""Direct vs FFT cost of one convolution: FLOPs, bytes, and estimated time.

Times are FLOPs (or bytes) over rates from a :class:`CostProfile`. The defaults were
measured on a 2-core x86 CPU with oneDNN (fp32, torch 2.13): dense direct convs run
near peak, depthwise convs in NCHW fall to a slow path at every kernel size (channels-last
ones keep a fast kernel), FFTs and complex GEMMs run at a fraction of peak.
"""

from __future__ import annotations

import dataclasses
import math

from .geometry import SpectralGeometry

# Kernels this small are what direct conv libraries are tuned for; the FFT's fixed costs
# (two transforms, complex arithmetic) never pay back there.
SMALL_DENSE_KERNEL = 7


@dataclasses.dataclass(frozen=True)
class CostProfile:
    """Sustained rates of the kernels each path runs on, in GFLOP/s or GB/s."""

    dense_direct_gflops: float = 150.0
    depthwise_direct_gflops: float = 4.5
    depthwise_channels_last_gflops: float = 55.0
    fft_gflops: float = 25.0
    complex_gemm_gflops: float = 100.0
    memory_gbps: float = 20.0
    per_op_overhead_ms: float = 0.02


DEFAULT_PROFILE = CostProfile()


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

    @property
    def speedup(self) -> float:
        return self.direct_ms / self.fft_ms if self.fft_ms > 0 else math.inf

    def summary(self) -> str:
        return (f"direct {self.direct_gflop:.3g} GFLOP ~{self.direct_ms:.3g} ms, "
                f"fft {self.fft_gflop:.3g} GFLOP ~{self.fft_ms:.3g} ms at {'x'.join(map(str, self.fft_size))}")


def _transform_flop(size: tuple[int, ...]) -> float:
    """Real FFT of a grid: about 2.5 N log2 N flops."""
    n = math.prod(size)
    return 2.5 * n * math.log2(max(n, 2))


def estimate(shape: ConvShape, geometry: SpectralGeometry, profile: CostProfile = DEFAULT_PROFILE) -> ConvCost:
    """FLOPs and estimated milliseconds of the direct conv and of its FFT lowering
    (weight spectra excluded: they are cached across calls)."""
    b, cin, cout, g = shape.batch, shape.in_channels, shape.out_channels, shape.groups
    out_points = math.prod(shape.out_size)
    direct_flop = 2.0 * b * cout * (cin // g) * shape.kernel_volume * out_points
    if shape.depthwise:
        rate = profile.depthwise_channels_last_gflops if shape.channels_last else profile.depthwise_direct_gflops
    else:
        rate = profile.dense_direct_gflops
    direct_ms = direct_flop / rate / 1e6

    bins = math.prod(geometry.fft_size[:-1]) * (geometry.fft_size[-1] // 2 + 1)
    transform_flop = (b * cin + b * cout) * _transform_flop(geometry.fft_size)
    complex_bytes = 2 * max(shape.element_bytes, 4)
    if shape.depthwise:
        mix_flop = 6.0 * b * cout * bins
        mix_ms = (b * cin + cout + b * cout) * bins * complex_bytes / profile.memory_gbps / 1e6
    else:
        mix_flop = 8.0 * b * (cin // g) * cout * bins
        mix_ms = mix_flop / profile.complex_gemm_gflops / 1e6
    fft_ms = transform_flop / profile.fft_gflops / 1e6 + mix_ms + 3 * profile.per_op_overhead_ms
    return ConvCost(direct_gflop=direct_flop / 1e9, fft_gflop=(transform_flop + mix_flop) / 1e9,
                    direct_ms=direct_ms, fft_ms=fft_ms, fft_size=geometry.fft_size)
