"""``spectral_conv``: a drop-in for ``F.conv1d/2d/3d`` that computes through the spectral ops."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F

from . import ops
from .geometry import PaddingArg, SpectralGeometry, expand, plan_geometry, resolve_padding
from .overlap_save import join_blocks, split_blocks
from .sample_selection import select_read_samples, selection_args, unread_mask


def conv_geometry(x: torch.Tensor, weight: torch.Tensor, stride: Union[int, Sequence[int]] = 1,
                  padding: PaddingArg = 0, dilation: Union[int, Sequence[int]] = 1,
                  padding_mode: str = "zeros") -> SpectralGeometry:
    """The FFT grid for ``F.convNd(x, weight, ...)`` (with ``nn.ConvNd``'s ``padding_mode``)."""
    rank = weight.dim() - 2
    stride, dilation = expand(stride, rank), expand(dilation, rank)
    kernel = list(weight.shape[2:])
    pads = resolve_padding(padding, kernel, dilation, stride)
    return plan_geometry(list(x.shape[-rank:]), kernel, stride, pads, dilation, padding_mode)


def spectral_conv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                  stride: Union[int, Sequence[int]] = 1, padding: PaddingArg = 0,
                  dilation: Union[int, Sequence[int]] = 1, groups: int = 1,
                  padding_mode: str = "zeros") -> torch.Tensor:
    """The convolution ``F.convNd`` computes, through FFTs; exact up to rounding.

    Accepts everything ``F.conv1d/2d/3d`` accepts, plus ``nn.ConvNd``'s ``padding_mode``.
    """
    geometry = conv_geometry(x, weight, stride, padding, dilation, padding_mode)
    return apply_geometry(x, weight, bias, geometry, groups)


def apply_geometry(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                   geometry: SpectralGeometry, groups: int) -> torch.Tensor:
    """Run the spectral ops for a planned geometry."""
    input_dim = x.dim()
    if geometry.pre_pad is not None:
        mode, pads = geometry.pre_pad
        x = F.pad(x, list(pads), mode=mode)
    if geometry.selection is not None:
        x = select_read_samples(x, *selection_args(geometry, unread_mask(geometry, x.device)))
    g, blocks = geometry, geometry.overlap_save
    if blocks is not None:
        x = split_blocks(x, blocks.left, blocks.right, blocks.window, blocks.block)
    y = ops.lowered_conv(x, weight, bias, list(g.in_size), list(g.fft_size), list(g.dilation), list(g.shift),
                         groups, list(g.out_size), list(g.stride), x.dtype)
    return y if blocks is None else join_blocks(y, blocks.count, blocks.out, input_dim)
