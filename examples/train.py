"""Train a large-kernel CNN through specfx, next to the same CNN in eager mode.

Run:  python examples/train.py

A lowered conv trains like the original: its backward runs in the frequency domain
(Mathieu, Henaff & LeCun, "Fast Training of Convolutional Networks through FFTs"): each
step transforms the input, the weight and the output gradient forward once each, and the
output, the input gradient and the weight gradient back once each; the weight spectrum is
computed once per step (the optimizer changes the weights) and shared by forward and
backward. The task is synthetic: noisy sinusoidal gratings, classified by orientation.
"""

from __future__ import annotations

import copy
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import specfx


class LargeKernelBlock(nn.Module):
    """A RepLKNet-style block: a 31x31 depthwise conv between 1x1 convs, with a residual."""

    def __init__(self, channels: int, kernel_size: int = 31) -> None:
        super().__init__()
        self.expand = nn.Conv2d(channels, channels, 1)
        self.large = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(F.gelu(self.large(self.expand(x))))


class LargeKernelNet(nn.Module):
    def __init__(self, channels: int = 32, blocks: int = 2, classes: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, stride=2, padding=1)
        self.blocks = nn.Sequential(*[LargeKernelBlock(channels) for _ in range(blocks)])
        self.head = nn.Linear(channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.stem(x)))
        return self.head(x.abs().mean(dim=(-2, -1)))


def gratings(gen: torch.Generator, n: int = 8, size: int = 64, classes: int = 4):
    """Noisy sinusoidal gratings with random frequency and phase, labelled by orientation."""
    labels = torch.randint(0, classes, (n,), generator=gen)
    theta = labels.float() * math.pi / classes
    freq = 0.05 + 0.1 * torch.rand(n, generator=gen)
    phase = 2 * math.pi * torch.rand(n, generator=gen)
    r = torch.arange(size, dtype=torch.float32)
    rows, cols = torch.meshgrid(r, r, indexing="ij")
    proj = cols * theta.cos()[:, None, None] + rows * theta.sin()[:, None, None]
    image = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    return image[:, None] + 0.5 * torch.randn(n, 3, size, size, generator=gen), labels


def train(model: nn.Module, batches) -> tuple[list[float], list[float]]:
    """Adam over the batches: the losses and each step's wall time (ms)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses, times = [], []
    for x, labels in batches:
        start = time.perf_counter()
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        times.append((time.perf_counter() - start) * 1e3)
        losses.append(loss.item())
    return losses, times


def main() -> None:
    torch.manual_seed(0)
    model = LargeKernelNet()
    gen = torch.Generator().manual_seed(0)
    batches = [gratings(gen) for _ in range(30)]

    fast = specfx.optimize(model, (batches[0][0],))  # the cost model lowers the 31x31 convs
    print(f"lowered: {', '.join(fast.specfx_report.lowered)}\n")

    eager_losses, eager_ms = train(copy.deepcopy(model), batches)
    fast_losses, fast_ms = train(fast, batches)
    print("step   eager loss   specfx loss")
    for step in [*range(0, len(batches), 5), len(batches) - 1]:
        print(f"{step:4d}   {eager_losses[step]:10.5f}   {fast_losses[step]:11.5f}")
    worst = max(abs(a - b) / abs(b) for a, b in zip(fast_losses, eager_losses))
    # Both runs round in fp32 (differently); training amplifies the differences from step
    # to step. In fp64 the two curves agree to ~1e-15 (tests/test_training.py).
    print(f"\nlargest relative difference of a step's loss: {worst:.1e} (fp32 rounding, amplified by training)")
    eager, optimized = statistics.median(eager_ms[1:]), statistics.median(fast_ms[1:])
    print(f"training step: eager {eager:.1f} ms, specfx {optimized:.1f} ms (median): {eager / optimized:.1f}x")


if __name__ == "__main__":
    main()
