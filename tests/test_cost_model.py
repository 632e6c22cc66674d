"""The cost model, its machine profile, calibration, and policy='measure'."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn as nn

import specfx
from specfx import calibrate
from specfx.cost_model import MMAP_CEILING_BYTES, CostProfile, ConvShape, estimate, fresh_pages_ms
from specfx.functional import conv_geometry
from specfx.geometry import smooth_size
from specfx.measure import Progress

from conftest import assert_scaled_close


@pytest.mark.parametrize("n", [1, 7, 47, 97, 499, 527, 563, 4096])
@pytest.mark.parametrize("even", [False, True])
def test_smooth_size_is_the_smallest_5_smooth_size(n, even):
    def smooth(m):
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        return m == 1

    size = smooth_size(n, even=even)
    assert size >= n and smooth(size) and (size % 2 == 0 or not even)
    assert not any(smooth(m) and (m % 2 == 0 or not even) for m in range(n, size))


def _cost(x_shape, w_shape, groups, padding, profile=CostProfile()):
    x, w = torch.empty(x_shape), torch.empty(w_shape)
    geometry = conv_geometry(x, w, padding=padding)
    shape = ConvShape(batch=x_shape[0], in_channels=x_shape[1], out_channels=w_shape[0], groups=groups,
                      kernel_size=tuple(w_shape[2:]), out_size=geometry.out_size, element_bytes=4)
    return estimate(shape, geometry, profile)


def test_estimates_follow_the_kernel_size():
    small_dense = _cost((8, 64, 32, 32), (64, 64, 3, 3), 1, 1)
    large_depthwise = _cost((4, 384, 32, 32), (384, 1, 31, 31), 384, 15)
    large_dense = _cost((2, 8, 512, 512), (8, 8, 31, 31), 1, 0)
    assert small_dense.direct_ms < small_dense.fft_ms
    assert large_depthwise.fft_ms * 10 < large_depthwise.direct_ms
    assert large_dense.fft_ms * 4 < large_dense.direct_ms


def test_depthwise_cliff_is_a_profile_setting():
    before = _cost((2, 64, 64, 64), (64, 1, 13, 13), 64, 6, CostProfile(depthwise_fast_max_kernel=9))
    after = _cost((2, 64, 64, 64), (64, 1, 13, 13), 64, 6, CostProfile(depthwise_fast_max_kernel=13))
    assert before.direct_ms > 3 * after.direct_ms
    assert before.fft_ms == after.fft_ms


def test_direct_rate_drops_with_fewer_output_channels_than_a_block():
    profile = CostProfile(direct_channel_block=16)
    wide = _cost((2, 16, 4096), (16, 16, 64), 1, 0, profile)
    narrow = _cost((2, 8, 4096), (8, 8, 64), 1, 0, profile)
    grouped = _cost((2, 64, 4096), (64, 8, 64), 8, 0, profile)  # 8 output channels per group
    # Per FLOP, a block half full takes twice as long; the FFT side does not change rate.
    assert narrow.direct_ms / narrow.direct_gflop == pytest.approx(2 * wide.direct_ms / wide.direct_gflop)
    assert grouped.direct_ms / grouped.direct_gflop == pytest.approx(narrow.direct_ms / narrow.direct_gflop)
    # fft-conv-pytorch's 1D suite at k=64: the FFT wins here (0.65 vs 1.06 ms measured).
    assert narrow.fft_ms < narrow.direct_ms


def test_fresh_pages_are_charged_above_the_mmap_ceiling_only():
    assert fresh_pages_ms(MMAP_CEILING_BYTES) == 0.0
    assert fresh_pages_ms(64 << 20, CostProfile(fresh_page_ms_per_mib=0.5)) == pytest.approx(32.0)
    # convnet L1: a 50 MB output on both paths; the FFT path's 51 MB output spectrum is
    # made a block of channels at a time (spectral_ops.WHOLE_SPECTRUM_BYTES), so it is
    # never fresh memory, and its 1.6 MB input spectrum is below the ceiling.
    free = CostProfile(fresh_page_ms_per_mib=0.0)
    paid = CostProfile(fresh_page_ms_per_mib=0.5)
    before, after = (_cost((8, 3, 128, 128), (96, 3, 11, 11), 1, 0, p) for p in (free, paid))
    out_mib = 8 * 96 * 118 * 118 * 4 / 2**20
    assert after.direct_ms - before.direct_ms == pytest.approx(0.5 * out_mib)
    assert after.fft_ms - before.fft_ms == pytest.approx(0.5 * out_mib)


def test_profile_round_trip_and_default_path(tmp_path, monkeypatch):
    path = tmp_path / "profile.json"
    profile = CostProfile(fft_gflops=12.5, depthwise_fast_max_kernel=13)
    assert profile.save(path) == path
    assert CostProfile.load(path) == profile

    monkeypatch.setenv("SPECFX_PROFILE", str(tmp_path / "missing.json"))
    assert CostProfile.load() == CostProfile()
    monkeypatch.setenv("SPECFX_PROFILE", str(path))
    assert CostProfile.load() == profile
    assert specfx.pipeline.Settings().profile == profile

    with pytest.raises(FileNotFoundError):
        CostProfile.load(tmp_path / "missing.json")
    path.write_text(json.dumps({"fft_gflops": 1.0, "warp_drive": 3}))
    with pytest.raises(ValueError, match="warp_drive"):
        CostProfile.load(path)


def test_depthwise_cliff_detection():
    rates = {3: 10.0, 5: 20.0, 7: 40.0, 9: 45.0, 11: 5.0, 13: 4.0, 15: 4.5, 17: 4.2}
    assert calibrate._depthwise_cliff(rates) == (9, 45.0, 4.35)
    flat = {k: 30.0 for k in range(3, 18, 2)}
    fast_max, fast, slow = calibrate._depthwise_cliff(flat)
    assert fast_max > 17 and fast == slow == 30.0


def test_calibrate_writes_a_loadable_profile(tmp_path, capsys):
    path = tmp_path / "profile.json"
    assert calibrate.main(["--out", str(path)]) == 0
    profile = CostProfile.load(path)
    assert all(getattr(profile, f) > 0 for f in ("dense_direct_gflops", "fft_gflops", "memory_gbps"))
    assert str(path) in capsys.readouterr().out


class _TwoConvs(nn.Module):
    def __init__(self):
        super().__init__()
        self.small = nn.Conv2d(8, 8, 3, padding=1)
        self.large = nn.Conv2d(8, 8, 31, padding=15, groups=8)

    def forward(self, x):
        return self.large(self.small(x))


def test_policy_measure_times_both_paths_and_stays_exact(capsys, monkeypatch):
    # Show the progress bar at once (it normally waits a second before appearing).
    monkeypatch.setattr(Progress, "DEFAULT_DELAY_S", 0.0)
    torch.manual_seed(0)
    model, x = _TwoConvs().eval(), torch.randn(2, 8, 64, 64)
    fast = specfx.optimize(model, (x,), policy="measure")
    report = fast.specfx_report
    for decision in report.decisions:
        cost = decision.cost
        assert cost.measured_direct_ms > 0 and cost.measured_fft_ms > 0
        assert decision.lowered == (cost.measured_fft_ms < cost.measured_direct_ms)
        assert "measured" in decision.reason
    with torch.no_grad():
        assert_scaled_close(fast(x), model(x))
    assert "specfx: timing close calls" in capsys.readouterr().err



def test_policy_measure_follows_the_timings(monkeypatch):
    """The decision is the faster measured path, whatever the estimates say (timings are
    fixed here: real ones depend on the machine's load)."""
    timings = iter([(1.0, 10.0), (10.0, 1.0)])  # (direct ms, fft ms) of small, then large

    monkeypatch.setattr(specfx.measure, "compare", lambda baseline, candidate, budget_s, sync: next(timings))
    model, x = _TwoConvs().eval(), torch.randn(2, 8, 32, 32)
    report = specfx.explain(model, (x,), policy="measure")
    assert report.lowered == ["large"]
    assert report.kept["small"] == "direct conv measured faster (10 ms lowered vs 1 ms direct, timed)"


def test_default_profile_follows_the_inputs_device(monkeypatch):
    """Without ``profile=``, the rates come from the example inputs' device (the GPU
    defaults on CUDA, this machine's profile on the CPU)."""
    from specfx import api

    assert api.input_device([{"a": [3, torch.empty(1, device="meta")]}]) == torch.device("meta")
    assert api.input_device([3, "no tensor"]) == torch.device("cpu")
    asked = []
    marker = CostProfile(dense_direct_gflops=1e-3)  # so slow that every conv is lowered
    monkeypatch.setattr(api, "profile_for_device", lambda device: asked.append(device) or marker)
    conv = nn.Conv2d(2, 2, 3, padding=1)
    report = specfx.explain(conv, (torch.randn(1, 2, 8, 8),))
    assert asked == [torch.device("cpu")] and len(report.lowered) == 1
    assert specfx.explain(conv, (torch.randn(1, 2, 8, 8),), profile=CostProfile()).lowered == []
