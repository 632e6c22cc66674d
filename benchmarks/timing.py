"""Side-by-side timing and peak-memory measurement for the benchmarks.

Candidates are timed in interleaved rounds, so a burst of load on a shared machine hits
all of them alike, in an order that rotates from round to round; the figure kept is the
median over rounds. In a round each candidate runs a block of back-to-back calls lasting
about :data:`BLOCK_MS` (one call when a call takes longer): a sub-millisecond call is then
timed as it runs inside a model's loop, not cold after the previous candidate has evicted
its data from the caches, which on this project's 2-core machine added 0.1–0.3 ms to a
0.6 ms call depending on who ran before.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable

import torch

from specfx.measure import settle_allocator

BLOCK_MS = 25.0


def interleaved_medians(candidates: dict[str, Callable[[], object]], rounds: int,
                        warmup: int = 2) -> dict[str, float]:
    """Median milliseconds per call of each candidate, in the allocator state of a running
    model (see :func:`specfx.measure.settle_allocator`). The block of calls per round is
    sized from the last warm-up call (one call without warm-up)."""
    settle_allocator()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    calls = dict.fromkeys(candidates, 1)
    with torch.no_grad():
        for name, fn in candidates.items():
            for _ in range(warmup):
                start = time.perf_counter()
                fn()
                calls[name] = max(1, math.ceil(BLOCK_MS / ((time.perf_counter() - start) * 1e3)))
        names = list(candidates)
        for round_ in range(rounds):
            # The order rotates: what ran before a candidate (its allocations, what it left
            # in the caches) moved a 0.7 ms conv by 0.05–0.1 ms on this project's CPU, so
            # no candidate always follows the same one.
            start_at = round_ % len(names)
            for name in names[start_at:] + names[:start_at]:
                fn = candidates[name]
                start = time.perf_counter()
                for _ in range(calls[name]):
                    fn()
                times[name].append((time.perf_counter() - start) * 1e3 / calls[name])
    return {name: statistics.median(values) for name, values in times.items()}


_PEAK_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {bench_dir!r})
from suites import SUITES
from candidates import make_candidate
case = next(c for c in SUITES[{suite!r}](False) if c.label == {label!r})
module, x = case.build()
fn = make_candidate({candidate!r}, case, module, x)
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
with torch.no_grad():
    fn()  # warm-up: caches (weight spectra, plans) are not part of one call's peak
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak resident size (VmHWM) to the current one
    base = status_kib("VmRSS")
    fn()
    peak = status_kib("VmHWM")
print(json.dumps({{"extra_bytes": max(peak - base, 0) * 1024}}))
"""


def peak_extra_bytes(bench_dir: str, suite: str, label: str, candidate: str) -> int:
    """Peak memory one call of a candidate adds over what is resident before it (inputs,
    weights, cached weight spectra), measured in a fresh process: CPU tensors have no
    allocator statistics, but the kernel's peak resident size (VmHWM, reset through
    /proc/self/clear_refs) does."""
    return run_peak_script(_PEAK_SCRIPT.format(bench_dir=bench_dir, suite=suite, label=label, candidate=candidate))


def run_peak_script(script: str) -> int:
    """Run a peak-measuring script in a fresh process; it prints ``{"extra_bytes": n}`` last."""
    # A fixed mmap threshold makes glibc map every large block afresh and unmap it when
    # freed, so the resident size follows live memory instead of a reused heap.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])["extra_bytes"]
