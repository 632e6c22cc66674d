"""Close calls: the decisions ``policy="auto"`` times instead of trusting its estimate.

The cost model's rates are one machine's. Where its estimated speed-up of the lowered
conv (or fused chain) over the direct conv (or per-conv lowering) falls inside a band
around 1, the estimate is not trusted: both ways are timed on the op's real shapes
(:func:`specfx.measure.compare`), as cuDNN's benchmark mode does, and the faster one is
kept. The bands are wide where a rate is known to vary from machine to machine by more
than the estimate's usual error:

- depthwise convs: oneDNN's fast depthwise kernel covers kernels up to 9 on one x86 CPU
  and beyond 13 on another, 15-60x faster than its slow path (the built-in profile put
  depthwise 11x11 and 13x13 on the slow path; measured 0.4x lowered on a machine whose
  fast path reaches them);
- 3D convs: direct 3D kernels and 3D transforms run at rates of their own (MedNeXt's
  depthwise 7x7x7 was estimated 1.6x faster lowered, measured 0.45x).

Timings are kept on disk per machine (:mod:`specfx.timing_cache`), so a second optimize
of the same model times nothing; one taken while other processes keep every core busy
(:data:`BUSY_WAIT`) decides its run but is not kept. Timing is bounded by ``Settings.measure_budget_s`` per
optimize (2 s by default): past it, close calls are decided by the estimate and the
report says which; the next optimize times them (the timed ones are cached).
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Callable, Optional, Union

import torch

from . import measure
from .cost_model import ConvShape
from .timing_cache import Timing, TimingCache, default_directory, machine_signature

GENERIC_BAND = (1 / 3, 3.0)
MACHINE_SPECIFIC_BAND = (1 / 3, 100.0)
CHAIN_BAND = (1 / 3, 3.0)
DEFAULT_BUDGET_S = 2.0

# Read through the module (not imported by name) so that tests can inject a clock.
clock: Callable[[], float] = time.perf_counter


def run_delay_s() -> Optional[float]:
    """Seconds this process's threads have spent ready to run but waiting for a core
    (Linux's per-thread schedstat); ``None`` where the platform does not tell."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return None
    total = 0
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/schedstat") as f:
                total += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended meanwhile
    return total / 1e9


# A timing during which this process's threads waited for a core, in total, more than
# this fraction of the time it took was taken on a machine other processes kept busy: it
# can rank the two ways wrongly (on a 2-core CPU under a second job, a lowered depthwise
# conv timed 0.47 ms quiet measured 76 ms). It decides its run, but is not kept. (The
# load average cannot tell: it counts this process's own threads.)
BUSY_WAIT = 0.25

Candidates = tuple[Callable[[], object], Callable[[], object]]


def conv_band(shape: ConvShape) -> tuple[float, float]:
    """The estimated speed-ups (direct time over lowered time) too close to call for a
    conv of ``shape``."""
    if (shape.depthwise and not shape.channels_last) or len(shape.kernel_size) == 3:
        return MACHINE_SPECIFIC_BAND
    return GENERIC_BAND


def is_close(speedup: float, band: tuple[float, float]) -> bool:
    return band[0] < speedup < band[1]


class Measurements:
    """The close calls timed (or found in the timing cache) during one optimize, within
    ``budget_s`` seconds of timing. ``directory=None``: the timing cache's default
    directory (:func:`specfx.timing_cache.default_directory`)."""

    def __init__(self, budget_s: float, directory: Optional[Union[str, Path]] = None) -> None:
        self.budget_s = budget_s
        self.directory = default_directory() if directory is None else Path(directory)
        self.spent_s = 0.0
        self.timed: list[str] = []
        self.cached: list[str] = []
        self.untimed: list[str] = []
        # Of each timing not kept (taken on a busy machine): its threads' wait over its time.
        self.busy_waits: list[float] = []
        self._caches: dict[str, TimingCache] = {}

    def cache_for(self, device: Union[str, torch.device]) -> TimingCache:
        signature = machine_signature(device)
        name = str(torch.device(device))
        if name not in self._caches:
            self._caches[name] = TimingCache(self.directory, signature)
        return self._caches[name]

    def timing(self, key: str, label: str, device: Union[str, torch.device], make: Callable[[], Candidates],
               estimated_ms: float = 0.0, unlimited: bool = False) -> Optional[tuple[Timing, str]]:
        """The timing of ``key`` and where it came from (``"timed"`` or ``"cached"``), or
        ``None`` when the budget is spent, or would be by the warm-up calls alone by the
        estimates (``estimated_ms``: both ways, one call each; ``unlimited``:
        ``policy="measure"``, which times every conv). ``make`` builds the two callables,
        baseline first."""
        cache = self.cache_for(device)
        found = cache.get(key)
        if found is not None:
            self.cached.append(label)
            return found, "cached"
        remaining = math.inf if unlimited else self.budget_s - self.spent_s
        # Two warm-up calls of each way come before any round (measure.compare).
        if remaining <= 0 or 2 * estimated_ms / 1e3 > remaining:
            self.untimed.append(label)
            return None
        start = clock()
        baseline, candidate = make()
        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else None
        waited_before = run_delay_s()
        compare_start = clock()
        baseline_ms, candidate_ms = measure.compare(baseline, candidate, remaining, sync)
        elapsed = clock() - compare_start
        waited_after = run_delay_s()
        self.spent_s += clock() - start
        timing = Timing(baseline_ms, candidate_ms)
        waited = None if waited_before is None or waited_after is None else waited_after - waited_before
        if waited is not None and waited > BUSY_WAIT * max(elapsed, 1e-9):
            self.busy_waits.append(waited / max(elapsed, 1e-9))
        else:
            cache.put(key, timing)
        self.timed.append(label)
        return timing, "timed"

    def notes(self) -> list[str]:
        """What the report says about the timing done."""
        notes = []
        if self.timed:
            notes.append(f"timed {len(self.timed)} close call(s) in {self.spent_s:.2f} s: {', '.join(self.timed)}")
        if self.cached:
            notes.append(f"{len(self.cached)} close call(s) from the timing cache: {', '.join(self.cached)}")
        if self.untimed:
            notes.append(f"{len(self.untimed)} close call(s) decided by the estimate, the timing budget "
                         f"({self.budget_s:g} s) being spent: {', '.join(self.untimed)} "
                         "(a later optimize times them)")
        if self.busy_waits:
            notes.append(f"{len(self.busy_waits)} timing(s) not kept in the timing cache: taken on a busy machine "
                         f"(threads waiting for a core up to {max(self.busy_waits):.2g}x the time taken); a later "
                         "optimize times them again")
        paths = sorted({str(c.path) for c in self._caches.values() if c.path is not None})
        if self.timed or self.cached:
            notes.append(f"timing cache: {', '.join(paths) or 'in memory'}")
        notes += [c.write_error for c in self._caches.values() if c.write_error]
        return notes
