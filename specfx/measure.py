"""``policy="measure"``: time the direct and the FFT path of each conv on its real shapes."""

from __future__ import annotations

import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .functional import apply_geometry
from .geometry import SpectralGeometry

PaddingPairs = list[tuple[int, int]]

# glibc serves allocations above its mmap threshold (128 KiB at start) with fresh pages,
# one page fault per 4 KiB on first touch, and raises the threshold to the size of such a
# block when it is freed (for blocks up to 32 MiB). A running model crosses that point in
# its first step; a timing taken before it charges a conv of a few MB ~3 ms of page faults
# (on a 2-core x86 CPU, 3x the time of a depthwise k9 conv on (2, 64, 64, 64)).
_SETTLING_BYTES = 31 << 20


def settle_allocator() -> None:
    """Put the CPU allocator in the state a running model sees, before timing anything:
    allocate and free one large block, as a model's first step does."""
    block = torch.empty(_SETTLING_BYTES, dtype=torch.uint8)
    block.fill_(0)
    del block


def direct_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: list[int],
                padding: PaddingPairs, dilation: list[int], groups: int, padding_mode: str) -> torch.Tensor:
    """The conv as ``nn.ConvNd`` computes it, from resolved ``(left, right)`` padding."""
    rank = weight.dim() - 2
    conv = (F.conv1d, F.conv2d, F.conv3d)[rank - 1]
    flat = [p for left, right in reversed(padding) for p in (left, right)]
    if padding_mode != "zeros":
        return conv(F.pad(x, flat, mode=padding_mode), weight, bias, stride, 0, dilation, groups)
    if all(left == right for left, right in padding):
        return conv(x, weight, bias, stride, [left for left, _ in padding], dilation, groups)
    return conv(F.pad(x, flat), weight, bias, stride, 0, dilation, groups)


def median_seconds(fn: Callable[[], object], repeats: int = 7, budget_s: Optional[float] = None) -> float:
    """Median of ``repeats`` timed calls after a warm-up call; with ``budget_s``, fewer
    (at least one) where the warm-up shows that many would take longer."""
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    if budget_s is not None:
        repeats = max(1, min(repeats, int(budget_s / max(first, 1e-6))))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_conv(input_shape: tuple[int, ...], dtype: torch.dtype, weight: torch.Tensor,
                 bias: Optional[torch.Tensor], stride: list[int], padding: PaddingPairs,
                 dilation: list[int], groups: int, padding_mode: str, geometry: SpectralGeometry,
                 budget_s: float = 0.5) -> tuple[float, float]:
    """Median milliseconds of the direct conv and of its FFT lowering, on a random input of
    the conv's real shape with its real weight (weight spectrum cached, as in inference)."""
    settle_allocator()
    x = torch.randn(input_shape, dtype=dtype, device=weight.device)
    w = weight.detach()
    b = None if bias is None else bias.detach()
    with torch.no_grad():
        direct = median_seconds(lambda: direct_conv(x, w, b, stride, padding, dilation, groups, padding_mode),
                                budget_s=budget_s)
        fft = median_seconds(lambda: apply_geometry(x, w, b, geometry, groups), budget_s=budget_s)
    return direct * 1e3, fft * 1e3


class Progress:
    """A one-line progress bar on stderr, shown only once the work has taken a moment."""

    DEFAULT_DELAY_S = 1.0

    def __init__(self, total: int, label: str, delay_s: Optional[float] = None) -> None:
        self.total, self.label = total, label
        self.delay_s = self.DEFAULT_DELAY_S if delay_s is None else delay_s
        self.start = time.perf_counter()
        self.shown = False

    def update(self, done: int, item: str) -> None:
        if time.perf_counter() - self.start < self.delay_s and not self.shown:
            return
        self.shown = True
        width = 24
        filled = width * done // max(self.total, 1)
        sys.stderr.write(f"\r{self.label} [{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {item[:40]:<40}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.shown:
            sys.stderr.write("\n")
            sys.stderr.flush()
