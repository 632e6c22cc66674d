"""Verification judges accuracy, not agreement with fp32 rounding: past the tolerance it
compares both modules with a float64 run of the original. And the report it writes
survives ``copy.deepcopy``; meta-device examples are reported unverified."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn as nn

import specfx
from specfx import node_meta


class Cancels(nn.Module):
    """A large offset added and removed around a conv: fp32 rounds the result to the
    offset's ulp (~1e-3 of the output's scale here), so the original and any exact
    rewrite of it disagree by about that much, beyond the fp32 tolerance of 1e-4."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 11, padding=5, groups=3)

    def forward(self, x):
        return (self.conv(x) + 1e4) - 1e4


def test_beyond_tolerance_but_as_accurate_as_the_original_is_accepted():
    torch.manual_seed(0)
    model, x = Cancels().eval(), torch.randn(2, 3, 32, 32)
    fast = specfx.optimize(model, (x,), policy="always")
    report = fast.specfx_report
    assert report.verified_error > report.verified_tolerance
    assert report.verification_notes and "float64" in report.verification_notes[0]
    assert "verification:" in str(report)


def test_beyond_tolerance_and_less_accurate_than_the_original_is_rejected():
    """The same offset model with the rewrite made measurably worse than eager: a pass
    scales the conv by 1.003, an error of 3e-3 of the output scale, about ten times the
    original's own (its rounding to the offset's ulp) and past ACCURACY_SLACK times it."""
    from torch.fx.passes.infra.pass_base import PassResult

    torch.manual_seed(0)
    model, x = Cancels().eval(), torch.randn(2, 3, 32, 32)

    def perturb(gm, ctx):
        for node in list(gm.graph.nodes):
            if node.target is torch.ops.specfx.lowered_conv.default:
                with gm.graph.inserting_after(node):
                    worse = gm.graph.call_function(torch.mul, (node, 1.0 + 3e-3))
                node.replace_all_uses_with(worse, delete_user_cb=lambda user: user is not worse)
                # the node that now computes the conv's output, as a rewrite records it
                for key in (node_meta.LOWERED_FROM, node_meta.REPLACES):
                    worse.meta[key] = node.meta.pop(key)
        return PassResult(gm, True)

    pipeline = list(specfx.passes.PIPELINE) + [
        specfx.pipeline.RegisteredPass("perturb", perturb, analysis=False, doc="test: 0.3% error")]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(specfx.passes, "PIPELINE", pipeline)
        with pytest.raises(specfx.VerificationError, match="lowered from conv 'conv'"):
            specfx.optimize(model, (x,), policy="always")


def test_output_of_exact_zeros_is_judged_through_the_lowered_conv():
    """An output that slices out positions no kernel tap reaches is exactly zero in eager;
    the FFT conv's rounding there (~1e-9) is infinitely many times its scale, yet the
    lowered conv agrees with the original at its own output's scale."""

    class SlicesZeros(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv1d(1, 1, 12, padding="same", dilation=3, bias=False)

        def forward(self, x):
            return self.conv(x)[..., :1]

    torch.manual_seed(0)
    fast = specfx.optimize(SlicesZeros().eval(), (torch.randn(1, 1, 2),), policy="always")
    assert "grows at node" in fast.specfx_report.verification_notes[0]


def test_explicit_tolerance_is_applied_as_given():
    torch.manual_seed(0)
    with pytest.raises(specfx.VerificationError):
        specfx.optimize(Cancels().eval(), (torch.randn(2, 3, 32, 32),), policy="always", verify_tol=1e-4)


def test_report_survives_deepcopy_and_pickle():
    model, x = nn.Sequential(nn.Conv2d(3, 3, 11, padding=5)).eval(), torch.randn(1, 3, 24, 24)
    fast = specfx.optimize(model, (x,), policy="always")
    copied = copy.deepcopy(fast)
    assert str(copied.specfx_report) == str(fast.specfx_report)
    assert copied.specfx_report is not fast.specfx_report
    assert str(copy.deepcopy(copied).specfx_report) == str(fast.specfx_report)
    assert str(pickle.loads(pickle.dumps(fast)).specfx_report) == str(fast.specfx_report)


def test_meta_device_example_is_optimized_and_reported_unverified():
    model = nn.Sequential(nn.Conv2d(4, 4, 15, padding=7)).to("meta")
    x = torch.empty(2, 4, 32, 32, device="meta")
    fast = specfx.optimize(model, (x,), policy="always")
    report = fast.specfx_report
    assert report.lowered == ["0"]
    assert report.verified_error is None
    assert any("meta" in note for note in report.verification_notes)
    assert fast(x).shape == (2, 4, 32, 32)
