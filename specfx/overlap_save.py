"""Overlap-save blocking of long 1D convolutions.

A conv whose output is much longer than its kernel can run as many short convs: output
block ``j`` (``block`` samples) reads the ``window = block + span − 1`` padded input
samples from ``j·block``, so the input is cut into overlapping windows that become extra
batch rows, each window goes through the spectral ops at an FFT size of about
``window`` (not the whole signal's), and the blocks' outputs are laid end to end. Exact:
every output sample is computed from exactly the samples it reads.

Why: the weight spectrum has one entry per frequency bin of the FFT size. For a wide conv
on a long signal at batch 1 (wav2vec2's positional conv: 768 channels in 16 groups, k=128,
1499 frames) that is ~12x the weight's bytes, recomputed every training step and read in
full by every per-frequency product; at the window's size it is ~2x, and the blocks are
the per-frequency GEMM's M dimension.

The planning (:class:`specfx.geometry.OverlapSave`) is in :mod:`specfx.geometry`; these
are the two reshapes a lowered graph runs around the spectral ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def split_blocks(x: torch.Tensor, left: int, right: int, window: int, block: int) -> torch.Tensor:
    """``(N, C, L)`` → ``(N·count, C, window)``: the zero-padded input's overlapping
    windows, one batch row per block (block-major within each sample). An unbatched
    ``(C, L)`` input gives ``(count, C, window)``, as a batch of one would."""
    batched = x if x.dim() == 3 else x.unsqueeze(0)
    windows = F.pad(batched, [left, right]).unfold(-1, window, block)  # (N, C, count, window)
    n, channels, count, _ = windows.shape
    # The row count is spelled out: a -1 is ambiguous for an empty batch.
    return windows.transpose(1, 2).reshape(n * count, channels, window)


def join_blocks(y: torch.Tensor, count: int, out: int, input_dim: int = 3) -> torch.Tensor:
    """``(N·count, C, block)`` → ``(N, C, out)``: the blocks laid end to end, cropped;
    ``(C, out)`` where the conv's input had ``input_dim`` 2 (unbatched), which the rows
    alone cannot tell from a batch of one."""
    rows, channels, block = y.shape
    joined = y.reshape(rows // count, count, channels, block).transpose(1, 2).reshape(
        rows // count, channels, count * block)
    joined = joined[..., :out].contiguous()
    return joined if input_dim == 3 else joined.squeeze(0)
