"""Front ends: ``symbolic_trace`` first, ``torch.export`` when it fails, clear errors when
neither can capture the model; captured graphs carry shapes, keep the original's state,
and what capture runs leaves no trace on the model.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn

import specfx
from conftest import assert_scaled_close
from specfx.canonical import find_conv_sites, tensor_info
from specfx.capture import capture


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


class ShapeBranch(nn.Module):
    """Python control flow on a shape: symbolic_trace refuses it, export specializes it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 7, padding=3, groups=4)
        self.proj = nn.Conv2d(4, 6, 3)

    def forward(self, x):
        if x.shape[-1] > 8:
            x = self.conv(x)
        return self.proj(torch.relu(x))


class DataBranch(nn.Module):
    """Python control flow on a tensor's value: neither front end can capture it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 5, padding=2)

    def forward(self, x):
        if x.sum() > 0:
            return self.conv(x)
        return -self.conv(x)


def test_fallback_to_export():
    model, x = ShapeBranch(), torch.randn(2, 4, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always")
    report = fast.specfx_report
    assert report.frontend == "export"
    assert report.lowered == ["conv", "proj"]  # module paths from nn_module_stack
    assert report.kept == {}
    # why symbolic_trace was not used is in the report
    (note,) = report.capture_notes
    assert note.startswith("symbolic_trace: TraceError") and "control flow" in note
    assert note in str(report)
    assert_scaled_close(fast(x), model(x))
    # the branch was taken for this shape; another batch size runs the same graph
    x3 = torch.randn(3, 4, 12, 12)
    assert_scaled_close(fast(x3), model(x3))


def test_explain_falls_back_too():
    report = specfx.explain(ShapeBranch(), (torch.randn(2, 4, 12, 12),), policy="always")
    assert report.frontend == "export"
    assert report.lowered == ["conv", "proj"]
    assert report.capture_notes


def test_forced_symbolic_trace_names_the_cause():
    with pytest.raises(specfx.CaptureError) as info:
        specfx.optimize(ShapeBranch(), (torch.randn(2, 4, 12, 12),), frontend="symbolic_trace")
    message = str(info.value)
    assert "ShapeBranch" in message
    assert "symbolic_trace: TraceError" in message and "control flow" in message
    assert "export" not in message


def test_nothing_captures():
    model, x = DataBranch(), torch.randn(2, 4, 8, 8)
    with pytest.raises(specfx.CaptureError) as info:
        specfx.optimize(model, (x,))
    lines = str(info.value).splitlines()
    assert "DataBranch" in lines[0]
    assert any(line.strip().startswith("symbolic_trace: TraceError") for line in lines[1:])
    assert any(line.strip().startswith("export: ") and "data-dependent" in line for line in lines[1:])

    with pytest.raises(specfx.CaptureError) as info:
        specfx.explain(model, (x,), frontend="export")
    message = str(info.value)
    assert "export: " in message and "symbolic_trace" not in message


def test_capture_error_is_a_specfx_error():
    assert issubclass(specfx.CaptureError, specfx.SpecfxError)
    assert issubclass(specfx.ExampleInputError, specfx.SpecfxError)
    assert issubclass(specfx.ExampleInputError, ValueError)


def test_unknown_frontend():
    with pytest.raises(ValueError, match="frontend"):
        capture(nn.Conv2d(1, 1, 1), (torch.randn(1, 1, 2, 2),), "dynamo")


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_captured_graph_has_shapes(frontend):
    model = nn.Sequential(nn.Conv2d(3, 5, 3, padding=1), nn.ReLU(), nn.Flatten(2), nn.Conv1d(5, 5, 3))
    x = torch.randn(2, 3, 6, 7)
    gm, used = capture(copy.deepcopy(model), (x,), frontend)
    assert used == frontend
    sites = find_conv_sites(gm)
    assert [site.name for site in sites] == ["0", "3"]
    assert [site.rank for site in sites] == [2, 1]
    shapes = [tuple(tensor_info(site.input)[0]) for site in sites]
    assert shapes == [(2, 3, 6, 7), (2, 5, 42)]
    assert all(tensor_info(site.input)[1] == torch.float32 for site in sites)


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_structured_inputs_and_outputs(frontend):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 5, padding=2)
            self.b = nn.Conv1d(2, 4, 9, padding=4)

        def forward(self, image, signal):
            return {"image": self.a(image), "both": (self.b(signal), self.a(image).mean())}

    model = TwoInputs()
    inputs = (torch.randn(2, 3, 10, 10), torch.randn(2, 2, 20))
    fast = specfx.optimize(model, inputs, policy="always", frontend=frontend)
    report = fast.specfx_report
    assert report.frontend == frontend
    assert sorted(report.lowered) == ["a", "a#2", "b"]
    actual, expected = fast(*inputs), model(*inputs)
    assert actual.keys() == expected.keys()
    assert_scaled_close(actual["image"], expected["image"])
    assert_scaled_close(actual["both"][0], expected["both"][0])
    assert_scaled_close(actual["both"][1], expected["both"][1])


# --- export specifics ----------------------------------------------------------------------

def test_export_batch_free_spatial_fixed():
    model = nn.Sequential(nn.Conv2d(3, 4, 9, padding=4, groups=1), nn.Flatten(1), nn.Linear(4 * 10 * 10, 2))
    x = torch.randn(2, 3, 10, 10)
    fast = specfx.optimize(model, (x,), policy="always", frontend="export")
    assert fast.specfx_report.lowered == ["0"]
    for batch in (1, 2, 5):
        xb = torch.randn(batch, 3, 10, 10)
        assert_scaled_close(fast(xb), model(xb))
    with pytest.raises(ValueError, match=r"(?s)\(2, 3, 10, 10\).*\(2, 3, 12, 10\).*specfx\.optimize again"):
        fast(torch.randn(2, 3, 12, 10))
    # the input check survives copies, and a second optimize (which re-exports)
    again = specfx.optimize(copy.deepcopy(fast), (x,), policy="always")
    assert again.specfx_report.decisions == []
    x4 = torch.randn(4, 3, 10, 10)
    assert_scaled_close(again(x4), model(x4))
    with pytest.raises(ValueError, match="specfx.optimize again"):
        again(torch.randn(2, 3, 12, 10))


def test_export_unbatched_and_batch_one_examples():
    # an unbatched example: its leading dim is the channels, which must stay fixed
    model = nn.Sequential(nn.Conv1d(4, 4, 7, padding=3))
    x = torch.randn(4, 16)
    fast = specfx.optimize(model, (x,), policy="always", frontend="export")
    assert_scaled_close(fast(x), model(x))
    with pytest.raises(ValueError, match="specfx.optimize again"):
        fast(torch.randn(3, 4, 16))
    # a batch-1 example: export specializes size-1 dims, so the batch is fixed too
    x1 = torch.randn(1, 4, 16)
    fast = specfx.optimize(model, (x1,), policy="always", frontend="export")
    assert_scaled_close(fast(x1), model(x1))
    with pytest.raises(ValueError, match=r"captured with torch.export"):
        fast(torch.randn(2, 4, 16))


def test_export_model_that_needs_fixed_batch():
    class FixedBatch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 5, padding=2)

        def forward(self, x):
            return self.conv(x).reshape(6, -1)  # only valid for a batch of 3

    model, x = FixedBatch(), torch.randn(3, 2, 10)
    fast = specfx.optimize(model, (x,), policy="always", frontend="export")
    assert fast.specfx_report.lowered == ["conv"]
    assert_scaled_close(fast(x), model(x))


# --- capture leaves no trace -----------------------------------------------------------------

class TrainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 5, padding=2)
        self.bn = nn.BatchNorm2d(6)
        self.drop = nn.Dropout(0.3)
        self.dw = nn.Conv2d(6, 6, 9, padding=4, groups=6)

    def forward(self, x):
        return self.dw(self.drop(self.bn(self.conv(x))))


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_capture_and_verify_leave_no_trace(frontend):
    model = TrainNet().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 10, 10)
    rng = torch.get_rng_state()
    fast = specfx.optimize(model, (x,), policy="always", frontend=frontend)
    assert fast.specfx_report.lowered == ["conv", "dw"]
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is not consumed
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name]), name
    # nor were the optimized module's own statistics advanced by capture or verification
    for name, value in fast.state_dict().items():
        assert torch.equal(value, before[name]), name

    # in train mode, the optimized module updates its statistics as the original does
    eager = copy.deepcopy(model)
    torch.manual_seed(5)
    actual = fast(x)
    torch.manual_seed(5)
    expected = eager(x)
    assert_scaled_close(actual, expected)
    assert_scaled_close(fast.get_buffer("bn.running_mean"), eager.bn.running_mean)
    assert_scaled_close(fast.get_buffer("bn.running_var"), eager.bn.running_var)
    assert int(fast.get_buffer("bn.num_batches_tracked")) == 1


def test_eval_mode_capture_with_export():
    model = TrainNet().eval()
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 10, 10)
    fast = specfx.optimize(model, (x,), policy="always", frontend="export")
    assert_scaled_close(fast(x), model(x))
    assert torch.equal(fast(x), fast(x))  # dropout is off


def test_capture_shares_no_tensors_with_the_model():
    model, x = TrainNet(), torch.randn(1, 3, 8, 8)
    for frontend in ("symbolic_trace", "export"):
        fast = specfx.optimize(model, (x,), policy="always", frontend=frontend)
        model_tensors = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
        assert not any(t.data_ptr() in model_tensors for t in [*fast.parameters(), *fast.buffers()])


def test_non_persistent_buffers_survive_copies():
    class WithBuffers(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv1d(2, 2, 5)
            self.register_buffer("window", torch.hann_window(8), persistent=False)
            self.register_buffer("gain", torch.tensor(2.0))

        def forward(self, x):
            return self.conv(x * self.window) * self.gain

    model, x = WithBuffers(), torch.randn(2, 2, 8)
    keys = list(model.state_dict())
    assert "window" not in keys
    for frontend in ("symbolic_trace", "export"):
        fast = specfx.optimize(model, (x,), policy="always", frontend=frontend)
        assert list(fast.state_dict()) == keys
        assert list(copy.deepcopy(fast).state_dict()) == keys
        assert torch.equal(fast.get_buffer("window"), model.window)
        assert_scaled_close(fast(x), model(x))


def test_graph_module_input():
    # an already-traced model is captured again as is
    model = nn.Sequential(nn.Conv2d(2, 3, 5, padding=2), nn.ReLU())
    traced = fx.symbolic_trace(model)
    x = torch.randn(1, 2, 8, 8)
    fast = specfx.optimize(traced, (x,), policy="always")
    assert fast.specfx_report.frontend == "symbolic_trace"
    assert fast.specfx_report.lowered == ["0"]
    assert_scaled_close(fast(x), model(x))
