"""``specfx spectrum``: the per-layer operator-norm table, its files, and one-line errors.

One run goes through the installed console script; the rest call :func:`specfx.cli.main`
in-process, which is what the script calls.
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
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular")
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            x = torch.relu(self.down(torch.relu(self.conv(x))))
            return self.head(x.mean(dim=(-2, -1)))


    class Normalized(Net):
        def __init__(self):
            super().__init__()
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.norm(super().forward(x).repeat(1, 2))


    def good():
        return Net()


    def boom():
        raise RuntimeError("factory exploded")
""")


@pytest.fixture
def in_models(tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> pathlib.Path:
    (tmp_path / "spectrum_test_models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.delitem(sys.modules, "spectrum_test_models", raising=False)
    return tmp_path


def assert_one_line_error(stderr: str, expected: str) -> None:
    assert "Traceback" not in stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("specfx: error: ") and expected in lines[0], lines[0]


def test_console_script_prints_the_table(in_models):
    assert CONSOLE_SCRIPT.exists(), "reinstall specfx (pip install -e .) to create the console script"
    result = subprocess.run([str(CONSOLE_SCRIPT), "spectrum", "spectrum_test_models:good", "--input", "1,3,8,8"],
                            cwd=in_models, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("specfx spectrum (front end: symbolic_trace, 3 layers")
    assert lines[1] == "  [conv  ] conv: Conv2d 3→4 k=3x3 p=1 zeros on 8x8"
    assert "[conv  ] down: Conv2d 4→4 k=3x3 s=2x2 p=1 circular on 8x8" in lines[3]
    assert "exact: periodic blocks 8x8" in lines[4]
    assert lines[-1].startswith("  network Lipschitz upper bound: ")
    assert result.stderr == ""


def test_html_plot_and_method(in_models, capsys):
    assert main(["spectrum", "spectrum_test_models:good", "--input", "1,3,8,8", "--method", "bounds",
                 "--html", "norms.html", "--plot", "sv.png"]) == 0
    captured = capsys.readouterr()
    assert "Lanczos steps" in captured.out
    assert captured.err.splitlines() == ["specfx: wrote norms.html", "specfx: wrote sv.png"]
    assert "<h2>Operator norms</h2>" in (in_models / "norms.html").read_text(encoding="utf-8")
    assert (in_models / "sv.png").read_bytes()[:4] == b"\x89PNG"


def test_an_unknown_network_bound_is_output_not_an_error(in_models, capsys):
    assert main(["spectrum", "spectrum_test_models:Normalized", "--input", "1,3,8,8"]) == 0
    out = capsys.readouterr().out
    assert "network Lipschitz upper bound: unknown (node repeat: no Lipschitz rule for method .repeat())" in out


@pytest.mark.parametrize("arguments, status, message", [
    (["spectrum", "spectrum_test_models:boom", "--input", "1,3,8,8"], EXIT_FAILED,
     "spectrum_test_models:boom() raised RuntimeError: factory exploded"),
    (["spectrum", "spectrum_test_models:good", "--input", "1,2,8,8"], EXIT_FAILED, "could not capture Net"),
    (["spectrum", "spectrum_test_models:good"], EXIT_USAGE, "required: --input"),
    (["spectrum", "spectrum_test_models:good", "--input", "1,3,8,8", "--method", "fast"], EXIT_USAGE,
     "invalid choice: 'fast'"),
    (["spectrum", "spectrum_test_models:good", "--input", "1,3,x"], EXIT_USAGE, "malformed shape '1,3,x'"),
    (["spectrum", "spectrum_test_models:good", "--input", "1,3,8,8", "--html", "no/such/dir/r.html"], EXIT_FAILED,
     "cannot write no/such/dir/r.html"),
])
def test_bad_input_is_one_line_and_a_non_zero_exit(in_models, capsys, arguments, status, message):
    assert main(arguments) == status
    assert_one_line_error(capsys.readouterr().err, message)
