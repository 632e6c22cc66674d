"""Spectral chains: the ops a chain of convs may keep in the frequency domain, and when
that is exact.

This module is shared by the analysis (``passes/find_chains.py``) and the rewrite
(``passes/fuse_chains.py``). It has three parts.

**Recognition** (:func:`classify`): every form of the ops a chain may hold between its
convs, as an fx graph spells them after ``symbolic_trace``, ``torch.export`` or Dynamo —

- activations: ReLU, LeakyReLU, GELU (exact and tanh), SiLU (modules, ``F.*``,
  ``torch.*``, methods, in-place variants, ATen) and the square ``x*x`` / ``x**2`` /
  ``torch.square`` (a polynomial activation: exact in poly mode);
- per-channel affine maps: eval ``BatchNorm`` (module, ``F.batch_norm(training=False)``,
  ATen), multiplication / division / addition by a scalar or a per-channel tensor;
- residual adds of two chain tensors of one shape;
- a crop ``x[..., :n]`` of the spatial axes (the "chomp" of a causal conv);
- stride-1 average pooling (``count_include_pad``), which is a depthwise conv with a
  constant kernel, and convs the planner kept direct (1x1, grouped, depthwise, stride 1),
  which inside a chain are a channel contraction on the shared grid.

**Exactness** (:func:`analyze`). All tensors of a chain share one grid P per axis; a
tensor of spatial size L sits at positions ``[0, L)``. Per axis the analysis tracks, for
every tensor held as a spectrum, ``L``, the prefix ``[0, V)`` of positions known to hold
the right values, and the *support*: the grid positions that may be non-zero. (Axes are
independent: supports are products, a read is right when it is right on every axis.)
A zero-padded conv's output ``t`` reads input positions ``r = t·s + m·d − left``; it is
exact where every read is either a valid data position (``0 ≤ r < V``) or a position
outside ``[0, L)`` whose grid cell ``r mod P`` is outside the support (a true zero). So:

- circular convs at ``P = L`` (output size = input size) are exact with no mask at all:
  every read is a data position;
- 'valid' convs read only ``[0, L)``; their wrap-around garbage at the end of the grid is
  never read again, so 'valid' chains need no mask (the final crop discards it);
- causal 1D convs (``padding = k−1`` followed by the crop ``[..., :L]``) read
  ``[t − (k−1)·d, t]``: their garbage is the "future" tail, which later causal convs
  never read, provided no support wraps onto the negative reads — the analysis
  finds that ``P ≥ L + Σ (k_i − 1)·d_i`` (over the convs of the chain) suffices, and the
  chain is planned at that grid when the convs' own grids are too small;
- zero-padded 'same' convs read ``[−left, L + right)``, so their input must be *clean*
  (zero outside ``[0, L)``): an exact spectral activation is (it crops and re-pads),
  a conv output is not. Such a tensor gets a mask: an identity ``spectral_activation``
  (a round trip, still one op instead of two) or, in poly mode, the poly activation's
  frequency-domain input mask ``(1/N)·F{m} ⊛ X``.

Per-channel constants (a conv's bias, BatchNorm's shift) are added as ``b·F{m}``: on the
data positions only, so they never turn a known zero into garbage. Pointwise maps keep
the support (∪ ``[0, L)``); a poly activation maps zero to its constant term, which is
why that term is ``a·F{m}`` and not ``a·N·δ``.

**Poly fitting** (:func:`fit_poly`): per channel, the least-squares polynomial of the
activation over the pre-activation values the example inputs produce (normal equations
from the moments ``E[u^i]`` and ``E[u^i·act(u)]``, in float64, on standardized values),
and its error on those values.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import handle_torch_function, has_torch_function

from . import node_meta
from .canonical import ConvSite, bind_schema, conv_site, tensor_info
from .side_effects import written_operands
from .geometry import expand, resolve_padding

aten = torch.ops.aten

CHAIN_DTYPES = (torch.float32, torch.float64)

# --- recognition -------------------------------------------------------------------------

Operand = Union[fx.Node, float, int, None, str]  # a node, a Python number, or an attribute path


@dataclasses.dataclass
class ChainOp:
    """One op a chain may hold, in canonical form.

    ``inputs`` are the chain tensors it reads (one, or two for a residual add). For
    ``affine``: ``scale`` / ``shift`` are numbers, per-channel nodes, or ``None``;
    ``bn`` is ``(weight, bias, running_mean, running_var, eps)`` (nodes or attribute
    paths). For ``conv`` / ``pool``: ``site`` (a conv) or the pool's ``kernel`` and
    ``padding``. For ``slice``: the new spatial size comes from the node's shape.
    """

    kind: str  # "act" | "affine" | "add" | "slice" | "conv" | "pool"
    inputs: list[fx.Node]
    activation: Optional[str] = None
    slope: float = 0.0
    inplace: bool = False
    scale: Operand = None
    shift: Operand = None
    bn: Optional[tuple] = None
    site: Optional[ConvSite] = None
    kernel: Optional[tuple[int, ...]] = None
    padding: Optional[tuple[int, ...]] = None

    @property
    def label(self) -> str:
        if self.kind == "act":
            return self.activation
        if self.kind == "affine":
            return "batch_norm" if self.bn is not None else "affine"
        if self.kind == "conv":
            return "conv"
        if self.kind == "slice" and self.activation == "identity":
            return "identity"
        return {"add": "add", "slice": "crop", "pool": "avg_pool"}[self.kind]


_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.SiLU: "silu"}
_RELU_FUNCTIONS = {F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True}
_ATEN_ACTS = {aten.relu.default: "relu", aten.relu_.default: "relu", aten.gelu.default: "gelu",
              aten.silu.default: "silu", aten.silu_.default: "silu", aten.leaky_relu.default: "leaky_relu",
              aten.leaky_relu_.default: "leaky_relu"}
_ADD = {operator.add, torch.add, aten.add.Tensor}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor}
_DIV = {operator.truediv, torch.div, aten.div.Tensor}
_POW = {operator.pow, torch.pow, aten.pow.Tensor_Scalar}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_F_AVG_POOLS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
                aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _activation(gm: fx.GraphModule, node: fx.Node) -> Optional[ChainOp]:
    """Activation forms: module, functional, torch, method, ATen."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        kind = _ACT_MODULES.get(type(module))
        if kind is None or len(node.args) != 1 or node.kwargs:
            return None
        if kind == "gelu":
            kind = "gelu" if module.approximate == "none" else "gelu_tanh"
        slope = float(getattr(module, "negative_slope", 0.0))
        return ChainOp("act", [node.args[0]], kind, slope, bool(getattr(module, "inplace", False)))
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
            return ChainOp("act", [node.args[0]], "relu", inplace=node.target == "relu_")
        if node.target == "square" and len(node.args) == 1:
            return ChainOp("act", [node.args[0]], "square")
        if node.target in ("pow", "__pow__") and len(node.args) == 2 and node.args[1] == 2:
            return ChainOp("act", [node.args[0]], "square")
        if node.target in ("mul", "__mul__") and len(node.args) == 2 and node.args[0] is node.args[1]:
            return ChainOp("act", [node.args[0]], "square")
        return None
    if node.op != "call_function":
        return None
    target = node.target
    x = _arg(node, 0, "input")
    if target in _RELU_FUNCTIONS:
        inplace = _RELU_FUNCTIONS[target] or bool(_arg(node, 1, "inplace", False))
        return ChainOp("act", [x], "relu", inplace=inplace)
    if target is F.leaky_relu:
        return ChainOp("act", [x], "leaky_relu", float(_arg(node, 1, "negative_slope", 0.01)),
                       bool(_arg(node, 2, "inplace", False)))
    if target is F.gelu:
        approximate = _arg(node, 1, "approximate", "none")
        return ChainOp("act", [x], "gelu" if approximate == "none" else "gelu_tanh")
    if target is F.silu:
        return ChainOp("act", [x], "silu", inplace=bool(_arg(node, 1, "inplace", False)))
    if target in _ATEN_ACTS:
        a = bind_schema(target, node.args, node.kwargs)
        kind = _ATEN_ACTS[target]
        if kind == "gelu" and a.get("approximate", "none") != "none":
            kind = "gelu_tanh"
        slope = float(a.get("negative_slope", 0.0)) if kind == "leaky_relu" else 0.0
        return ChainOp("act", [a["self"]], kind, slope, inplace=target._schema.name.endswith("_"))
    if target in (torch.square, aten.square.default):
        return ChainOp("act", [x], "square")
    if target in _POW and len(node.args) == 2 and node.args[1] == 2 and isinstance(node.args[0], fx.Node):
        return ChainOp("act", [node.args[0]], "square")
    if target in _MUL and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and node.args[0] is node.args[1]:
        return ChainOp("act", [node.args[0]], "square")
    return None


