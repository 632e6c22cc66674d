"""The ``specfx`` command: output, exit codes, and one-line errors for bad input.

A few runs go through real processes (``python -m specfx`` and the installed console
script); the error cases also run in-process through :func:`specfx.cli.main`, which is
what both call, to keep the suite fast.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
import textwrap

import pytest

from specfx.cli import EXIT_FAILED, EXIT_USAGE, _parser, main, settings_options
from specfx.cost_model import CostProfile
from specfx.passes import PIPELINE
from specfx.pipeline import Settings

CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "specfx"

MODELS = textwrap.dedent("""
    import sys

    import torch
    import torch.nn as nn


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 15, padding=7, groups=2)

        def forward(self, x):
            return torch.relu(self.conv(x))


    def good():
        return Net()


    def boom():
        raise RuntimeError("factory exploded")


    def not_a_module():
        return 3


    def exits():
        sys.exit(3)


    class Abort(BaseException):
        pass


    def aborts():
        raise Abort("gave up")


    def interrupted():
        raise KeyboardInterrupt


    class ExitsInForward(nn.Module):
        def forward(self, x):
            sys.exit("forward gave up")


    class TracedWrong(Net):
        # fx's Proxy is not a Tensor, so symbolic_trace records a reshape that fails when
        # the graph runs (after nodes whose values are freed); export traces with (fake)
        # tensors and skips it.
        def forward(self, x):
            x = torch.relu(x)
            if not isinstance(x, torch.Tensor):
                x = x.reshape(-1, 7)
            return super().forward(x)


    class TracingTalks(Net):
        def forward(self, x):
            if not isinstance(x, torch.Tensor):
                print("TracingTalks: traced", file=sys.stderr)
            return super().forward(x)
""")

# A stand-in for an installed module that torch or specfx imports (specfx's passes import
# networkx): if the CLI lets the working directory shadow it, this one runs and says so.
SHADOWING_NETWORKX = textwrap.dedent("""
    import pathlib
    pathlib.Path(__file__).with_name("networkx_was_imported").touch()
    raise ImportError("the working directory's networkx.py was imported")
""")


@pytest.fixture
def models(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory holding ``cli_test_models.py`` (a unique name: in-process runs import it)
    and ``notes.txt``, a file that is not Python."""
    (tmp_path / "cli_test_models.py").write_text(MODELS)
    (tmp_path / "notes.txt").write_text("x = 1\n")
    return tmp_path


@pytest.fixture
def in_models(models: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    """``models`` as the working directory of in-process runs, each importing the models
    afresh and leaving ``sys.path`` (which main() appends the directory to) as it was."""
    monkeypatch.chdir(models)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "cli_test_models", raising=False)
    return models


