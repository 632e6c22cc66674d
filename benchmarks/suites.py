"""The benchmark suites: each case is one convolution layer on one input shape.

Shapes follow the performance goals in the README: the RepLKNet depthwise layer, a
depthwise kernel-size sweep, fft-conv-pytorch's own 1D and 2D suites (B=2, 8→8, 'valid'),
wav2vec2's positional conv, and the convnet-benchmarks layers L1–L5.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Union

import torch
import torch.nn as nn


@dataclasses.dataclass(frozen=True)
class Case:
    """One conv layer on one input; ``x_value`` is what the plot's x axis shows."""

    suite: str
    label: str
    x_value: float
    input_shape: tuple[int, ...]
    in_channels: int
    out_channels: int
    kernel_size: int
    padding: Union[int, str] = 0
    groups: int = 1

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        rank = len(self.input_shape) - 2
        conv = getattr(nn, f"Conv{rank}d")(self.in_channels, self.out_channels, self.kernel_size,
                                            padding=self.padding, groups=self.groups)
        return conv.eval(), torch.randn(self.input_shape)


def _replknet(quick: bool) -> list[Case]:
    return [Case("replknet_dw31", "(4,384,32,32) k31", 31, (4, 384, 32, 32), 384, 384, 31, "same", 384)]


def _depthwise_sweep(quick: bool) -> list[Case]:
    ks = (7, 13, 15, 31) if quick else tuple(range(7, 32, 2))
    return [Case("depthwise_sweep", f"k{k}", k, (2, 64, 64, 64), 64, 64, k, "same", 64) for k in ks]


def _fftconv_2d(quick: bool) -> list[Case]:
    ks = (4, 16, 46) if quick else tuple(range(4, 47, 6))
    return [Case("fftconv_2d", f"k{k}", k, (2, 8, 512, 512), 8, 8, k) for k in ks]


def _fftconv_1d(quick: bool) -> list[Case]:
    ks = (64, 128, 512) if quick else tuple(range(64, 513, 64))
    return [Case("fftconv_1d", f"k{k}", k, (2, 8, 4096), 8, 8, k) for k in ks]


def _wav2vec2(quick: bool) -> list[Case]:
    frames = (499,) if quick else (499, 1499)
    return [Case("wav2vec2_posconv", f"{round(n / 50)}s ({n} frames)", n, (1, 768, n), 768, 768, 128, 64, 16)
            for n in frames]


def _convnet_layers(quick: bool) -> list[Case]:
    layers = [("L1", 3, 96, 128, 11), ("L2", 64, 128, 64, 9), ("L3", 128, 128, 32, 9),
              ("L4", 128, 128, 16, 7), ("L5", 384, 384, 13, 3)]
    if quick:
        layers = layers[1:2] + layers[3:4]
    return [Case("convnet_layers", name, i + 1, (8, cin, size, size), cin, cout, k)
            for i, (name, cin, cout, size, k) in enumerate(layers)]


SUITES: dict[str, Callable[[bool], list[Case]]] = {
    "replknet_dw31": _replknet,
    "depthwise_sweep": _depthwise_sweep,
    "fftconv_2d": _fftconv_2d,
    "fftconv_1d": _fftconv_1d,
    "wav2vec2_posconv": _wav2vec2,
    "convnet_layers": _convnet_layers,
}