def _per_channel(other: fx.Node, x: fx.Node, rank: int) -> bool:
    """``other`` broadcasts against ``x`` (``(*batch, C, *spatial)``) as a per-channel
    tensor: every dim 1 except the channel dim (1 or C); it never grows ``x``."""
    oi, xi = tensor_info(other), tensor_info(x)
    if oi is None or xi is None:
        return False
    o_shape, x_shape = list(oi[0]), list(xi[0])
    if len(o_shape) > len(x_shape) or oi[1] != xi[1]:
        return False
    channel = len(x_shape) - rank - 1
    for offset, size in enumerate(reversed(o_shape)):
        dim = len(x_shape) - 1 - offset
        if size != 1 and not (dim == channel and size == x_shape[channel]):
            return False
    return True


def _affine_or_add(node: fx.Node, rank: int) -> Optional[ChainOp]:
    target = node.target
    if node.op == "call_method":
        target = {"add": operator.add, "mul": operator.mul, "div": operator.truediv,
                  "__add__": operator.add, "__mul__": operator.mul, "__truediv__": operator.truediv}.get(node.target)
    elif node.op != "call_function":
        return None
    if target not in _ADD and target not in _MUL and target not in _DIV:
        return None
    if len(node.args) != 2 or any(k not in ("alpha",) for k in node.kwargs) or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if target in _DIV:
        if isinstance(a, fx.Node) and _number(b) and b != 0:
            return ChainOp("affine", [a], scale=1.0 / b)
        return None
    if not isinstance(a, fx.Node):
        a, b = b, a  # number ⊕ tensor
    if not isinstance(a, fx.Node):
        return None
    if target in _ADD and isinstance(b, fx.Node):
        ai, bi, oi = tensor_info(a), tensor_info(b), tensor_info(node)
        if ai is not None and bi is not None and oi is not None and ai == bi == oi:
            return ChainOp("add", [a, b])
    for x, other in ((a, b), (b, a)):
        if not isinstance(x, fx.Node):
            continue
        if _number(other) or (isinstance(other, fx.Node) and _per_channel(other, x, rank)):
            if tensor_info(node) is None or tensor_info(node) != tensor_info(x):
                return None
            if target in _MUL:
                return ChainOp("affine", [x], scale=other)
            return ChainOp("affine", [x], shift=other)
    return None


