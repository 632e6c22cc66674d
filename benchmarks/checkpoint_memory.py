"""Bytes kept for the backward, with and without activation checkpointing, eager and
optimized (every conv lowered), on quickstart's LargeKernelNet.

    python benchmarks/checkpoint_memory.py

Counts what autograd saves for the backward (``saved_tensors_hooks``) in one training
forward: a deterministic figure, unlike a process's peak memory on a shared machine.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))
import specfx  # noqa: E402
from quickstart import LargeKernelNet  # noqa: E402


class Checkpointed(nn.Module):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.inner, x, use_reentrant=False)


def saved_mib(model: nn.Module, x: torch.Tensor) -> float:
    sizes = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        sizes.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).sum()
    loss.backward()
    return sum(sizes) / 2**20


def main() -> None:
    torch.manual_seed(0)
    model, x = LargeKernelNet(channels=64, blocks=2), torch.randn(8, 3, 64, 64)
    fast = specfx.optimize(model, (x,), policy="always")
    print("LargeKernelNet(64 channels, 2 blocks), batch 8, 64x64; MiB saved for the backward")
    for name, m in (("eager", model), ("specfx (every conv lowered)", fast)):
        print(f"  {name:28s} {saved_mib(m, x):6.1f} plain, {saved_mib(Checkpointed(m), x):5.1f} checkpointed")


if __name__ == "__main__":
    main()
