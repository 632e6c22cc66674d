"""policy="auto" times its close calls: decisions from the timings, the on-disk timing
cache (hit, miss, a new machine signature), and the budget.

Timings are injected (``specfx.measure.compare`` and ``specfx.close_calls.clock``
replaced), so the decisions are deterministic; one test runs the real comparison on two
functions whose costs differ fourfold.
"""

from __future__ import annotations

import importlib
import os
import json
import time

import pytest
import torch
import torch.nn as nn

import specfx
from specfx import close_calls, measure
from specfx.timing_cache import Timing, TimingCache, machine_signature

from conftest import assert_scaled_close


def close_conv(channels: int = 8) -> nn.Module:
    """A depthwise 11x11 conv: its direct rate is machine-specific (oneDNN's fast depthwise
    kernel reaches k=11 on some CPUs, not on others), so any estimate is a close call."""
    return nn.Conv2d(channels, channels, 11, padding=5, groups=channels).eval()


def clear_conv() -> nn.Module:
    """A dense 3x3 conv: estimated an order of magnitude faster direct."""
    return nn.Conv2d(16, 16, 3, padding=1).eval()


class FakeTimer:
    """Stands in for measure.compare: returns the timings it is given, in order, and
    advances a fake clock by ``seconds`` per comparison."""

    def __init__(self, timings, seconds: float = 0.0):
        self.timings = list(timings)
        self.seconds = seconds
        self.now = 0.0
        self.budgets = []
        self.checked = []

    def compare(self, baseline, candidate, budget_s, sync):
        self.budgets.append(budget_s)
        # The two callables compute the same conv, the direct one and the lowered one.
        self.checked.append((baseline(), candidate()))
        self.now += self.seconds
        return self.timings.pop(0)

    def clock(self):
        return self.now


@pytest.fixture
def timer(monkeypatch, tmp_path):
    monkeypatch.setenv("SPECFX_CACHE_DIR", str(tmp_path))
    fake = FakeTimer([])
    monkeypatch.setattr(measure, "compare", fake.compare)
    monkeypatch.setattr(close_calls, "clock", fake.clock)
    monkeypatch.setattr(close_calls, "run_delay_s", lambda: 0.0)  # a quiet machine: no thread ever waits
    return fake


def test_a_close_call_is_decided_by_its_timing(timer):
    x = torch.randn(1, 8, 32, 32)
    timer.timings = [(1.0, 2.0)]  # direct 1 ms, lowered 2 ms
    report = specfx.explain(close_conv(), (x,), measure_budget_s=1.0)
    assert report.lowered == []
    assert report.decisions[0].reason.startswith("direct conv measured faster (2 ms lowered vs 1 ms direct, timed; estimated")
    cost = report.decisions[0].cost
    assert (cost.measured_direct_ms, cost.measured_fft_ms) == (1.0, 2.0)
    direct, lowered = timer.checked[0]
    assert_scaled_close(lowered, direct)

    timer.timings = [(2.0, 1.0)]
    other = torch.randn(2, 8, 32, 32)  # another batch size is another signature
    report = specfx.explain(close_conv(), (other,), measure_budget_s=1.0)
    assert report.decisions[0].lowered
    assert report.decisions[0].reason.startswith("FFT measured 2.0x faster (1 ms lowered vs 2 ms direct, timed")


def test_clear_cases_are_not_timed(timer):
    report = specfx.explain(clear_conv(), (torch.randn(1, 16, 32, 32),), measure_budget_s=1.0)
    assert report.lowered == [] and timer.budgets == []
    assert report.timing_notes == []


def test_the_optimized_module_is_exact_after_a_timed_decision(timer):
    torch.manual_seed(0)
    model, x = close_conv(), torch.randn(1, 8, 32, 32)
    timer.timings = [(2.0, 1.0)]
    fast = specfx.optimize(model, (x,), measure_budget_s=1.0)
    assert fast.specfx_report.decisions[0].lowered
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))


