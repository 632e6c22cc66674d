"""The ``specfx`` command: output, exit codes, and one-line errors for bad input.

A few runs go through real processes (``python -m specfx`` and the installed console
script); the error cases also run in-process through :func:`specfx.cli.main`, which is
what both call, to keep the suite fast.
"""

from __future__ import annotations

import pathlib
import subprocess
import sys
import textwrap

import pytest

from specfx.cli import EXIT_FAILED, EXIT_USAGE, main

CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "specfx"

MODELS = textwrap.dedent("""
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
""")


@pytest.fixture
def models(tmp_path: pathlib.Path) -> pathlib.Path:
    """A directory holding ``cli_test_models.py`` (a unique name: in-process runs import it)."""
    (tmp_path / "cli_test_models.py").write_text(MODELS)
    return tmp_path


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
    assert "+        spectral_conv_default: " in result.stdout
    assert any(line.split()[:2] == ["removed", "conv"] for line in result.stdout.splitlines())
    page = (models / "report.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "spectral_conv_default" in page


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
])
def test_bad_input_is_one_line_and_a_non_zero_exit(models, monkeypatch, capsys, arguments, status, message):
    monkeypatch.chdir(models)
    monkeypatch.setattr(sys, "path", list(sys.path))  # main() puts the current directory on it
    monkeypatch.delitem(sys.modules, "cli_test_models", raising=False)
    assert main(arguments) == status
    captured = capsys.readouterr()
    assert_one_line_error(captured.err, message)
    assert captured.out == ""
