"""Timing at optimize time: two ways to run an op, side by side, and a progress bar."""

from __future__ import annotations

import math
import statistics
import sys
import time
from typing import Callable, Optional

import torch
import torch.nn.functional as F

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


def median_seconds(fn: Callable[[], object], repeats: int = 7) -> float:
    """Median of ``repeats`` timed calls after a warm-up call (calibration's rates)."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# Side-by-side timing, as the benchmarks do it (benchmarks/timing.py) but sized for
# optimize time: blocks of back-to-back calls of about BLOCK_MS, alternating between the
# two ways in an order that rotates each round, medians over the rounds. A difference of
# CLEAR_RATIO after the warm-up calls needs no rounds; rounds stop after MIN_ROUNDS once
# the medians differ by SETTLED_RATIO, else at MAX_ROUNDS or when the budget is spent.
BLOCK_MS = 4.0
MIN_ROUNDS, MAX_ROUNDS = 3, 7
CLEAR_RATIO, SETTLED_RATIO = 3.0, 1.3
# A first call shorter than this may be mostly one-time set-up (oneDNN builds a conv's
# primitive on its first call: ~1 ms), so it is called again before it is compared.
SETUP_DOMINATED_MS = 20.0


def compare(baseline: Callable[[], object], candidate: Callable[[], object], budget_s: float,
            sync: Optional[Callable[[], None]] = None) -> tuple[float, float]:
    """Median milliseconds of ``baseline`` and ``candidate``, timed side by side in the
    allocator state of a running model (:func:`settle_allocator`), without autograd.
    ``candidate`` is called first: its first call may fill caches (a weight spectrum) that
    every later call reuses. ``sync`` (a device synchronization) ends every timed block.
    Spends about ``budget_s`` at most beyond the warm-up calls."""
    settle_allocator()
    deadline = time.perf_counter() + budget_s

    def timed(fn: Callable[[], object], calls: int = 1) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        if sync is not None:
            sync()
        return (time.perf_counter() - start) * 1e3 / calls

    with torch.no_grad():
        timed(candidate)
        candidate_ms = timed(candidate)
        baseline_ms = timed(baseline)
        if baseline_ms < SETUP_DOMINATED_MS:
            baseline_ms = timed(baseline)
        if max(baseline_ms, candidate_ms) >= CLEAR_RATIO * min(baseline_ms, candidate_ms):
            return baseline_ms, candidate_ms
        fns = {"baseline": baseline, "candidate": candidate}
        calls = {"baseline": max(1, math.ceil(BLOCK_MS / max(baseline_ms, 1e-3))),
                 "candidate": max(1, math.ceil(BLOCK_MS / max(candidate_ms, 1e-3)))}
        times: dict[str, list[float]] = {"baseline": [], "candidate": []}
        for round_ in range(MAX_ROUNDS):
            for name in (("baseline", "candidate") if round_ % 2 == 0 else ("candidate", "baseline")):
                times[name].append(timed(fns[name], calls[name]))
            b, c = statistics.median(times["baseline"]), statistics.median(times["candidate"])
            settled = round_ + 1 >= MIN_ROUNDS and max(b, c) >= SETTLED_RATIO * min(b, c)
            if settled or time.perf_counter() > deadline:
                break
    return b, c


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