def _batch_norm(gm: fx.GraphModule, node: fx.Node) -> Optional[ChainOp]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if not isinstance(module, _BATCH_NORMS) or module.training or module.running_mean is None:
            return None
        if len(node.args) != 1 or node.kwargs or module._forward_hooks or module._forward_pre_hooks:
            return None
        path = str(node.target)
        weight = f"{path}.weight" if module.affine else None
        bias = f"{path}.bias" if module.affine else None
        return ChainOp("affine", [node.args[0]],
                       bn=(weight, bias, f"{path}.running_mean", f"{path}.running_var", float(module.eps)))
    if node.op != "call_function":
        return None
    if node.target is F.batch_norm:
        names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
        defaults = [None, None, None, None, None, False, 0.1, 1e-5]
        a = {n: _arg(node, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))}
        if a["training"] is not False or not isinstance(a["running_mean"], fx.Node):
            return None
        return ChainOp("affine", [a["input"]],
                       bn=(a["weight"], a["bias"], a["running_mean"], a["running_var"], float(a["eps"])))
    if node.target is aten.batch_norm.default:
        a = bind_schema(node.target, node.args, node.kwargs)
        if a["training"] or not isinstance(a["running_mean"], fx.Node):
            return None
        return ChainOp("affine", [a["input"]],
                       bn=(a["weight"], a["bias"], a["running_mean"], a["running_var"], float(a["eps"])))
    if node.target is operator.getitem and node.args[1] == 0:
        bn = node.args[0]
        if not isinstance(bn, fx.Node) or bn.target is not aten._native_batch_norm_legit_no_training.default:
            return None
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in bn.users):
            return None
        a = bind_schema(bn.target, bn.args, bn.kwargs)
        return ChainOp("affine", [a["input"]],
                       bn=(a["weight"], a["bias"], a["running_mean"], a["running_var"], float(a["eps"])))
    return None


