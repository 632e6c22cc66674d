"""The plans the passes hand on: a conv's (``plan_convs`` → ``lower_convs``, on the conv
node's meta), a fused chain's (``find_chains`` → ``lower_convs`` and ``fuse_chains``,
on the pass context) and a close call's (``find_chains`` → ``time_chains``)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.fx as fx

from specfx.geometry import SpectralGeometry
from specfx.report import ChainDecision

from .recognize import ChainOp


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    """How one conv is to be lowered: its grid, and the dtype its output keeps."""

    name: str
    lowered: bool
    geometry: Optional[SpectralGeometry]
    out_dtype: Optional[torch.dtype]


@dataclasses.dataclass
class PolyPlan:
    """A poly activation: its coefficients, whether it masks its input first, its fit error."""

    coeffs: torch.Tensor  # (C, degree + 1) float64
    mask_input: bool
    error: float


@dataclasses.dataclass
class ChainPlan:
    """What ``fuse_chains`` does for one fused chain. Everything is named by fx node name
    (conv nodes by the name they had before lowering: their lowered nodes carry it as
    ``specfx_replaces``)."""

    name: str
    grid: tuple[int, ...]
    rank: int
    dtype: torch.dtype
    convs: list[str]                       # lowered conv nodes of the chain
    spectral: list[str]                    # other nodes computed in the frequency domain, in graph order
    modes: dict[str, str]                  # activation node -> "exact" | "poly"
    poly: dict[str, PolyPlan]
    masks: list[tuple[str, str]]           # (consumer, operand): mask the operand before the consumer reads it
    sizes: dict[str, tuple[int, ...]]      # spatial size of every tensor of the chain
    ops: dict[str, ChainOp] = dataclasses.field(default_factory=dict)  # the spectral nodes' ops,
    # as recognized before lowering (their ``inputs`` may name convs that lowering replaced)
    # Constants (poly coefficients, pooling kernels, scalars) become non-persistent buffers,
    # or, in Dynamo graphs (whose parameters are all inputs), constants made in the graph
    # on this device.
    inline_device: Optional[str] = None
    # Convs whose output does not continue as a spectrum (strided, or written in place):
    # a chain op that reads one reads it spatially.
    ends: frozenset[str] = frozenset()
    # Values the chain reads that an in-place write can be observed through: each reader
    # transforms them where it reads them (a transform shared with an earlier reader could
    # predate the write).
    written: frozenset[str] = frozenset()
    # Modules (paths) whose frequency-domain form holds in eval mode only (BatchNorm
    # modules); while one is in training mode the chain runs ``original`` instead.
    modal: list[str] = dataclasses.field(default_factory=list)
    original: Optional[fx.Graph] = None  # from original_region


def original_region(gm: fx.GraphModule, names: list[str]) -> fx.Graph:
    """The nodes ``names`` of ``gm`` (in graph order) copied into a graph of their own
    (each copy's meta ``specfx_member`` names its node), for the chain's training-mode
    fallback. Whatever they read from outside becomes a
    placeholder, whose meta ``specfx_source`` holds the node it stands for; a module they
    call becomes a placeholder too (meta ``specfx_module``: its path), called with
    ``__call__``, so that a module built from this graph owns no submodule, and no
    parameter appears twice in the optimized module's ``state_dict``.

    The copy is made before lowering: the convs' own nodes are gone afterwards."""
    region = fx.Graph()
    copied: dict[fx.Node, fx.Node] = {}
    modules: dict[str, fx.Node] = {}

    def value(node: fx.Node) -> fx.Node:
        if node not in copied:
            copied[node] = region.placeholder(node.name)
            copied[node].meta["specfx_source"] = node
        return copied[node]

    for node in gm.graph.nodes:
        if node.name not in names:
            continue
        args, kwargs = fx.node.map_arg((node.args, node.kwargs), value)
        if node.op == "call_module":
            path = str(node.target)
            if path not in modules:
                modules[path] = region.placeholder(f"module_{path.replace('.', '_')}")
                modules[path].meta["specfx_module"] = path
            copied[node] = region.call_method("__call__", (modules[path], *args), kwargs)
        else:
            copied[node] = region.create_node(node.op, node.target, args, kwargs)
        copied[node].meta["specfx_member"] = node.name
    return region


@dataclasses.dataclass
class CloseChain:
    """A chain whose fusion ``find_chains`` estimated too close to call
    (:data:`specfx.close_calls.CHAIN_BAND`), handed to ``time_chains``: the decision
    either way (``chosen`` is the estimate's, at ``index`` in the report's chains), the
    plan it fuses with, and its nodes in graph order (to run it on its own)."""

    index: int
    plan: ChainPlan
    chosen: ChainDecision
    other: ChainDecision
    nodes: tuple[str, ...]
