"""The weight-spectrum cache under concurrent calls and writes, and its byte budget."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import threading
import time
import weakref

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import SCALED_TOLERANCE, assert_scaled_close

import specfx
from specfx.ops import SPECTRUM_CACHE, contraction
from specfx.ops import weight_spectrum as weight_spectrum_module
from specfx.ops.weight_spectrum import DEFAULT_MAX_BYTES, SpectrumCache, weight_spectrum

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# --- concurrent calls and writes ---------------------------------------------------------

def single_tap_edits(first: torch.Tensor, count: int, generator: torch.Generator) -> list[torch.Tensor]:
    """``first`` and ``count`` successors, each differing from the one before in one tap,
    moved by 5 (far beyond rounding). A copy of one into a weight holding the one before
    changes a single float, so a thread reading the weight meanwhile sees one or the
    other, never a mix of the two: a result is right only if it is the conv of a value
    held during its call, and a torn read cannot pass for one."""
    values = [first]
    for i in torch.randint(first.numel(), (count,), generator=generator).tolist():
        value = values[-1].clone()
        value.view(-1)[i] += -5.0 if value.view(-1)[i] > 0 else 5.0
        values.append(value)
    return values


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def test_concurrent_calls_during_weight_writes_see_the_weight_before_or_after_each_write():
    """Three threads run one weight at two input sizes (two FFT grids) while this thread
    writes new values into it through ``.data`` (no version bump). Each result must be the
    conv of a value the weight held during that call: a spectrum computed before a write
    must never be stored beside the values after it (that pairing would be returned until
    the next write). Every call is checked, and the last values once the writes stop."""
    generator = torch.Generator().manual_seed(0)
    kernel, writes = 9, 500
    inputs = [torch.randn(1, 4, size, size, generator=generator) for size in (40, 29)]
    values = single_tap_edits(torch.randn(6, 4, kernel, kernel, generator=generator), writes, generator)
    # One conv of all the values at once: 600 small ones take seconds on a busy machine.
    expected = [F.conv2d(x, torch.cat(values), None, 1, kernel // 2).unflatten(1, (len(values), -1)).unbind(1)
                for x in inputs]
    weight = torch.nn.Parameter(values[0].clone())
    started, written = [0], [0]  # index of the value last begun, last completed
    stop = threading.Event()
    failures: list[str] = []

    def call(which: int) -> None:
        try:
            with torch.no_grad():
                while not stop.is_set():
                    first = written[0]
                    y = specfx.spectral_conv(inputs[which], weight, None, 1, kernel // 2)
                    last = started[0]
                    errors = [scaled_error(y, expected[which][i]) for i in range(first, last + 1)]
                    if min(errors) > SCALED_TOLERANCE[torch.float32]:
                        failures.append(f"input {which}: values {first}..{last}, scaled errors {errors}")
        except Exception as error:  # noqa: BLE001 - reported by the main thread
            failures.append(repr(error))

    threads = [threading.Thread(target=call, args=(which,), daemon=True) for which in (0, 1, 0)]
    for thread in threads:
        thread.start()
    try:
        for index in range(1, writes + 1):
            started[0] = index
            weight.data.copy_(values[index])
            written[0] = index
            # Long enough for the readers to hit the cache between writes, which is where a
            # stale pairing shows.
            time.sleep(0.002)
            if failures:
                break
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads)
    assert not failures, failures[:5]
    with torch.no_grad():
        for which, x in enumerate(inputs):
            y = specfx.spectral_conv(x, weight, None, 1, kernel // 2)
            assert_scaled_close(y, expected[which][written[0]])


def test_write_during_the_spectrum_computation_is_not_paired_with_the_old_spectrum(monkeypatch):
    """The write lands after the spectrum is computed from the old values: the cache must
    not keep that spectrum beside the new values, or every later call returns it."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 9, 9)
    weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    old, new = weight.detach().clone(), torch.randn(4, 3, 3, 3)
    compute = weight_spectrum_module.weight_spectrum

    def compute_then_write(*args):
        spectrum = compute(*args)
        weight.data.copy_(new)
        return spectrum

    monkeypatch.setattr(weight_spectrum_module, "weight_spectrum", compute_then_write)
    with torch.no_grad():
        during = specfx.spectral_conv(x, weight, None, 1, 1)
    monkeypatch.undo()
    assert_scaled_close(during, F.conv2d(x, old, None, 1, 1))
    with torch.no_grad():
        for _ in range(2):
            assert_scaled_close(specfx.spectral_conv(x, weight, None, 1, 1), F.conv2d(x, new, None, 1, 1))


# --- the byte budget -----------------------------------------------------------------------

