"""Recognition: every form of the ops a chain may hold between its convs, as an fx graph
spells them after ``symbolic_trace``, ``torch.export`` or Dynamo, in canonical form.

- activations: ReLU, LeakyReLU, GELU (exact and tanh), SiLU (modules, ``F.*``,
  ``torch.*``, methods, in-place variants, ATen) and the square ``x*x`` / ``x**2`` /
  ``torch.square`` (a polynomial activation: exact in poly mode);
- per-channel affine maps: eval ``BatchNorm`` (module, ``F.batch_norm(training=False)``,
  ATen), multiplication / division / addition by a scalar or a per-channel tensor;
- residual adds of two chain tensors of one shape;
- a crop ``x[..., :n]`` of the spatial axes (the "chomp" of a causal conv), and
  ``nn.Identity``;
- stride-1 average pooling (``count_include_pad``), which is a depthwise conv with a
  constant kernel, and convs the planner kept direct (1x1, grouped, depthwise, stride 1),
  which inside a chain are a channel contraction on the shared grid.

Calls are bound against the function's signature (a stub for builtins, which have none)
or the ATen schema, as :mod:`specfx.canonical` does for convs. A new chain op is a
recognizer here and an :class:`OpKind`.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import operator
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from specfx.canonical import ConvSite, bind_schema, conv_site, tensor_info
from specfx.geometry import expand, resolve_padding

aten = torch.ops.aten

CHAIN_DTYPES = (torch.float32, torch.float64)

Operand = Union[fx.Node, float, int, None, str]  # a node, a Python number, or an attribute path


class OpKind(enum.Enum):
    """What a chain op does to the spectrum; the value is its label in the report."""

    ACTIVATION = "activation"
    AFFINE = "affine"
    ADD = "add"
    CROP = "crop"
    IDENTITY = "identity"
    CONV = "conv"
    POOL = "avg_pool"

    @property
    def windowed(self) -> bool:
        """It reads a window of positions around each output (a conv or a pool)."""
        return self in (OpKind.CONV, OpKind.POOL)

    @property
    def view(self) -> bool:
        """Its result may be a view of its input (a crop; ``nn.Identity`` returns it)."""
        return self in (OpKind.CROP, OpKind.IDENTITY)

    @property
    def linear(self) -> bool:
        """A linear map of its inputs that keeps no window: a poly activation's output
        reaches the next read through it unchanged in kind."""
        return self in (OpKind.AFFINE, OpKind.ADD, OpKind.CROP, OpKind.IDENTITY)


@dataclasses.dataclass
class ChainOp:
    """One op a chain may hold, in canonical form.

    ``inputs`` are the chain tensors it reads (one, or two for a residual add). For
    ``AFFINE``: ``scale`` / ``shift`` are numbers, per-channel nodes, or ``None``;
    ``bn`` is ``(weight, bias, running_mean, running_var, eps)`` (nodes or attribute
    paths). For ``CONV`` / ``POOL``: ``site`` (a conv) or the pool's ``kernel`` and
    ``padding``. For ``CROP``: the new spatial size comes from the node's shape.
    """

    kind: OpKind
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
        if self.kind is OpKind.ACTIVATION:
            return self.activation
        if self.kind is OpKind.AFFINE:
            return "batch_norm" if self.bn is not None else "affine"
        return self.kind.value


# Python signatures of the builtins recognized here (they have none of their own).
def _relu(input, inplace=False): ...
def _gelu(input, approximate="none"): ...
def _unary(input): ...
def _avg_pool(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,
              divisor_override=None): ...


_SIGNATURES = {
    F.relu: inspect.signature(F.relu), F.relu_: inspect.signature(_unary),
    torch.relu: inspect.signature(_unary), torch.relu_: inspect.signature(_unary),
    F.leaky_relu: inspect.signature(F.leaky_relu), F.gelu: inspect.signature(_gelu),
    F.silu: inspect.signature(F.silu), torch.square: inspect.signature(_unary),
    F.batch_norm: inspect.signature(F.batch_norm),
    **{pool: inspect.signature(_avg_pool) for pool in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d)},
}


def bind(node: fx.Node) -> Optional[dict[str, Any]]:
    """The call's arguments by name, defaults filled in (``None`` for a call its signature
    does not accept)."""
    if isinstance(node.target, torch._ops.OpOverload):
        try:
            return bind_schema(node.target, node.args, node.kwargs)
        except TypeError:
            return None
    try:
        bound = _SIGNATURES[node.target].bind(*node.args, **node.kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    return bound.arguments


_ACT_MODULES = {nn.ReLU: "relu", nn.LeakyReLU: "leaky_relu", nn.GELU: "gelu", nn.SiLU: "silu"}
_RELU_FUNCTIONS = {F.relu: False, torch.relu: False, torch.relu_: True, F.relu_: True}
_ATEN_ACTS = {aten.relu.default: "relu", aten.relu_.default: "relu", aten.gelu.default: "gelu",
              aten.silu.default: "silu", aten.silu_.default: "silu", aten.leaky_relu.default: "leaky_relu",
              aten.leaky_relu_.default: "leaky_relu"}
_ADD = {operator.add, torch.add, aten.add.Tensor}
_MUL = {operator.mul, torch.mul, aten.mul.Tensor}
_DIV = {operator.truediv, torch.div, aten.div.Tensor}
_POW = {operator.pow, torch.pow, aten.pow.Tensor_Scalar}
_METHODS = {"add": operator.add, "mul": operator.mul, "div": operator.truediv,
            "__add__": operator.add, "__mul__": operator.mul, "__truediv__": operator.truediv}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_AVG_POOLS = {nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_F_AVG_POOLS = {F.avg_pool1d: 1, F.avg_pool2d: 2, F.avg_pool3d: 3,
                aten.avg_pool1d.default: 1, aten.avg_pool2d.default: 2, aten.avg_pool3d.default: 3}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _act(x: Any, activation: str, slope: float = 0.0, inplace: bool = False) -> ChainOp:
    return ChainOp(OpKind.ACTIVATION, [x], activation, slope, inplace)


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
        return _act(node.args[0], kind, slope, bool(getattr(module, "inplace", False)))
    if node.op == "call_method":
        if node.target in ("relu", "relu_") and len(node.args) == 1 and not node.kwargs:
            return _act(node.args[0], "relu", inplace=node.target == "relu_")
        if node.target == "square" and len(node.args) == 1:
            return _act(node.args[0], "square")
        if node.target in ("pow", "__pow__") and len(node.args) == 2 and node.args[1] == 2:
            return _act(node.args[0], "square")
        if node.target in ("mul", "__mul__") and len(node.args) == 2 and node.args[0] is node.args[1]:
            return _act(node.args[0], "square")
        return None
    if node.op != "call_function":
        return None
    target = node.target
    if target in _POW and len(node.args) == 2 and node.args[1] == 2 and isinstance(node.args[0], fx.Node):
        return _act(node.args[0], "square")
    if target in _MUL and len(node.args) == 2 and isinstance(node.args[0], fx.Node) and node.args[0] is node.args[1]:
        return _act(node.args[0], "square")
    if target not in _SIGNATURES and target not in _ATEN_ACTS and target is not aten.square.default:
        return None
    a = bind(node)
    if a is None:
        return None
    if target in _ATEN_ACTS:
        kind = _ATEN_ACTS[target]
        if kind == "gelu" and a.get("approximate", "none") != "none":
            kind = "gelu_tanh"
        slope = float(a.get("negative_slope", 0.0)) if kind == "leaky_relu" else 0.0
        return _act(a["self"], kind, slope, inplace=target._schema.name.endswith("_"))
    if target is aten.square.default:
        return _act(a["self"], "square")
    if target is torch.square:
        return _act(a["input"], "square")
    if target in _RELU_FUNCTIONS:
        return _act(a["input"], "relu", inplace=_RELU_FUNCTIONS[target] or bool(a.get("inplace", False)))
    if target is F.leaky_relu:
        return _act(a["input"], "leaky_relu", float(a["negative_slope"]), bool(a["inplace"]))
    if target is F.gelu:
        return _act(a["input"], "gelu" if a["approximate"] == "none" else "gelu_tanh")
    if target is F.silu:
        return _act(a["input"], "silu", inplace=bool(a["inplace"]))
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
        target = _METHODS.get(node.target)
    elif node.op != "call_function":
        return None
    if target not in _ADD and target not in _MUL and target not in _DIV:
        return None
    if len(node.args) != 2 or any(k not in ("alpha",) for k in node.kwargs) or node.kwargs.get("alpha", 1) != 1:
        return None
    a, b = node.args
    if target in _DIV:
        if isinstance(a, fx.Node) and _number(b) and b != 0:
            return ChainOp(OpKind.AFFINE, [a], scale=1.0 / b)
        return None
    if not isinstance(a, fx.Node):
        a, b = b, a  # number ⊕ tensor
    if not isinstance(a, fx.Node):
        return None
    if target in _ADD and isinstance(b, fx.Node):
        ai, bi, oi = tensor_info(a), tensor_info(b), tensor_info(node)
        if ai is not None and bi is not None and oi is not None and ai == bi == oi:
            return ChainOp(OpKind.ADD, [a, b])
    for x, other in ((a, b), (b, a)):
        if not isinstance(x, fx.Node):
            continue
        if _number(other) or (isinstance(other, fx.Node) and _per_channel(other, x, rank)):
            if tensor_info(node) is None or tensor_info(node) != tensor_info(x):
                return None
            if target in _MUL:
                return ChainOp(OpKind.AFFINE, [x], scale=other)
            return ChainOp(OpKind.AFFINE, [x], shift=other)
    return None


def _bn(a: dict[str, Any]) -> ChainOp:
    return ChainOp(OpKind.AFFINE, [a["input"]],
                   bn=(a["weight"], a["bias"], a["running_mean"], a["running_var"], float(a["eps"])))


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
        return ChainOp(OpKind.AFFINE, [node.args[0]],
                       bn=(weight, bias, f"{path}.running_mean", f"{path}.running_var", float(module.eps)))
    if node.op != "call_function":
        return None
    if node.target is F.batch_norm or node.target is aten.batch_norm.default:
        a = bind(node)
        if a is None:
            return None
        # (F.batch_norm takes only False as eval mode; ATen's schema a bool)
        training = a["training"] is not False if node.target is F.batch_norm else a["training"]
        if training or not isinstance(a["running_mean"], fx.Node):
            return None
        return _bn(a)
    if node.target is operator.getitem and node.args[1] == 0:
        bn = node.args[0]
        if not isinstance(bn, fx.Node) or bn.target is not aten._native_batch_norm_legit_no_training.default:
            return None
        if any(u.target is not operator.getitem or u.args[1] != 0 for u in bn.users):
            return None
        return _bn(bind_schema(bn.target, bn.args, bn.kwargs))
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
    return ChainOp(OpKind.CROP, [x])


def _pool(gm: fx.GraphModule, node: fx.Node) -> Optional[ChainOp]:
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
        a = bind(node)
        if a is None:
            return None
        x = a["self"] if "self" in a else a["input"]
        kernel, stride, padding = a["kernel_size"], a["stride"], a["padding"]
        ceil, include, divisor = a["ceil_mode"], a["count_include_pad"], a.get("divisor_override")
        if stride in (None, []):
            stride = kernel
    else:
        return None
    kernel, stride, padding = expand(kernel, rank), expand(stride, rank), expand(padding, rank)
    if any(s != 1 for s in stride) or ceil or not include or divisor is not None:
        return None
    return ChainOp(OpKind.POOL, [x], kernel=tuple(kernel), padding=tuple(padding))


def classify(gm: fx.GraphModule, node: fx.Node, rank: int) -> Optional[ChainOp]:
    """The chain op ``node`` is, or ``None`` (then it stays spatial and ends a chain)."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    if node.op == "call_module" and type(gm.get_submodule(node.target)) is nn.Identity \
            and len(node.args) == 1 and isinstance(node.args[0], fx.Node):
        return ChainOp(OpKind.IDENTITY, [node.args[0]])
    for recognize in (lambda: _activation(gm, node), lambda: _batch_norm(gm, node),
                      lambda: _affine_or_add(node, rank), lambda: _crop(node, rank),
                      lambda: _pool(gm, node)):
        op = recognize()
        if op is not None:
            if not all(isinstance(i, fx.Node) for i in op.inputs):
                return None
            return op
    site = conv_site(gm, node)
    if site is not None:
        return ChainOp(OpKind.CONV, [site.input], site=site)
    return None


def direct_conv_ok(site: ConvSite) -> Optional[str]:
    """Why a conv the planner kept direct cannot be a channel contraction inside a chain."""
    if site.not_lowerable:
        return site.not_lowerable
    if any(s != 1 for s in site.stride):
        return "strided"
    if site.padding_mode not in ("zeros", "circular"):
        return f"padding_mode {site.padding_mode!r}"
    return None


def conv_geometry_of(site: ConvSite, kernel: tuple[int, ...]) -> tuple[list[int], list[tuple[int, int]]]:
    """A conv site's dilation and resolved (left, right) padding."""
    pads = resolve_padding(site.padding, list(kernel), site.dilation, site.stride)
    return list(site.dilation), pads


def rows_and_size(node: fx.Node, rank: int) -> Optional[tuple[int, int, tuple[int, ...], torch.dtype]]:
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
