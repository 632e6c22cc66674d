"""specfx inside ``torch.compile``, and an exported optimized model.

    python examples/compile_backend.py
    TORCH_TRACE=/tmp/trace python examples/compile_backend.py   # then: tlparse /tmp/trace/*

1. ``torch.compile(model, backend="specfx")``: the backend is found through specfx's
   ``torch_dynamo_backends`` entry point, so it needs no ``import specfx``. Each graph
   Dynamo captures goes through specfx's passes, then through Inductor.
2. Its reports: ``specfx.compiled_reports()``; with ``TORCH_TRACE`` set, each graph's diff
   is also in the trace, as the artifact ``specfx_graph_diff``.
3. Training through the compiled model: the spectral ops have autograd formulas, and the
   weight spectra follow every optimizer step.
4. ``torch.export`` of a :func:`specfx.optimize` result, saved and loaded. A program that
   holds specfx's ops can only be loaded after ``import specfx`` (which registers them).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class LargeKernelBlock(nn.Module):
    """A RepLKNet-style block: a 31x31 depthwise conv between 1x1 convs, with a residual."""

    def __init__(self, channels: int = 32, kernel_size: int = 31) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, channels, 1)
        self.large = nn.Conv2d(channels, channels, kernel_size, padding="same", groups=channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(F.relu(self.large(self.expand(x)), inplace=True))


def median_ms(fn, x: torch.Tensor, repeats: int = 5) -> float:
    """Median wall time of ``fn(x)`` in milliseconds, after one warm-up call."""
    fn(x)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(x)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def inference() -> None:
    torch.manual_seed(0)
    model, x = LargeKernelBlock().eval(), torch.randn(4, 32, 48, 48)
    compiled = torch.compile(model, backend="specfx")  # options={"policy": "always"} lowers every conv
    with torch.no_grad():
        error = relative_error(compiled(x), model(x))

    import specfx  # only for the reports: torch.compile found the backend without it

    print(specfx.compiled_reports()[-1])
    print(f"max |compiled - eager| / max |eager| = {error:.1e}")
    assert error < 1e-4
    with torch.no_grad():
        eager, fast = median_ms(model, x), median_ms(compiled, x)
    print(f"eager {eager:.1f} ms, backend='specfx' {fast:.1f} ms: {eager / fast:.1f}x\n")


def training() -> None:
    torch.manual_seed(0)
    eager, model = LargeKernelBlock(8, 15), LargeKernelBlock(8, 15)
    model.load_state_dict(eager.state_dict())
    compiled = torch.compile(model, backend="specfx", options={"policy": "always"})
    x, target = torch.randn(2, 8, 24, 24), torch.randn(2, 8, 24, 24)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (eager, model)]
    for step in range(3):
        losses = []
        for net, optimizer in zip((eager, compiled), optimizers):
            optimizer.zero_grad()
            loss = F.mse_loss(net(x), target)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        print(f"step {step}: loss eager {losses[0]:.6f}, backend='specfx' {losses[1]:.6f}")
    print()


def export_round_trip() -> None:
    import specfx  # registers torch.ops.specfx.*, which loading the program below needs

    torch.manual_seed(0)
    model, x = LargeKernelBlock().eval(), torch.randn(1, 32, 48, 48)
    fast = specfx.optimize(model, (x,))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "block.pt2"
        torch.export.save(torch.export.export(fast, (x,)), path)
        loaded = torch.export.load(path)
    with torch.no_grad():
        error = relative_error(loaded.module()(x), fast(x))
    print(f"exported, saved and loaded {fast.specfx_report.lowered}: max difference {error:.1e}")
    assert error < 1e-5


if __name__ == "__main__":
    inference()
    training()
    export_round_trip()