GEOMETRY = ([16, 16], [1, 1], [1, 1], 1, contraction.ACCUMULATE)


def entry_bytes(weight: torch.Tensor) -> int:
    """What one entry of ``weight`` at :data:`GEOMETRY` holds: its spectrum and a copy of
    the weight."""
    spectrum = weight_spectrum(weight, *GEOMETRY)
    return spectrum.numel() * spectrum.element_size() + weight.numel() * weight.element_size()


def test_nbytes_counts_the_spectra_and_the_stored_weight_copies():
    cache = SpectrumCache()
    weights = [torch.randn(4, 3, 3, 3), torch.randn(2, 3, 5, 5)]
    for w in weights:
        cache.get(w, *GEOMETRY)
    assert cache.nbytes == sum(entry_bytes(w) for w in weights)
    versions_only = SpectrumCache(verify_contents=False)
    versions_only.get(weights[0], *GEOMETRY)
    assert versions_only.nbytes == entry_bytes(weights[0]) - weights[0].numel() * 4


def test_many_one_off_weights_kept_alive_stay_within_the_budget(monkeypatch):
    """Weights replaced but kept alive elsewhere (an optimizer's state, an EMA list) are
    never seen again: without a bound their spectra pile up (4.8 MiB each here, 18 MiB
    on a 256x256 input)."""
    torch.manual_seed(0)
    x = torch.randn(1, 8, 128, 128)
    SPECTRUM_CACHE.clear()
    kept = [torch.randn(8, 8, 5, 5)]
    with torch.no_grad():
        specfx.spectral_conv(x, kept[0], None, 1, 2)
    one = SPECTRUM_CACHE.nbytes
    monkeypatch.setattr(SPECTRUM_CACHE, "max_bytes", int(3.5 * one))
    with torch.no_grad():
        for _ in range(12):
            kept.append(torch.randn(8, 8, 5, 5))
            y = specfx.spectral_conv(x, kept[-1], None, 1, 2)
            assert SPECTRUM_CACHE.nbytes <= SPECTRUM_CACHE.max_bytes
    assert SPECTRUM_CACHE.nbytes == 3 * one
    assert_scaled_close(y, F.conv2d(x, kept[-1], None, 1, 2))


def test_least_recently_used_entry_is_evicted_first():
    a, b, c = (torch.randn(4, 3, 3, 3) for _ in range(3))
    cache = SpectrumCache(max_bytes=int(2.5 * entry_bytes(a)))
    for w in (a, b, a, c):  # a is used after b: b is the least recently used when c comes
        cache.get(w, *GEOMETRY)
    assert (cache.hits, cache.misses) == (1, 3)
    cache.get(a, *GEOMETRY)
    cache.get(c, *GEOMETRY)
    assert (cache.hits, cache.misses) == (3, 3)
    cache.get(b, *GEOMETRY)
    assert cache.misses == 4
    assert cache.nbytes == 2 * entry_bytes(a)


def test_a_loop_larger_than_the_budget_keeps_the_spectra_that_fit():
    """Three weights read in turn, room for two: least-recently-used eviction would evict
    each time the one read next (no hits at all); the working set stays instead."""
    weights = [torch.randn(4, 3, 3, 3) for _ in range(3)]
    cache = SpectrumCache(max_bytes=int(2.5 * entry_bytes(weights[0])))
    for _ in range(10):
        for w in weights:
            cache.get(w, *GEOMETRY)
    assert (cache.hits, cache.misses) == (18, 12)  # two hits a round after the first
    assert cache.nbytes == 2 * entry_bytes(weights[0])


def test_a_new_working_set_replaces_an_old_one():
    """Spectra computed for the first time (another model's) evict what the old working
    set left, however recently it was used."""
    old, a, b = (torch.randn(4, 3, 3, 3) for _ in range(3))
    cache = SpectrumCache(max_bytes=int(2.5 * entry_bytes(old)))
    for w in (old, a, old, a):
        cache.get(w, *GEOMETRY)
    for w in (b, b, a):
        cache.get(w, *GEOMETRY)
    assert (cache.hits, cache.misses) == (4, 3)
    cache.get(old, *GEOMETRY)
    assert cache.misses == 4


def test_spectrum_larger_than_the_budget_is_returned_but_not_cached():
    small, large = torch.randn(1, 1, 3, 3), torch.randn(8, 8, 5, 5)
    cache = SpectrumCache(max_bytes=entry_bytes(large) - 1)
    cache.get(small, *GEOMETRY)
    for _ in range(2):
        spectrum = cache.get(large, *GEOMETRY)
        torch.testing.assert_close(spectrum, weight_spectrum(large, *GEOMETRY), rtol=0, atol=0)
    assert cache.misses == 3
    assert cache.nbytes == entry_bytes(small)  # the small entry is not evicted for it either
    cache.get(small, *GEOMETRY)
    assert cache.hits == 1