def test_timing_leaves_the_global_random_state_alone(timer):
    timer.timings = [(1.0, 2.0)]
    conv, x = close_conv(), torch.zeros(1, 8, 32, 32)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    specfx.explain(conv, (x,), measure_budget_s=1.0)
    assert timer.budgets  # it did time
    torch.testing.assert_close(torch.rand(3), expected)


def test_a_second_optimize_reads_the_timing_cache(timer, tmp_path):
    x = torch.randn(1, 8, 32, 32)
    timer.timings = [(1.0, 2.0)]
    specfx.explain(close_conv(), (x,), measure_budget_s=1.0)
    assert len(timer.budgets) == 1
    report = specfx.explain(close_conv(), (x,), measure_budget_s=1.0)
    assert len(timer.budgets) == 1  # nothing timed the second time
    assert "cached" in report.decisions[0].reason
    assert report.timing_notes[0] == f"1 close call(s) from the timing cache: {report.decisions[0].name}"
    files = list(tmp_path.glob("timings-*.json"))
    assert len(files) == 1 and str(files[0]) in report.timing_notes[1]
    data = json.loads(files[0].read_text())
    assert data["signature"] == machine_signature("cpu")
    assert list(data["entries"].values()) == [[1.0, 2.0]]


def test_another_machine_or_torch_version_times_again(timer, monkeypatch, tmp_path):
    x = torch.randn(1, 8, 32, 32)
    timer.timings = [(1.0, 2.0), (2.0, 1.0)]
    assert specfx.explain(close_conv(), (x,), measure_budget_s=1.0).lowered == []
    elsewhere = dict(machine_signature("cpu"), torch="2.99.0")
    monkeypatch.setattr(close_calls, "machine_signature", lambda device: elsewhere)
    assert specfx.explain(close_conv(), (x,), measure_budget_s=1.0).decisions[0].lowered
    assert len(timer.budgets) == 2
    assert len(list(tmp_path.glob("timings-*.json"))) == 2


def test_a_damaged_cache_file_is_timed_again_and_rewritten(timer, tmp_path):
    x = torch.randn(1, 8, 32, 32)
    timer.timings = [(1.0, 2.0), (1.0, 2.0)]
    specfx.explain(close_conv(), (x,), measure_budget_s=1.0)
    (path,) = tmp_path.glob("timings-*.json")
    path.write_text('{"format": 1, "signature": {"cpu": "cut sh')
    specfx.explain(close_conv(), (x,), measure_budget_s=1.0)
    assert len(timer.budgets) == 2
    assert list(json.loads(path.read_text())["entries"].values()) == [[1.0, 2.0]]


class DistinctCloseCalls(nn.Module):
    """Convs whose signatures all differ (channel counts 8, 9, ...), each a close call."""

    def __init__(self, count: int):
        super().__init__()
        self.convs = nn.ModuleList(close_conv(8 + i) for i in range(count))

    def forward(self, x):
        return [conv(x[:, : 8 + i]) for i, conv in enumerate(self.convs)]


def test_the_budget_bounds_the_time_spent_timing(timer):
    """Each comparison is handed what is left of the budget (measure.compare stops its
    rounds there); once it is spent, close calls go to the estimate, and the report names
    them."""
    timer.seconds = 0.3
    timer.timings = [(1.0, 2.0)] * 6
    x = torch.randn(1, 13, 32, 32)
    report = specfx.explain(DistinctCloseCalls(6), (x,), measure_budget_s=1.0)
    assert timer.budgets == pytest.approx([1.0, 0.7, 0.4, 0.1])
    timed = [d for d in report.decisions if "measured" in d.reason]
    untimed = [d for d in report.decisions if "timing budget spent" in d.reason]
    assert len(timed) == 4 and len(untimed) == 2
    assert report.timing_notes[0].startswith("timed 4 close call(s) in 1.20 s")
    assert report.timing_notes[1].startswith("2 close call(s) decided by the estimate, the timing budget (1 s)")

    # The next optimize times the two left over, and reads the four timed ones: no second
    # spent on what was timed before.
    timer.timings = [(1.0, 2.0)] * 2
    report = specfx.explain(DistinctCloseCalls(6), (x,), measure_budget_s=1.0)
    assert timer.budgets[4:] == pytest.approx([1.0, 0.7])
    assert all("measured" in d.reason for d in report.decisions)

    # And the one after that times nothing at all.
    report = specfx.explain(DistinctCloseCalls(6), (x,), measure_budget_s=1.0)
    assert len(timer.budgets) == 6
    assert report.timing_notes[0].startswith("6 close call(s) from the timing cache")


