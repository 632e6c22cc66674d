"""``torch.compile(model, backend="specfx")``: the entry point, the rewrite of Dynamo graphs,
weight-spectrum caching across calls, training, dynamic shapes, reports and trace artifacts.

Compiles are slow on CPU, so the models are tiny and each compiled model serves several
checks. Every model class has its own ``forward`` (Dynamo keeps its caches and its record
of seen shapes per code object, so sharing one would make tests depend on each other).
Outputs are compared with eager by :func:`assert_scaled_close` (fp32: 1e-5 of the
output's scale, ~10x the worst FFT-conv rounding error seen; a wrong result is off by
order 1).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_scaled_close

import specfx
from specfx.backend import MAX_COMPILED_REPORTS, TRACE_ARTIFACT, specfx_backend
from specfx.ops import SPECTRUM_CACHE


def compile_specfx(model: nn.Module, **kwargs) -> nn.Module:
    """``torch.compile`` with the specfx backend, lowering every conv it can."""
    return torch.compile(model, backend="specfx", options={"policy": "always"}, **kwargs)


class NewReports:
    """The reports compiled while the ``with`` block ran (told apart by identity: only the
    most recent reports are kept, so positions shift)."""

    def __enter__(self) -> list:
        self._before = specfx.compiled_reports()  # held, so that no id is reused
        self.reports: list = []
        return self.reports

    def __exit__(self, *exc) -> None:
        before = {id(report) for report in self._before}
        self.reports.extend(report for report in specfx.compiled_reports() if id(report) not in before)


def cache_counts() -> tuple[int, int]:
    return SPECTRUM_CACHE.hits, SPECTRUM_CACHE.misses


def run_python(code: str, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter; its stdout, or a failure with its stderr."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                            text=True, timeout=300, env={**os.environ, **(env or {})})
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout


# --- registration --------------------------------------------------------------------------

def test_entry_point_compiles_without_importing_specfx(tmp_path: Path) -> None:
    """A fresh interpreter finds the backend by name alone; the entry point registers it
    (once: registering again is a duplicate), and with TORCH_TRACE set, the graph diff is
    in the trace."""
    out = run_python("""
        import json, sys
        import torch, torch.nn as nn

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.conv = nn.Conv2d(2, 2, 9, padding=4, groups=2)

            def forward(self, x):
                return torch.relu(self.conv(x))

        torch.manual_seed(0)
        model, x = Net(), torch.randn(1, 2, 12, 12)
        imported_before = "specfx" in sys.modules
        compiled = torch.compile(model, backend="specfx", options={"policy": "always"})
        with torch.no_grad():
            actual, expected = compiled(x), model(x)
        error = ((actual - expected).abs().max() / expected.abs().max()).item()

        import specfx
        from torch._dynamo.backends.registry import register_backend
        try:
            register_backend(specfx.backend.specfx_backend, name="specfx")
            duplicate = None
        except AssertionError as err:
            duplicate = str(err)
        print(json.dumps({"imported_before": imported_before, "error": error, "duplicate": duplicate,
                          "lowered": [r.lowered for r in specfx.compiled_reports()]}))
        """, env={"TORCH_TRACE": str(tmp_path)})
    result = json.loads(out.strip().splitlines()[-1])
    assert result["imported_before"] is False
    assert result["error"] < 1e-5  # conftest's fp32 tolerance, relative to the output scale
    assert result["lowered"] == [["conv"]]
    assert result["duplicate"] == "duplicate name: specfx"
    trace = "".join(p.read_text() for p in tmp_path.iterdir() if p.is_file())
    assert f'"name": "{TRACE_ARTIFACT}"' in trace
    assert "+    lowered_conv_default = torch.ops.specfx.lowered_conv.default(" in trace
    assert "-    conv2d = torch.conv2d(" in trace


def test_import_does_not_register_the_backend() -> None:
    out = run_python("""
        import specfx, specfx.backend
        from torch._dynamo.backends.registry import _COMPILER_FNS, lookup_backend
        print("specfx" in _COMPILER_FNS, lookup_backend("specfx") is specfx.backend.specfx_backend)
        """)
    assert out.split() == ["False", "True"]


# --- options (resolved as optimize's arguments are: tests/test_settings.py) ----------------

def test_unknown_option_fails_the_compile() -> None:
    class OptionNet(nn.Conv1d):
        def forward(self, x):
            return super().forward(x) + 1

    compiled = torch.compile(OptionNet(1, 1, 3), backend="specfx", options={"fusion_level": "exact"})
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed, match="unknown specfx option.*'fusion_level'"):
        compiled(torch.randn(1, 1, 8))


def test_mode_is_passed_to_inductor(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.compile_fx as inductor

    seen = {}
    monkeypatch.setattr(inductor, "compile_fx",
                        lambda gm, inputs, config_patches=None: seen.setdefault("patches", config_patches))
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    specfx_backend(gm, [torch.randn(2)], mode="max-autotune-no-cudagraphs")
    assert seen["patches"] == torch._inductor.list_mode_options("max-autotune-no-cudagraphs")


def test_compiled_reports_keep_the_most_recent_and_can_be_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch._inductor.compile_fx as inductor

    monkeypatch.setattr(inductor, "compile_fx", lambda gm, inputs, config_patches=None: gm)
    gm = torch.fx.symbolic_trace(nn.Sequential(nn.ReLU()))
    specfx_backend(gm, [torch.randn(2)])
    first = specfx.compiled_reports()[-1]
    for _ in range(MAX_COMPILED_REPORTS):
        specfx_backend(gm, [torch.randn(2)])
    reports = specfx.compiled_reports()
    assert len(reports) == MAX_COMPILED_REPORTS
    assert all(report is not first for report in reports)
    specfx.clear_compiled_reports()
    assert specfx.compiled_reports() == []
    specfx_backend(gm, [torch.randn(2)])
    assert len(specfx.compiled_reports()) == 1


# --- the rewrite of Dynamo graphs, and weight-spectrum caching ------------------------------

class GraphForms(nn.Module):
    """The spellings a Dynamo graph holds: ``torch.conv2d`` with ``padding='same'``, a
    reflect-padded conv (a separate pad, then ``padding=0``), ``F.relu(inplace=True)``, and
    a functional ``F.conv1d`` on a plain parameter; all weights arrive as placeholders."""

    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(3, 3, 13, padding="same", groups=3)
        self.reflect = nn.Conv2d(3, 4, 9, padding=4, padding_mode="reflect")
        self.taps = nn.Parameter(torch.randn(4, 1, 11) / 11)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.reflect(F.relu(self.depthwise(x), inplace=True))
        z = F.conv1d(y.flatten(2), self.taps, padding=5, groups=4)
        return torch.relu(z).view_as(y)


@pytest.fixture(scope="module")
def forms():
    """(model, compiled, x, report), compiled and run once under no_grad."""
    torch.manual_seed(0)
    model, x = GraphForms().eval(), torch.randn(2, 3, 14, 14)
    compiled = compile_specfx(model)
    with NewReports() as reports, torch.no_grad():
        compiled(x)
    assert len(reports) == 1
    return model, compiled, x, reports[0]


def test_dynamo_graph_forms_are_lowered(forms) -> None:
    model, compiled, x, report = forms
    assert report.frontend == "dynamo"
    assert report.lowered == ["depthwise", "reflect", "z"]  # a functional conv is named by its node, str(report)
    assert "torch.ops.specfx.lowered_conv" in report.passes[-1].code
    assert "torch.conv" not in report.passes[-1].code
    with torch.no_grad():
        assert_scaled_close(compiled(x), model(x))


def test_weight_spectra_are_cached_across_calls(forms) -> None:
    model, compiled, x, report = forms
    calls, convs = 5, len(report.lowered)
    with torch.no_grad():
        compiled(x)
        hits, misses = cache_counts()
        for _ in range(calls):
            compiled(x)
    assert cache_counts() == (hits + calls * convs, misses)


def test_weight_update_is_followed(forms) -> None:
    model, compiled, x, report = forms
    with torch.no_grad():
        compiled(x)
        model.reflect.weight.mul_(-2.0)
        hits, misses = cache_counts()
        actual = compiled(x)
        # Only the updated weight's spectrum is recomputed.
        assert cache_counts() == (hits + len(report.lowered) - 1, misses + 1)
        assert_scaled_close(actual, model(x))


# --- training ------------------------------------------------------------------------------

class TrainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(2, 2, 9, padding=4, groups=2)
        self.dense = nn.Conv2d(2, 3, 7, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense(F.relu(self.depthwise(x)))


def test_training_matches_eager() -> None:
    torch.manual_seed(0)
    eager = TrainNet()
    model = TrainNet()
    model.load_state_dict(eager.state_dict())
    compiled = compile_specfx(model)
    x, target = torch.randn(2, 2, 12, 12), torch.randn(2, 3, 12, 12)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (eager, model)]
    for step in range(3):
        losses = []
        for net, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            loss = F.mse_loss(net(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
        # Each step's loss is computed with the weights the previous steps left: the
        # spectra follow them. The FFT's ~1e-6 relative rounding, carried through three
        # steps, stays far below the 1e-4 allowed; stale spectra would repeat a loss.
        torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=0)
    for got, want in zip(model.parameters(), eager.parameters()):
        assert_scaled_close(got, want, tol=1e-4)
    assert specfx.compiled_reports()[-1].lowered == ["depthwise", "dense"]


# --- autocast, graph breaks ------------------------------------------------------------------

class AutocastNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 11, padding=5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = self.conv(x)
        return y, y.float() * 2


def test_autocast_region_keeps_its_dtype() -> None:
    torch.manual_seed(0)
    model, x = AutocastNet(), torch.randn(2, 3, 12, 12)
    with NewReports() as reports, torch.no_grad():
        actual = compile_specfx(model)(x)
    expected = model(x)
    assert reports[0].lowered == ["conv"]
    assert actual[0].dtype == expected[0].dtype == torch.bfloat16
    # specfx computes from the fp32 operands, eager autocast from bf16-rounded ones: they
    # agree to bf16 precision (conftest's bf16 tolerance, 1.6e-2 of the scale).
    assert_scaled_close(actual[0], expected[0])
    assert_scaled_close(actual[1], expected[1], tol=1.6e-2)


class BreakNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv1d(2, 2, 17, padding=8, groups=2)
        self.second = nn.Conv1d(2, 2, 17, padding=8, groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.first(x)
        torch._dynamo.graph_break()
        return self.second(x)


def test_each_graph_of_a_graph_break_is_rewritten() -> None:
    torch.manual_seed(0)
    model, x = BreakNet(), torch.randn(2, 2, 40)
    explained = torch._dynamo.explain(model)(x)
    with NewReports() as reports, torch.no_grad():
        actual = compile_specfx(model)(x)
    assert len(reports) == explained.graph_count == 2
    assert [r.lowered for r in reports] == [["first"], ["second"]]
    with torch.no_grad():
        assert_scaled_close(actual, model(x))


def test_spectral_ops_add_no_graph_breaks() -> None:
    model = nn.Sequential(nn.Conv2d(2, 2, 9, padding=4, groups=2), nn.ReLU(), nn.Conv2d(2, 2, 9, padding=4))
    fast = specfx.optimize(model, (torch.randn(1, 2, 12, 12),), policy="always")
    assert len(fast.specfx_report.lowered) == 2
    explained = torch._dynamo.explain(fast)(torch.randn(1, 2, 12, 12))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)


# --- dynamic shapes --------------------------------------------------------------------------

class ShapeChangeNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 9, padding="same", groups=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(x))


class DynamicNet(ShapeChangeNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))


class StaticNet(ShapeChangeNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))


SHAPES = [(2, 2, 12, 12), (3, 2, 12, 12), (3, 2, 15, 13)]


def run_shapes(model: nn.Module, compiled: nn.Module, shapes: list) -> None:
    with torch.no_grad():
        for shape in shapes:
            x = torch.randn(shape)
            assert_scaled_close(compiled(x), model(x))


def test_shape_changes_recompile_or_fall_back() -> None:
    """Dynamo's default: a batch change recompiles with a dynamic batch (still lowered),
    a spatial change with dynamic spatial sizes (kept direct, with the reason)."""
    torch.manual_seed(0)
    model = ShapeChangeNet()
    with NewReports() as reports:
        run_shapes(model, compile_specfx(model), SHAPES)
    assert [r.lowered for r in reports] == [["conv"], ["conv"], []]
    assert "input (s" in reports[1].decisions[0].description  # a symbolic batch size
    assert reports[2].kept["conv"].startswith("dynamic spatial size")


def test_dynamic_true_falls_back_to_direct_convs() -> None:
    torch.manual_seed(0)
    model = DynamicNet()
    with NewReports() as reports:
        run_shapes(model, compile_specfx(model, dynamic=True), SHAPES)
    assert reports and all(r.kept["conv"].startswith("dynamic spatial size") for r in reports)


def test_static_shapes_plan_an_fft_size_per_shape() -> None:
    torch.manual_seed(0)
    model = StaticNet()
    with NewReports() as reports:
        run_shapes(model, compile_specfx(model, dynamic=False), [SHAPES[0], SHAPES[2]])
    assert [r.lowered for r in reports] == [["conv"]] * 2
    small, large = (r.decisions[0].cost.fft_size for r in reports)
    assert small != large and min(small) >= 12 and min(large) >= 13


# --- a Hugging Face model ----------------------------------------------------------------------

def test_wav2vec2_positional_conv() -> None:
    """Wav2Vec2's k=128 grouped positional conv (weight-normed, so its weight is computed
    in the graph) through the backend, with the rest of the model compiled by Inductor."""
    transformers = pytest.importorskip("transformers")
    config = transformers.Wav2Vec2Config(
        hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        conv_dim=(8, 8), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=128,
        num_conv_pos_embedding_groups=4)
    torch.manual_seed(0)
    model, x = transformers.Wav2Vec2Model(config).eval(), torch.randn(1, 3000)
    with NewReports() as reports, torch.no_grad():
        actual = compile_specfx(model)(x).last_hidden_state
        expected = model(x).last_hidden_state
    lowered = [name for r in reports for name in r.lowered]
    assert "encoder.pos_conv_embed.conv" in lowered, "\n".join(map(str, reports))
    assert_scaled_close(actual, expected)
