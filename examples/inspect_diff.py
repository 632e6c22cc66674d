"""Inspect what specfx did to a model: the graph diff as text, as a table, and as HTML.

Run:  python examples/inspect_diff.py [report.html]

The same from the command line (``build_model`` is the factory the CLI calls):

    specfx diff examples/inspect_diff.py:build_model --input 1,16,56,56 --table --html report.html
"""

from __future__ import annotations

import sys

import torch
import torch.nn as nn

import specfx


class LargeKernelBlock(nn.Module):
    """A RepLKNet-style block: BatchNorm, 31x31 depthwise conv, ReLU, 1x1 conv, residual."""

    def __init__(self, channels: int = 16, kernel_size: int = 31) -> None:
        super().__init__()
        self.norm = nn.BatchNorm2d(channels)
        self.large = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)
        self.project = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.project(torch.relu(self.large(self.norm(x))))


def build_model() -> nn.Module:
    """The factory the ``specfx`` command line calls."""
    return LargeKernelBlock().eval()


def main(html_path: str = "specfx_diff.html") -> None:
    torch.manual_seed(0)
    model = build_model()
    x = torch.randn(1, 16, 56, 56)

    fast = specfx.optimize(model, (x,))  # the cost model lowers the 31x31 conv, keeps the 1x1
    graph_diff = specfx.diff(model, fast)
    print(graph_diff.unified())
    print(graph_diff.table())
    for entry in graph_diff.per_pass():  # what each pass of the pipeline changed
        print(f"pass {entry.name}: {'modified' if entry.modified else 'unchanged'}")
    print(f"HTML report: {graph_diff.to_html(html_path)}")


if __name__ == "__main__":
    main(*sys.argv[1:2])