def test_a_zero_budget_decides_by_the_estimates(timer):
    report = specfx.explain(close_conv(), (torch.randn(1, 8, 32, 32),), measure_budget_s=0)
    assert timer.budgets == []
    assert "timing budget spent" in report.decisions[0].reason


def test_policy_measure_times_every_conv_whatever_the_budget(timer):
    timer.timings = [(1.0, 2.0), (1.0, 2.0)]
    model = nn.Sequential(clear_conv(), clear_conv())
    report = specfx.explain(model, (torch.randn(1, 16, 32, 32),), policy="measure", measure_budget_s=0)
    assert len(timer.budgets) == 1  # the two convs share a signature: timed once
    assert all("measured" in d.reason for d in report.decisions)


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "2", True])
def test_the_budget_is_checked(bad):
    with pytest.raises(ValueError, match="measure_budget_s must be a number of seconds >= 0"):
        specfx.pipeline.Settings(measure_budget_s=bad)


def test_the_budget_default_comes_from_the_environment(monkeypatch):
    monkeypatch.setenv("SPECFX_MEASURE_BUDGET_S", "0.5")
    assert specfx.pipeline.Settings().measure_budget_s == 0.5
    monkeypatch.delenv("SPECFX_MEASURE_BUDGET_S")
    assert specfx.pipeline.Settings().measure_budget_s == close_calls.DEFAULT_BUDGET_S
    monkeypatch.setenv("SPECFX_MEASURE_BUDGET_S", "soon")
    with pytest.raises(ValueError, match="SPECFX_MEASURE_BUDGET_S"):
        specfx.pipeline.Settings()


def test_the_cache_keeps_what_other_processes_wrote(tmp_path):
    signature = {"cpu": "test"}
    first, second = TimingCache(tmp_path, signature), TimingCache(tmp_path, signature)
    first.put("a", Timing(1.0, 2.0))
    second.put("b", Timing(3.0, 4.0))  # second never read "a", but merges it before writing
    assert TimingCache(tmp_path, signature).get("a") == Timing(1.0, 2.0)
    assert TimingCache(tmp_path, signature).get("b") == Timing(3.0, 4.0)
    assert TimingCache(tmp_path, {"cpu": "other"}).get("a") is None


def test_an_unwritable_cache_directory_keeps_timings_in_memory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cache = TimingCache(blocker / "cache", {"cpu": "test"})
    cache.put("a", Timing(1.0, 2.0))
    assert cache.get("a") == Timing(1.0, 2.0)
    assert cache.write_error is not None and "could not write" in cache.write_error


def test_compare_tells_a_fourfold_difference_and_respects_its_budget():
    """The real comparison, on two functions whose costs differ fourfold (sleeps: the
    scheduler's load cannot reverse the order)."""
    slow, fast = (lambda: time.sleep(0.004)), (lambda: time.sleep(0.001))
    baseline_ms, candidate_ms = measure.compare(slow, fast, budget_s=0.5)
    assert baseline_ms > 2 * candidate_ms
    baseline_ms, candidate_ms = measure.compare(fast, slow, budget_s=0.5)
    assert candidate_ms > 2 * baseline_ms