def _crop(node: fx.Node, rank: int) -> Optional[ChainOp]:
    """``x[..., :n]`` (or ``x[:, :, :n]``, ``aten.slice``) on spatial axes, from 0, step 1."""
    if node.op != "call_function":
        return None
    x = node.args[0] if node.args else None
    info, out = tensor_info(x), tensor_info(node)
    if info is None or out is None or len(out[0]) != len(info[0]):
        return None
    dims = len(info[0])
    if node.target is aten.slice.Tensor:
        a = bind_schema(node.target, node.args, node.kwargs)
        dim = a["dim"] % dims
        ok = dim >= dims - rank and (a["start"] in (None, 0)) and a["step"] == 1
    elif node.target is operator.getitem and isinstance(node.args[1], tuple):
        index = node.args[1]
        if Ellipsis in index:
            if index.count(Ellipsis) != 1:
                return None
            at = index.index(Ellipsis)
            index = index[:at] + (slice(None),) * (dims - len(index) + 1) + index[at + 1:]
        if len(index) > dims or not all(isinstance(s, slice) for s in index):
            return None
        ok = all(s.start in (None, 0) and s.step in (None, 1) and isinstance(s.stop, (int, type(None)))
                 for s in index)
        ok = ok and all(s == slice(None) for s in index[: dims - rank])
    else:
        return None
    if not ok or list(out[0][: dims - rank]) != list(info[0][: dims - rank]):
        return None
    return ChainOp("slice", [x])


def _avg_pool(gm: fx.GraphModule, node: fx.Node) -> Optional[ChainOp]:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        rank = _AVG_POOLS.get(type(module))
        if rank is None or len(node.args) != 1 or node.kwargs:
            return None
        kernel, stride, padding = module.kernel_size, module.stride, module.padding
        ceil, include = module.ceil_mode, module.count_include_pad
        divisor = getattr(module, "divisor_override", None)
        x = node.args[0]
    elif node.op == "call_function" and node.target in _F_AVG_POOLS:
        rank = _F_AVG_POOLS[node.target]
        names = ["input", "kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override"]
        defaults = [None, None, None, 0, False, True, None]
        a = {n: _arg(node, i, n, d) for i, (n, d) in enumerate(zip(names, defaults))}
        x, kernel, stride, padding = a["input"], a["kernel_size"], a["stride"], a["padding"]
        ceil, include, divisor = a["ceil_mode"], a["count_include_pad"], a["divisor_override"]
        if stride in (None, []):
            stride = kernel
    else:
        return None
    kernel, stride, padding = expand(kernel, rank), expand(stride, rank), expand(padding, rank)
    if any(s != 1 for s in stride) or ceil or not include or divisor is not None:
        return None
    return ChainOp("pool", [x], kernel=tuple(kernel), padding=tuple(padding))