def run(command: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_one_line_error(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("specfx: error: ") and expected in lines[0], lines[0]


def test_module_diff_prints_the_rewrite_and_writes_html(models):
    result = run([sys.executable, "-m", "specfx", "diff", "cli_test_models:good", "--input", "1,2,16,16",
                  "--policy", "always", "--table", "--html", "report.html"], models)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "-        conv: \"f32[1, 2, 16, 16]\" = self.conv(x)" in result.stdout
    assert "+        lowered_conv_default: " in result.stdout
    assert any(line.split()[:2] == ["removed", "conv"] for line in result.stdout.splitlines())
    page = (models / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "lowered_conv_default" in page


def test_console_script_explains_a_model_file(models):
    assert CONSOLE_SCRIPT.exists(), "reinstall specfx (pip install -e .) to create the console script"
    result = run([str(CONSOLE_SCRIPT), "explain", str(models / "cli_test_models.py") + ":good",
                  "--input", "1,2,16,16", "--dtype", "float64"], models)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("specfx report")
    assert "Conv2d 2→2 k=15x15 depthwise" in result.stdout and "float64" in result.stdout


def test_module_reports_a_malformed_shape_on_one_line(models):
    result = run([sys.executable, "-m", "specfx", "diff", "cli_test_models:good", "--input", "1,2,x"], models)
    assert result.returncode == EXIT_USAGE
    assert_one_line_error(result.stderr, "malformed shape '1,2,x'")
    assert result.stdout == ""


def test_console_script_reports_a_missing_module_on_one_line(models):
    result = run([str(CONSOLE_SCRIPT), "diff", "no_such_module_here:build", "--input", "1,2,16,16"], models)
    assert result.returncode == EXIT_FAILED
    assert_one_line_error(result.stderr, "no module named 'no_such_module_here'")


@pytest.mark.parametrize("arguments, status, message", [
    (["diff", "cli_test_models:boom", "--input", "1,2,16,16"], EXIT_FAILED,
     "cli_test_models:boom() raised RuntimeError: factory exploded"),
    (["diff", "cli_test_models:not_a_module", "--input", "1,2,16,16"], EXIT_FAILED,
     "returned an object of type int, not a torch.nn.Module"),
    (["diff", "cli_test_models:missing", "--input", "1,2,16,16"], EXIT_FAILED, "has no attribute 'missing'"),
    (["diff", "missing_file.py:good", "--input", "1,2,16,16"], EXIT_FAILED, "no such file: missing_file.py"),
    (["diff", "cli_test_models", "--input", "1,2,16,16"], EXIT_USAGE, "must be given as module_or_path:factory"),
    (["diff", "cli_test_models:good", "--input", "1,-2"], EXIT_USAGE, "malformed shape"),
    (["diff", "cli_test_models:good"], EXIT_USAGE, "required: --input"),
    (["explain", "cli_test_models:good", "--input", "1,2,16,16", "--dtype", "float128"], EXIT_USAGE,
     "invalid choice: 'float128'"),
    (["explain", "cli_test_models:good", "--input", "1,3,16,16"], EXIT_FAILED, "raised on the example inputs"),
    ([], EXIT_USAGE, "required: command"),
    (["explain", "notes.txt:f", "--input", "1,2,16,16"], EXIT_FAILED,
     "cannot import notes.txt: not a Python file"),
    (["explain", "cli_test_models:good", "--input", "1,3,99999999999,99999999999"], EXIT_FAILED,
     "--input 1,3,99999999999,99999999999 would take"),
    (["explain", "cli_test_models:exits", "--input", "1,2,16,16"], EXIT_FAILED,
     "cli_test_models:exits() raised SystemExit: 3"),
    (["explain", "cli_test_models:aborts", "--input", "1,2,16,16"], EXIT_FAILED,
     "cli_test_models:aborts() raised Abort: gave up"),
    (["diff", "cli_test_models:ExitsInForward", "--input", "1,2,16,16"], EXIT_FAILED,
     "SystemExit: forward gave up"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(in_models, capsys, arguments, status, message):
    assert main(arguments) == status
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, message)
    assert captured.out == ""


def test_inputs_torch_cannot_allocate_are_one_line(in_models, monkeypatch, capsys):
    """Where the memory check cannot run (no sysconf), torch's own refusal is reported."""
    monkeypatch.setattr("specfx.cli._physical_memory", lambda: None)
    assert main(["explain", "cli_test_models:good", "--input", "1,3,99999999999,99999999999"]) == EXIT_FAILED
    assert_one_line_error(capsys.readouterr().err, "cannot allocate --input 1,3,99999999999,99999999999")


def test_interrupted_factory_is_one_line_and_status_130(in_models, capsys):
    assert main(["explain", "cli_test_models:interrupted", "--input", "1,2,16,16"]) == 130
    assert capsys.readouterr().err == "specfx: interrupted\n"


@pytest.mark.parametrize("command", ["explain", "diff"])
def test_empty_batch_works_or_fails_on_one_line(in_models, capsys, command):
    status = main([command, "cli_test_models:good", "--input", "0,2,16,16", "--policy", "always"])
    captured = capsys.readouterr()
    if status == 0:
        assert "Traceback" not in captured.err and captured.out
    else:
        assert status == EXIT_FAILED
        assert_one_line_error(captured.err, "")


@pytest.mark.parametrize("model", ["cli_test_models:good", "{models}/cli_test_models.py:good"])
def test_working_directory_does_not_shadow_installed_modules(models, model):
    """A ``networkx.py`` beside the user's models is not what ``import networkx`` finds,
    whether the models are named as a module or as a file; the models still are."""
    (models / "networkx.py").write_text(SHADOWING_NETWORKX)
    result = run([str(CONSOLE_SCRIPT), "explain", model.format(models=models), "--input", "1,2,16,16"], models)
    assert result.returncode == 0, result.stderr
    assert not (models / "networkx_was_imported").exists()
    assert "Conv2d 2→2 k=15x15 depthwise" in result.stdout


def test_module_named_like_the_standard_library_comes_from_the_working_directory(models):
    """``test`` is also a standard-library package: the one in the working directory is
    the one the user means."""
    (models / "test").mkdir()
    (models / "test" / "__init__.py").write_text("from cli_test_models import good\n")
    result = run([str(CONSOLE_SCRIPT), "explain", "test:good", "--input", "1,2,16,16"], models)
    assert result.returncode == 0, result.stderr
    assert "Conv2d 2→2 k=15x15 depthwise" in result.stdout


def test_failed_trace_is_a_capture_note_not_console_noise(in_models, capfd):
    """fx prints the traceback of a graph that fails shape propagation; when export then
    captures the model, that failure is one capture note and stderr stays empty."""
    assert main(["explain", "cli_test_models:TracedWrong", "--input", "1,2,16,16"]) == 0
    captured = capfd.readouterr()
    assert captured.err == ""
    notes = [line for line in captured.out.splitlines() if "note: symbolic_trace:" in line]
    assert len(notes) == 1, captured.out
    assert "the traced graph failed at node reshape: RuntimeError: shape '[-1, 7]' is invalid" in notes[0]
    assert notes[0].endswith("(fell back to export)")


def test_successful_trace_passes_on_what_the_model_writes(in_models, capfd):
    assert main(["explain", "cli_test_models:TracingTalks", "--input", "1,2,16,16"]) == 0
    assert capfd.readouterr().err == "TracingTalks: traced\n"


# --- flags generated from Settings ----------------------------------------------------------

@pytest.mark.parametrize("command", ["explain", "diff"])
def test_every_settings_field_has_a_flag(command):
    """Each field of Settings is a flag (its name with dashes); a flag left out leaves the
    field to its default."""
    help_text = _parser()._subparsers._group_actions[0].choices[command].format_help()
    for field in dataclasses.fields(Settings):
        assert "--" + field.name.replace("_", "-") in help_text, field.name
    assert settings_options(_parser().parse_args([command, "m:f", "--input", "1"])) == {}


def test_settings_flags_parse_to_their_fields(tmp_path):
    path = CostProfile(fft_gflops=3.0).save(tmp_path / "rates.json")
    args = _parser().parse_args(["diff", "m:f", "--input", "1", "--policy", "always", "--no-chains",
                                 "--spectral-activation", "poly", "--poly-degree", "3", "--profile", str(path)])
    assert settings_options(args) == {"policy": "always", "chains": False, "spectral_activation": "poly",
                                      "poly_degree": 3, "profile": CostProfile(fft_gflops=3.0)}
    assert settings_options(_parser().parse_args(["explain", "m:f", "--input", "1", "--chains"])) == {"chains": True}


@pytest.mark.parametrize("flags, message", [
    (["--policy", "fastest"], "argument --policy: invalid choice: 'fastest'"),
    (["--poly-degree", "two"], "argument --poly-degree: invalid int value: 'two'"),
    (["--profile", "missing.json"], "argument --profile: 'missing.json': FileNotFoundError: no cost profile at"),
])
def test_bad_settings_flags_are_usage_errors(in_models, capsys, flags, message):
    assert main(["explain", "cli_test_models:good", "--input", "1,2,16,16", *flags]) == EXIT_USAGE
    assert_one_line_error(capsys.readouterr().err, message)


def test_settings_flags_reach_the_optimization(in_models, capsys):
    assert main(["explain", "cli_test_models:good", "--input", "1,2,16,16", "--policy", "never"]) == 0
    out = capsys.readouterr().out
    assert "policy: 'never'" in out and "0 of 1 convolutions would lower" in out


def test_passes_lists_the_pipeline_with_requirements(capsys):
    assert main(["passes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0].rstrip(":") for line in lines] == [p.name for p in PIPELINE]
    assert lines[1].endswith("[requires plan_convs]")


def test_version_names_specfx_and_torch(capsys):
    import torch

    import specfx

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"specfx {specfx.__version__} (torch {torch.__version__})"
