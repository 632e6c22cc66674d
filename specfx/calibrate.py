"""Measure this machine's rates for the cost model and save them as a profile.

    python -m specfx.calibrate            # writes ~/.cache/specfx/profile.json
    python -m specfx.calibrate --out PATH

``specfx.optimize`` reads the profile from ``$SPECFX_PROFILE`` or the default path when
no ``profile=`` is given, and falls back to the built-in defaults when there is none.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import torch
import torch.nn.functional as F

from . import ops
from .rates import CostProfile, default_profile_path
from .measure import median_seconds, settle_allocator


def _conv_gflops(x: torch.Tensor, w: torch.Tensor, groups: int) -> float:
    """The rate of a stride-1 'same' conv (2D or 3D, from the weight's rank)."""
    k = w.shape[-1]
    conv = F.conv3d if w.dim() == 5 else F.conv2d
    seconds = median_seconds(lambda: conv(x, w, padding=k // 2, groups=groups))
    flop = 2.0 * x.shape[0] * w.shape[0] * w[0].numel() * x[0, 0].numel()
    return flop / seconds / 1e9


def _depthwise_cliff(rates: dict[int, float]) -> tuple[int, float, float]:
    """The largest kernel still on the fast depthwise kernel (the first of the larger
    sizes whose rate falls below a third of the small kernels' best marks the cliff), and
    the fast and slow rates. The fast rate is the best one: the smallest kernels do too
    little work per pixel to reach it, and they stay direct anyway. With no cliff in
    range, every size counts as fast."""
    sizes = sorted(rates)
    best = max(rates[k] for k in sizes[:3])
    cliff = next((k for k in sizes[3:] if rates[k] < best / 3), None)
    fast_sizes = [k for k in sizes if cliff is None or k < cliff]
    slow_sizes = [k for k in sizes if k not in fast_sizes]
    fast = max(rates[k] for k in fast_sizes)
    slow = statistics.median(rates[k] for k in slow_sizes) if slow_sizes else fast
    return (fast_sizes[-1] if slow_sizes else 10**6), fast, slow


def measure_profile() -> CostProfile:
    """Time the kernels each path runs on, at sizes typical of the convs specfx lowers."""
    settle_allocator()
    with torch.no_grad():
        dense = _conv_gflops(torch.randn(8, 64, 32, 32), torch.randn(64, 64, 5, 5), 1)
        # Few output channels leave the direct kernel's channel blocks part idle.
        narrow = _conv_gflops(torch.randn(8, 8, 64, 64), torch.randn(8, 8, 5, 5), 1)
        channel_block = max(8, round(8 * dense / narrow))
        dw_input = torch.randn(2, 64, 64, 64)
        dw_rates = {k: _conv_gflops(dw_input, torch.randn(64, 1, k, k), 64) for k in range(3, 18, 2)}
        fast_max_kernel, fast, slow = _depthwise_cliff(dw_rates)
        depthwise_cl = _conv_gflops(dw_input.to(memory_format=torch.channels_last), torch.randn(64, 1, 15, 15), 64)
        # 3D: a UNet-style dense conv and MedNeXt's depthwise block.
        volume = torch.randn(1, 16, 32, 32, 32)
        dense_3d = _conv_gflops(volume, torch.randn(16, 16, 5, 5, 5), 1)
        depthwise_3d = _conv_gflops(volume, torch.randn(16, 1, 7, 7, 7), 16)

        # Maps zero-padded to the grid, as lowered convs transform them.
        grid = torch.randn(128, 48, 48)
        spectrum = torch.fft.rfftn(grid, s=(64, 64), dim=(-2, -1))
        transform_flop = 128 * 2.5 * 64 * 64 * 12
        fft = transform_flop / median_seconds(lambda: torch.fft.rfftn(grid, s=(64, 64), dim=(-2, -1))) / 1e9
        inverse_fft = transform_flop / median_seconds(lambda: torch.fft.irfftn(spectrum, s=(64, 64), dim=(-2, -1))) / 1e9

        a = torch.randn(2048, 8, 64, dtype=torch.complex64)
        b = torch.randn(2048, 64, 64, dtype=torch.complex64)
        gemm = 8.0 * 2048 * 8 * 64 * 64 / median_seconds(lambda: torch.matmul(a, b)) / 1e9

        u = torch.randn(4, 64, 64 * 33, dtype=torch.complex64)
        v = torch.randn(64, 64 * 33, dtype=torch.complex64)
        bandwidth = 2 * u.numel() * 8 / median_seconds(lambda: u * v) / 1e9

        tiny, tiny_kernel, tiny_bias = torch.randn(1, 1, 8), torch.randn(1, 1, 3), torch.randn(1)
        overhead_ms = median_seconds(lambda: ops.to_spectrum(tiny, [8], [8]), repeats=51) * 1e3
        conv_overhead_ms = median_seconds(lambda: ops.lowered_conv(tiny, tiny_kernel, tiny_bias, [8], [8], [1], [0], 1,
                                                              [6], [1], torch.float32), repeats=51) * 1e3

        # A block above the mmap ceiling, written fresh vs written again.
        mib = 64
        reused = torch.empty(mib << 20, dtype=torch.uint8)
        fresh_s = median_seconds(lambda: torch.empty(mib << 20, dtype=torch.uint8).fill_(0))
        fresh_page = max(0.0, fresh_s - median_seconds(lambda: reused.fill_(0))) * 1e3 / mib
    return CostProfile(dense_direct_gflops=dense, direct_channel_block=channel_block, depthwise_fast_gflops=fast,
                       depthwise_fast_max_kernel=fast_max_kernel, depthwise_slow_gflops=slow,
                       depthwise_channels_last_gflops=depthwise_cl, dense_direct_3d_gflops=dense_3d,
                       depthwise_3d_gflops=depthwise_3d, fft_gflops=fft, inverse_fft_gflops=inverse_fft,
                       complex_gemm_gflops=gemm, memory_gbps=bandwidth, per_op_overhead_ms=overhead_ms,
                       conv_overhead_ms=conv_overhead_ms,
                       fresh_page_ms_per_mib=fresh_page)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m specfx.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help=f"where to write the profile (default {default_profile_path()})")
    args = parser.parse_args(argv)
    print(f"calibrating on {torch.get_num_threads()} threads ...", file=sys.stderr)
    profile = measure_profile()
    path = profile.save(args.out)
    for field in dataclasses.fields(profile):
        print(f"  {field.name} = {getattr(profile, field.name):.4g}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