def test_compare_runs_rounds_on_a_close_difference_within_its_budget():
    calls = {"a": 0, "b": 0}

    def a():
        calls["a"] += 1
        time.sleep(0.002)

    def b():
        calls["b"] += 1
        time.sleep(0.002)

    measure.compare(a, b, budget_s=0.0)
    # Two warm-up calls each, then one round (the budget is spent after it) of blocks of
    # BLOCK_MS / 2 ms calls.
    assert calls["a"] <= 2 + 2 * measure.BLOCK_MS / 2 + 1 and calls["b"] <= 2 + 2 * measure.BLOCK_MS / 2 + 1


# --- chains: fused vs per-conv lowering -------------------------------------------------

class ConvReluConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(4, 4, 15, padding=7)
        self.b = nn.Conv2d(4, 4, 15, padding=7)

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


# Direct convs so slow that both convs are clearly lowered (only the chain is a close call).
SLOW_DIRECT = specfx.CostProfile(dense_direct_gflops=0.5)


def _ops(gm) -> list[str]:
    return [str(n.target) for n in gm.graph.nodes if str(n.target).startswith("specfx.")]


def test_a_close_chain_is_left_unfused_when_per_conv_lowering_measures_faster(timer):
    torch.manual_seed(0)
    model, x = ConvReluConv().eval(), torch.randn(1, 4, 32, 32)
    assert specfx.explain(model, (x,), profile=SLOW_DIRECT, measure_budget_s=0).chains[0].fused  # the estimate
    timer.timings = [(1.0, 2.0)]  # per-conv 1 ms, fused 2 ms
    fast = specfx.optimize(model, (x,), profile=SLOW_DIRECT, measure_budget_s=1.0)
    report = fast.specfx_report
    assert len(timer.budgets) == 1  # the chain only: both convs are clear calls
    chain = report.chains[0]
    assert not chain.fused
    assert chain.reason.startswith("fusing measured slower than per-conv lowering (2 ms fused vs 1 ms per-conv, "
                                   "timed; estimated")
    assert report.transforms == report.transforms_per_conv == {"forward": 2, "inverse": 2}
    assert _ops(fast) == ["specfx.lowered_conv.default"] * 2
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))
    # What was timed: the chain cut out of the graph, run per-conv and fused, same values.
    (per_conv,), (fused,) = timer.checked[0]
    assert_scaled_close(fused, per_conv)


def test_a_close_chain_is_fused_when_fusion_measures_faster(timer, monkeypatch):
    """An estimate that keeps the chain (the decision either way swapped in), overturned
    by the timing."""
    find_chains = importlib.import_module("specfx.passes.find_chains")
    decide = find_chains.decide

    def estimate_kept(*args, **kwargs):
        decision, plan, other = decide(*args, **kwargs)
        return (other, plan, decision) if decision.fused else (decision, plan, other)

    monkeypatch.setattr(find_chains, "decide", estimate_kept)
    torch.manual_seed(0)
    model, x = ConvReluConv().eval(), torch.randn(1, 4, 32, 32)
    assert not specfx.explain(model, (x,), profile=SLOW_DIRECT, measure_budget_s=0).chains[0].fused
    timer.timings = [(2.0, 1.0)]
    fast = specfx.optimize(model, (x,), profile=SLOW_DIRECT, measure_budget_s=1.0)
    chain = fast.specfx_report.chains[0]
    assert chain.fused and chain.reason.startswith("fused: measured 2.00x faster than per-conv lowering")
    assert "specfx.spectral_activation.default" in _ops(fast)
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))
    # The second time, from the timing cache.
    again = specfx.explain(model, (x,), profile=SLOW_DIRECT, measure_budget_s=1.0)
    assert again.chains[0].fused and "cached" in again.chains[0].reason
    assert len(timer.budgets) == 1


def test_a_close_chain_past_the_budget_keeps_the_estimate(timer):
    model, x = ConvReluConv().eval(), torch.randn(1, 4, 32, 32)
    report = specfx.explain(model, (x,), profile=SLOW_DIRECT, measure_budget_s=0)
    assert report.chains[0].fused
    assert report.chains[0].reason.endswith("a close call left to the estimate (timing budget spent)")