def classify(gm: fx.GraphModule, node: fx.Node, rank: int) -> Optional[ChainOp]:
    """The chain op ``node`` is, or ``None`` (then it stays spatial and ends a chain)."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity \
            and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
        return ChainOp("slice", [node.args[0]], activation="identity")  # a crop to the same size
    for recognize in (lambda: _activation(gm, node), lambda: _batch_norm(gm, node),
                      lambda: _affine_or_add(node, rank), lambda: _crop(node, rank),
                      lambda: _avg_pool(gm, node)):
        op = recognize()
        if op is not None:
            if not all(isinstance(i, fx.Node) for i in op.inputs):
                return None
            return op
    site = conv_site(gm, node)
    if site is not None:
        return ChainOp("conv", [site.input], site=site)
    return None


def direct_conv_ok(gm: fx.GraphModule, site: ConvSite) -> Optional[str]:
    """Why a conv the planner kept direct cannot be a channel contraction inside a chain."""
    if site.not_lowerable:
        return site.not_lowerable
    if any(s != 1 for s in site.stride):
        return "strided"
    if site.padding_mode not in ("zeros", "circular"):
        return f"padding_mode {site.padding_mode!r}"
    return None


# --- in-place writes -----------------------------------------------------------------------
#
# A chain keeps a tensor as a spectrum from where it is produced to where its chain readers
# read it. An in-place write into that tensor (or into a view of it) in between would be
# lost on the spectrum, and a write that only the in-place op's own result should see
# (``relu_(y)`` while ``y`` is read elsewhere) would be invisible. So a value that some
# write can be observed through never continues as a spectrum.

def _alias_sources(gm: fx.GraphModule, node: fx.Node, rank: int) -> list[fx.Node]:
    """The values whose memory ``node``'s result may share: none for ops known to return a
    fresh tensor (convs, the chain ops but crops, operators whose schema returns no alias),
    the written operand for an in-place op, every input for anything else."""
    if node.op in ("placeholder", "get_attr", "output"):
        return []
    written = written_operands(gm, node)
    if written:
        return written
    schema = getattr(node.target, "_schema", None)
    if node.op == "call_function" and schema is not None:
        return node.all_input_nodes if any(r.alias_info is not None for r in schema.returns) else []
    if conv_site(gm, node) is not None:
        return []
    op = classify(gm, node, rank)
    if op is not None and op.kind != "slice":
        return []
    return node.all_input_nodes


def observed_writes(gm: fx.GraphModule, rank: int) -> set[str]:
    """Names of the values an in-place write can be observed through: every value sharing
    memory with a written operand, when anything but the writer reads one of them.

    ``z = relu_(y)`` with ``y`` read by nothing else is just ``z = relu(y)``: ``y`` is not
    listed. With ``y`` read elsewhere too (before or after the write: either way the
    reader depends on where the write happens), ``y`` and its views are."""
    sources = {n: _alias_sources(gm, n, rank) for n in gm.graph.nodes}
    views: dict[fx.Node, list[fx.Node]] = {n: [] for n in gm.graph.nodes}
    for node, shared in sources.items():
        for s in shared:
            views[s].append(node)
    observed: set[str] = set()
    for writer in gm.graph.nodes:
        for target in written_operands(gm, writer):
            group, stack = set(), [target]
            while stack:
                value = stack.pop()
                if value in group or value is writer:
                    continue
                group.add(value)
                stack += sources[value] + views[value]
            if any(u is not writer and u not in group for value in group for u in value.users):
                observed |= {value.name for value in group}
    return observed


# --- exactness analysis ------------------------------------------------------------------

@dataclasses.dataclass
class AxisState:
    """One axis of a tensor held as a spectrum on a grid of ``len(support)`` positions."""

    size: int      # L: the tensor's spatial size
    valid: int     # V: positions [0, V) hold the right values
    support: np.ndarray  # bool[P]: positions that may be non-zero

    @classmethod
    def clean(cls, size: int, grid: int) -> "AxisState":
        support = np.zeros(grid, dtype=bool)
        support[:size] = True
        return cls(size, size, support)

    @property
    def is_clean(self) -> bool:
        grid = len(self.support)
        return not self.support[self.size:].any() if self.size < grid else True

    def with_data(self) -> "AxisState":
        support = self.support.copy()
        support[: self.size] = True
        return AxisState(self.size, self.valid, support)


State = list[AxisState]


def clean_state(size: tuple[int, ...], grid: tuple[int, ...]) -> State:
    return [AxisState.clean(n, p) for n, p in zip(size, grid)]


def conv_axis(state: AxisState, kernel: int, dilation: int, left: int, stride: int, out: int,
              circular: bool) -> AxisState:
    """A conv's output on one axis: which outputs are right, and where it may be non-zero."""
    grid = len(state.support)
    taps = np.arange(kernel) * dilation
    if circular:
        # Periodic extension: exact when the input fills the grid and is right everywhere.
        ok = state.size == grid and state.valid == grid and out == grid and stride == 1
        return AxisState(out, out if ok else 0, np.ones(grid, dtype=bool))
    t = np.arange(out)[:, None] * stride
    reads = t + taps[None, :] - left
    data = (reads >= 0) & (reads < state.valid)
    outside = (reads < 0) | (reads >= state.size)
    zero = outside & ~state.support[reads % grid]
    good = (data | zero).all(axis=1)
    valid = out if good.all() else int(np.argmin(good))
    support = np.zeros(grid, dtype=bool)
    if stride == 1:
        for tap in taps:
            support |= np.roll(state.support, left - int(tap))
    support[: min(out, grid)] = True
    return AxisState(out, valid, support)


