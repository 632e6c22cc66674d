"""Keep the samples a conv never reads out of its transform.

A transform rounds every output at the scale of everything it holds, read or not: a
``Conv1d(k=31, stride=2, dilation=2)`` whose skipped (odd) samples were 1e4 was off by
1.35e-3 of its output's scale through the FFT, against 3.7e-7 for the direct conv. So a
lowered conv first takes the samples it reads (:class:`specfx.geometry.SampleSelection`):
a strided slice per axis (decimation by gcd(stride, dilation), crop to the first and last
sample read), then zeros for the samples inside the slice that still go unread. Both are
exact: the conv never reads what they drop, and their gradient there is exactly zero, as
torch's is.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .geometry import SpectralGeometry
from .ops.spectral_ops import check_planned_size


def select_read_samples(x: torch.Tensor, size: list[int], start: list[int], stop: list[int], step: list[int],
                        unread: Optional[torch.Tensor]) -> torch.Tensor:
    """The samples ``start:stop:step`` of each of ``x``'s trailing ``len(size)`` dims, with
    those flagged in ``unread`` (a bool tensor over the selected spatial shape) zeroed.
    ``size`` is the spatial size planned for: another size would select other samples."""
    check_planned_size(x, size)
    index = (Ellipsis, *(slice(a, b, c) for a, b, c in zip(start, stop, step)))
    # A copy, not a view: a view would keep the whole input alive as long as the selection.
    return x[index].contiguous() if unread is None else x[index].masked_fill(unread.to(x.device), 0)


def unread_mask(geometry: SpectralGeometry, device: Optional[torch.device] = None) -> Optional[torch.Tensor]:
    """The bool mask over the selected input of ``geometry`` that is true where no output
    reads the sample, or ``None`` where the selection leaves none unread."""
    selection = geometry.selection
    if selection is None or not selection.zero_unread:
        return None
    rank = geometry.rank
    mask = torch.zeros(geometry.in_size, dtype=torch.bool)
    for axis, flags in enumerate(geometry.unread()):
        shape = [1] * rank
        shape[axis] = len(flags)
        mask |= torch.frombuffer(flags, dtype=torch.uint8).bool().view(shape)
    return mask if device is None else mask.to(device)


def selection_args(geometry: SpectralGeometry, unread: object) -> tuple:
    """The arguments after ``x`` of :func:`select_read_samples` for ``geometry``, with
    ``unread`` as its mask argument (a tensor, a graph node, or ``None``)."""
    s = geometry.selection
    return list(s.size), list(s.start), list(s.stop), list(s.step), unread


def emit_selection(gm: fx.GraphModule, x: fx.Node, geometry: SpectralGeometry, name: str,
                   input_info: Optional[tuple[Sequence[int], torch.dtype]],
                   device: Optional[torch.device]) -> fx.Node:
    """A :func:`select_read_samples` node on ``x`` (inserted at the graph's insertion
    point) for a conv lowered with ``geometry``. Its mask, where it needs one, becomes a
    non-persistent buffer of ``gm`` (no change to the state dict), so that the graph holds
    no tensor built at run time and exports and compiles as it runs. ``input_info`` is the
    conv input's shape and dtype, where known: the node's shape metadata is derived from
    it, so that later passes (merge_convs) can size the selection."""
    mask = unread_mask(geometry, device)
    unread = None
    if mask is not None:
        target = f"_specfx_unread_{name}"
        gm.register_buffer(target, mask, persistent=False)
        unread = gm.graph.get_attr(target)
    node = gm.graph.call_function(select_read_samples, (x, *selection_args(geometry, unread)))
    if input_info is not None:
        shape, dtype = input_info
        # A symbolic batch size (dynamic shapes) is recorded as its hint, as the planner costs it.
        batch = [optimization_hint(d) for d in shape[: len(shape) - geometry.rank]]
        node.meta["tensor_meta"] = _extract_tensor_metadata(
            torch.empty((*batch, *geometry.in_size), dtype=dtype, device="meta"))
    return node