def test_a_close_call_whose_warm_up_alone_would_spend_the_budget_is_not_timed(timer):
    """Timing runs each way twice before its first round: a conv estimated at ~30 ms a
    call is not started on 50 ms of budget."""
    model, x = close_conv(64), torch.randn(2, 64, 64, 64)
    timer.timings = [(1.0, 2.0)]
    report = specfx.explain(model, (x,), measure_budget_s=0.05)
    cost = report.decisions[0].cost
    assert 2 * (cost.direct_ms + cost.fft_ms) > 50
    assert timer.budgets == [] and "timing budget spent" in report.decisions[0].reason
    assert "timed" in specfx.explain(model, (x,), measure_budget_s=1.0).decisions[0].reason


def test_timings_taken_on_a_busy_machine_decide_the_run_but_are_not_kept(timer, monkeypatch, tmp_path):
    timer.seconds = 0.2
    waits = iter([1.0, 1.3])  # the threads waited 0.3 s for a core during a 0.2 s timing
    monkeypatch.setattr(close_calls, "run_delay_s", lambda: next(waits))
    x = torch.randn(1, 8, 32, 32)
    timer.timings = [(2.0, 1.0), (1.0, 2.0)]
    report = specfx.explain(close_conv(), (x,), measure_budget_s=1.0)
    assert report.decisions[0].lowered and "timed" in report.decisions[0].reason
    assert "not kept in the timing cache: taken on a busy machine (threads waiting for a core up to 1.5x" \
        in report.timing_notes[1]
    assert list(tmp_path.glob("timings-*.json")) == []
    monkeypatch.setattr(close_calls, "run_delay_s", lambda: 0.0)
    assert not specfx.explain(close_conv(), (x,), measure_budget_s=1.0).decisions[0].lowered  # timed again
    assert len(timer.budgets) == 2 and len(list(tmp_path.glob("timings-*.json"))) == 1


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="per-thread schedstat is Linux's")
def test_run_delay_is_read_from_every_thread():
    first = close_calls.run_delay_s()
    assert first is not None and first >= 0
    assert close_calls.run_delay_s() >= first


def test_a_chain_that_cannot_run_on_its_own_keeps_the_estimate_and_says_why(timer, monkeypatch):
    time_chains = importlib.import_module("specfx.passes.time_chains")

    def fails(region, ctx, plans):
        raise RuntimeError("no kernel for this")

    monkeypatch.setattr(time_chains, "_rewritten", fails)
    torch.manual_seed(0)
    model, x = ConvReluConv().eval(), torch.randn(1, 4, 32, 32)
    fast = specfx.optimize(model, (x,), profile=SLOW_DIRECT, measure_budget_s=1.0)
    chain = fast.specfx_report.chains[0]
    assert chain.fused  # the estimate's choice
    assert chain.reason.endswith("a close call left to the estimate (running it on its own failed: "
                                 "RuntimeError: no kernel for this)")
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))


def test_a_chain_with_batchnorm_and_parameters_in_the_graph_is_timed_on_its_own(timer):
    """The chain's plan names the graph's nodes (a BatchNorm's original ops for training
    mode, a parameter read by a get_attr): cut out of the graph, it still runs, both ways."""
    from test_chains import Residual

    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(2, 3, 16, 16)
    slow = specfx.CostProfile(dense_direct_gflops=0.5)
    timer.timings = [(2.0, 1.0)]
    fast = specfx.optimize(model, (x,), profile=slow, measure_budget_s=1.0)
    chain = fast.specfx_report.chains[0]
    assert chain.fused and chain.reason.startswith("fused: measured 2.00x faster"), chain.reason
    (per_conv,), (fused,) = timer.checked[0]
    assert_scaled_close(fused, per_conv)
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))
