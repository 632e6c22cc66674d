"""Quickstart: optimize a large-kernel CNN with specfx, check it, and time it.

Run:  python examples/quickstart.py
"""

from __future__ import annotations

import statistics
import time

import torch
import torch.nn as nn

import specfx
from specfx.measure import settle_allocator


class LargeKernelBlock(nn.Module):
    """A RepLKNet-style block: 31x31 depthwise conv between 1x1 convs, with a residual."""

    def __init__(self, channels: int, kernel_size: int = 31) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.expand = nn.Conv2d(channels, channels, 1)
        self.large = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(torch.relu(self.large(self.expand(self.norm(x)))))


class LargeKernelNet(nn.Module):
    def __init__(self, channels: int = 64, blocks: int = 2, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[LargeKernelBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(torch.relu(self.stem(x)))
        return self.head(x.mean(dim=(-2, -1)))


def median_ms(fn, *args, repeats: int = 7) -> float:
    """Median wall time of ``fn(*args)`` in milliseconds, after one warm-up call."""
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    model = LargeKernelNet().eval()
    x = torch.randn(4, 3, 64, 64)

    fast = specfx.optimize(model, (x,))  # policy="auto": the cost model decides per conv
    print(fast.specfx_report)

    with torch.no_grad():
        expected, actual = model(x), fast(x)
    error = ((actual - expected).abs().max() / expected.abs().max()).item()
    print(f"\nmax |optimized - original| / max |original| = {error:.2e}")
    assert error < 1e-4, "optimized output differs from the original"

    # Time both in the allocator state a long-running model reaches (without it, the first
    # calls of either pay page faults for every freshly mapped block of a few MB).
    settle_allocator()
    with torch.no_grad():
        eager, optimized = median_ms(model, x), median_ms(fast, x)
    print(f"eager {eager:.1f} ms, specfx {optimized:.1f} ms (median of 7): {eager / optimized:.1f}x")


if __name__ == "__main__":
    main()