def conv_state(state: State, kernel, dilation, left, stride, out, circular) -> State:
    return [conv_axis(s, k, d, lp, st, o, circular)
            for s, k, d, lp, st, o in zip(state, kernel, dilation, left, stride, out)]


def masked(state: State) -> State:
    """After the zero mask: only ``[0, L)`` can be non-zero."""
    result = []
    for s in state:
        support = np.zeros(len(s.support), dtype=bool)
        support[: s.size] = True
        result.append(AxisState(s.size, s.valid, support))
    return result


def union(a: State, b: State) -> State:
    return [AxisState(x.size, min(x.valid, y.valid), x.support | y.support) for x, y in zip(a, b)]


def cropped(state: State, size: tuple[int, ...]) -> State:
    return [AxisState(n, min(s.valid, n), s.support.copy()) for s, n in zip(state, size)]


def fully_valid(state: State) -> bool:
    return all(s.valid >= s.size for s in state)


def conv_geometry_of(site: ConvSite, kernel: tuple[int, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    """A conv site's dilation and resolved (left, right) padding."""
    pads = resolve_padding(site.padding, list(kernel), site.dilation, site.stride)
    return list(site.dilation), pads


# --- poly fitting ------------------------------------------------------------------------

def activation_fn(activation: str, slope: float = 0.0):
    """The activation as a function on tensors."""
    return {
        "relu": torch.relu,
        "leaky_relu": lambda u: F.leaky_relu(u, slope),
        "gelu": F.gelu,
        "gelu_tanh": lambda u: F.gelu(u, approximate="tanh"),
        "silu": F.silu,
        "square": lambda u: u * u,
        "identity": lambda u: u,
    }[activation]


def fit_poly(samples: torch.Tensor, activation: str, slope: float, degree: int,
             rank: int) -> tuple[torch.Tensor, float]:
    """Per-channel least-squares polynomial of ``activation`` over ``samples``
    (``(*batch, C, *spatial)`` pre-activation values), lowest power first, as a float64
    ``(C, degree + 1)`` tensor, and its error ``max|p(u) − act(u)| / max|act(u)|``.

    The square is returned exactly (``0 + 0·u + 1·u²``, error 0)."""
    u = samples.detach().double()
    channels = u.shape[u.dim() - rank - 1]
    per_channel = u.movedim(u.dim() - rank - 1, 0).reshape(channels, -1)
    if activation == "square":
        coeffs = torch.zeros(channels, max(degree, 2) + 1, dtype=torch.float64)
        coeffs[:, 2] = 1.0
        return coeffs, 0.0
    target = activation_fn(activation, slope)(per_channel)
    mean = per_channel.mean(dim=1, keepdim=True)
    std = per_channel.std(dim=1, keepdim=True).clamp_min(1e-12)
    t = (per_channel - mean) / std
    powers = torch.stack([t ** i for i in range(2 * degree + 1)], dim=-1)  # (C, S, 2D+1)
    moments = powers.mean(dim=1)  # E[t^i]
    hankel = torch.stack([moments[:, i:i + degree + 1] for i in range(degree + 1)], dim=1)
    rhs = (powers[..., : degree + 1] * target.unsqueeze(-1)).mean(dim=1)
    hankel = hankel + 1e-12 * torch.eye(degree + 1, dtype=torch.float64)
    in_t = torch.linalg.solve(hankel, rhs)  # coefficients in t = (u − μ)/σ
    # Expand Σ_j a_j ((u − μ)/σ)^j into powers of u.
    coeffs = torch.zeros(channels, degree + 1, dtype=torch.float64)
    for j in range(degree + 1):
        for i in range(j + 1):
            coeffs[:, i] += in_t[:, j] * math.comb(j, i) * (-mean[:, 0]) ** (j - i) / std[:, 0] ** j
    fitted = sum(coeffs[:, i:i + 1] * per_channel ** i for i in range(degree + 1))
    scale = target.abs().max().item()
    error = (fitted - target).abs().max().item() / max(scale, 1e-30)
    return coeffs, error


# --- plans -------------------------------------------------------------------------------

@dataclasses.dataclass
class PolyPlan:
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


# --- run time: a chain's eval-mode BatchNorm and its training-mode fallback ---------------

def batch_norm_affine(bn: nn.Module, spectrum: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(shift, scale)`` per channel of the BatchNorm module ``bn`` in eval mode (``bn(u)
    = scale·u + shift``), from two constant probes (0 and 1024, exact in every float type)
    through ``F.batch_norm`` with ``training=False``: what ``bn`` computes in eval mode, with
    no side effect in any mode. (A module call would, in training mode, normalize the
    probes by their own statistics and update the running ones.)

    ``spectrum`` (the spectrum the terms apply to) is not read: it makes the function one
    call when the optimized module is traced again, since ``symbolic_trace`` records a
    Python function as a call only when a traced value flows into it, and would otherwise
    freeze the running statistics into constants."""
    if has_torch_function((spectrum,)):
        return handle_torch_function(batch_norm_affine, (spectrum,), bn, spectrum)
    mean = bn.running_mean
    probes = torch.tensor([0.0, 1024.0], dtype=mean.dtype, device=mean.device).unsqueeze(1).expand(2, mean.shape[0])
    out = F.batch_norm(probes, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
    return out[0], (out[1] - out[0]) / 1024.0


def chain_outputs(modal: tuple[nn.Module, ...], original: nn.Module, fused: tuple, args: tuple) -> tuple:
    """The values of a fused chain where the rest of the graph reads them: ``fused`` (the
    frequency-domain results) while every module in ``modal`` is in eval mode; otherwise
    ``original(*args)``: the chain's original ops, run as the original module runs them
    (batch statistics, running-statistic updates, autograd through them)."""
    traced = tuple(a for a in (*fused, *args) if a is not None and not isinstance(a, nn.Module))
    if has_torch_function(traced):
        return handle_torch_function(chain_outputs, traced, modal, original, fused, args)
    if any(m.training for m in modal):
        return original(*args)
    return fused


def node_rows_and_size(node: fx.Node, rank: int) -> Optional[tuple[int, int, tuple[int, ...], torch.dtype]]:
    """(batch, channels, spatial size, dtype) of a tensor node with concrete sizes."""
    info = tensor_info(node)
    if info is None:
        return None
    shape, dtype = info
    if len(shape) < rank + 1 or not all(isinstance(d, int) for d in shape[-rank - 1:]):
        return None
    try:
        batch = math.prod(int(d) for d in shape[: len(shape) - rank - 1])
    except TypeError:
        from torch.fx.experimental.symbolic_shapes import optimization_hint
        batch = math.prod(optimization_hint(d) for d in shape[: len(shape) - rank - 1])
    return batch, int(shape[-rank - 1]), tuple(int(d) for d in shape[-rank:]), dtype


def lowered_nodes(gm: fx.GraphModule, conv_node: str) -> dict[str, fx.Node]:
    """The ``to_spectrum`` / ``spectral_mix`` / ``from_spectrum`` nodes ``lower_convs``
    made of the conv node named ``conv_node``."""
    ops = torch.ops.specfx
    out = next((n for n in gm.graph.nodes if n.meta.get(node_meta.REPLACES) == conv_node
                and n.target is ops.from_spectrum.default), None)
    if out is None:
        return {}
    source = out.meta.get(node_meta.LOWERED_FROM)
    found = {"from": out}
    for n in gm.graph.nodes:
        if n.meta.get(node_meta.LOWERED_FROM) != source or n.meta.get("specfx_chain"):
            continue
        if n.target is ops.spectral_mix.default and n in out.all_input_nodes:
            found["mix"] = n
    if "mix" in found:
        found["to"] = next((n for n in found["mix"].all_input_nodes
                            if n.target is ops.to_spectrum.default), None)
    return found


# --- approximate results -----------------------------------------------------------------

def approximate(report) -> bool:
    """Whether the report's fused chains hold poly activations that are not exact."""
    return any(a.mode == "poly" and (a.error is None or a.error > 0)
               for c in report.chains if c.fused for a in c.activations)