def test_lowering_the_budget_evicts_at_once_and_zero_turns_caching_off():
    weights = [torch.randn(4, 3, 3, 3) for _ in range(3)]
    cache = SpectrumCache()
    for w in weights:
        cache.get(w, *GEOMETRY)
    cache.max_bytes = entry_bytes(weights[0])
    assert cache.nbytes == entry_bytes(weights[0])
    cache.get(weights[-1], *GEOMETRY)
    assert cache.hits == 1  # the most recently used one stayed
    cache.max_bytes = 0
    cache.get(weights[-1], *GEOMETRY)
    assert cache.nbytes == 0 and cache.misses == 4
    with pytest.raises(ValueError):
        SpectrumCache(max_bytes=-1)


def test_entries_of_dead_weights_are_released():
    cache = SpectrumCache()
    w = torch.randn(4, 3, 3, 3)
    spectrum = weakref.ref(cache.get(w, *GEOMETRY))
    assert cache.nbytes > 0
    del w
    gc.collect()
    assert cache.nbytes == 0 and spectrum() is None


def test_weight_dying_while_the_cache_is_busy_is_released_when_it_is_free():
    """A weight can die while the cache's lock is held — by another thread, or by this one
    when an allocation in the cache's bookkeeping collects garbage. Its callback must
    neither wait for the lock (this thread would deadlock) nor edit the entries under the
    holder's feet: the holder drops it on release."""
    cache = SpectrumCache()
    w = torch.randn(4, 3, 3, 3)
    cache.get(w, *GEOMETRY)
    cache._lock.acquire()
    del w
    gc.collect()
    assert cache.nbytes > 0
    cache._release()
    assert cache.nbytes == 0


@pytest.mark.parametrize("text,budget", [("64", 64 * 2**20), (" 0.5 ", 2**19), ("0", 0), ("", DEFAULT_MAX_BYTES)])
def test_budget_variable_is_a_number_of_mib(monkeypatch, text, budget):
    monkeypatch.setenv("SPECFX_SPECTRUM_CACHE_MB", text)
    assert weight_spectrum_module._budget_from_environment() == budget


@pytest.mark.parametrize("text", ["-1", "lots", "nan"])
def test_budget_variable_that_is_not_a_size_is_refused(monkeypatch, text):
    monkeypatch.setenv("SPECFX_SPECTRUM_CACHE_MB", text)
    with pytest.raises(ValueError, match="SPECFX_SPECTRUM_CACHE_MB"):
        weight_spectrum_module._budget_from_environment()


def test_global_cache_reads_its_budget_from_the_environment_at_import():
    env = dict(os.environ, SPECFX_SPECTRUM_CACHE_MB="3")
    out = subprocess.run([sys.executable, "-c", "from specfx.ops import SPECTRUM_CACHE; print(SPECTRUM_CACHE.max_bytes)"],
                         cwd=REPO, env=env, capture_output=True, text=True, check=True).stdout
    assert int(out) == 3 * 2**20


def test_a_module_optimized_under_inference_mode_keeps_its_spectra():
    """optimize copies the model outside inference mode: inference-tensor weights carry no
    version, so the cache could never keep their spectra (every call transformed them)."""
    torch.manual_seed(0)
    model, x = nn.Conv2d(4, 4, 15, padding=7).eval(), torch.randn(1, 4, 32, 32)
    with torch.inference_mode():
        fast = specfx.optimize(model, (x,), policy="always")
        assert not any(p.is_inference() for p in fast.parameters())
        fast(x)
        hits = SPECTRUM_CACHE.hits
        y = fast(x)
        assert SPECTRUM_CACHE.hits == hits + 1
    assert_scaled_close(y, model(x).detach())


def test_a_tensor_over_a_cached_weights_memory_hits_while_its_values_are_the_same():
    """What a checkpointed backward unpacks for a saved parameter is another tensor over
    its memory: it reads the cached spectrum, and a write through it is seen."""
    w = torch.randn(4, 3, 3, 3)
    cache = SpectrumCache()
    first = cache.get(w, *GEOMETRY)
    alias = w.detach()
    assert cache.get(alias, *GEOMETRY) is first and cache.hits == 1
    alias.mul_(2)  # bumps the version both share
    torch.testing.assert_close(cache.get(w.detach(), *GEOMETRY), weight_spectrum(w, *GEOMETRY), rtol=0, atol=0)
    assert cache.misses == 2
    assert cache.get(w[:2], *GEOMETRY) is not None and cache.misses == 3  # another view is another weight
