"""``torch.export`` of a :func:`specfx.optimize` result: export, save, load, run.

The spectral ops are ``torch.library`` custom ops with fake implementations, so an
optimized module exports like any other; a saved program names them, so the process that
loads it must ``import specfx`` first (that registers them).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import assert_scaled_close

import specfx


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.depthwise = nn.Conv2d(3, 3, 13, padding=6, groups=3)
        self.reflect = nn.Conv2d(3, 4, 9, padding=4, padding_mode="reflect")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reflect(torch.relu(self.depthwise(x)))


@pytest.fixture(scope="module")
def optimized():
    """(model, fast, x): ``fast`` lowers both convs."""
    torch.manual_seed(0)
    model, x = Block().eval(), torch.randn(2, 3, 14, 14)
    fast = specfx.optimize(model, (x,), policy="always")
    assert fast.specfx_report.lowered == ["depthwise", "reflect"]
    return model, fast, x


def spectral_targets(gm: torch.fx.GraphModule) -> set[str]:
    return {str(n.target) for n in gm.graph.nodes if str(n.target).startswith("specfx.")}


def test_export_keeps_the_spectral_ops(optimized) -> None:
    model, fast, x = optimized
    program = torch.export.export(fast, (x,))
    # Each conv is one merged lowered_conv node (no chain reads its spectra).
    assert spectral_targets(program.graph_module) == {"specfx.lowered_conv.default"}
    with torch.no_grad():
        # The exported graph runs the same ops as ``fast``: equal up to op-order rounding.
        assert_scaled_close(program.module()(x), fast(x))
        assert_scaled_close(program.module()(x), model(x))


def test_export_with_a_dynamic_batch(optimized) -> None:
    """The FFT grid is fixed by the spatial size only, so the batch may be dynamic."""
    model, fast, x = optimized
    program = torch.export.export(fast, (x,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    other = torch.randn(5, *x.shape[1:])
    with torch.no_grad():
        assert_scaled_close(program.module()(other), model(other))


def test_save_load_round_trip(optimized, tmp_path: Path) -> None:
    model, fast, x = optimized
    path = tmp_path / "block.pt2"
    torch.export.save(torch.export.export(fast, (x,)), path)
    loaded = torch.export.load(path)
    assert spectral_targets(loaded.graph_module) == spectral_targets(torch.export.export(fast, (x,)).graph_module)
    with torch.no_grad():
        assert_scaled_close(loaded.module()(x), fast(x))


def test_load_in_a_fresh_process_needs_import_specfx(optimized, tmp_path: Path) -> None:
    model, fast, x = optimized
    path, inputs, outputs = tmp_path / "block.pt2", tmp_path / "x.pt", tmp_path / "y.pt"
    torch.export.save(torch.export.export(fast, (x,)), path)
    torch.save(x, inputs)
    code = f"""
        import torch
        try:
            torch.export.load({str(path)!r})
            print("loaded without specfx")
        except Exception:
            print("load failed without specfx")
        import specfx  # registers torch.ops.specfx.*
        program = torch.export.load({str(path)!r})
        torch.save(program.module()(torch.load({str(inputs)!r})), {str(outputs)!r})
        """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                            timeout=300, env=dict(os.environ))
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split("\n")[0] == "load failed without specfx"
    assert "specfx.lowered_conv" in result.stderr  # the op it could not resolve
    with torch.no_grad():
        assert_scaled_close(torch.load(outputs), fast(x))
