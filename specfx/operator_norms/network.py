"""A network's Lipschitz upper bound, composed through its fx graph.

Every node's value gets a constant ``L`` with ``‖v(x) − v(y)‖ ≤ L ‖x − y‖`` (ℓ2 over the
whole tensor, ``x`` the model's inputs together): inputs have 1, constants 0, and each op
maps its inputs' constants to its own:

- linear layers (convs, ``Linear``) multiply by their operator norm's certified upper bound;
- ``a + b`` (residual adds) sums, ``a − b`` too; a constant factor ``c`` multiplies by ``|c|``;
- eval-mode BatchNorm is a per-channel scale ``γ/√(var + ε)``: its largest magnitude;
- elementwise activations multiply by their Lipschitz constants (ReLU 1, LeakyReLU
  ``max(1, |slope|)``, GELU 1.1289, SiLU 1.0998, tanh 1, sigmoid 1/4, …);
- pooling by its own norm: max pooling by ``√(windows per sample)``, average pooling and
  means by the Schur bound ``√(‖A‖₁‖A‖_∞)`` of the averaging matrix (exact for
  non-overlapping windows and global means);
- reshapes, slices and zero padding leave it; concatenation takes ``√(Σ L²)``.

Anything else — a product of two input-dependent values, a normalisation over features,
a train-mode BatchNorm, an op without a rule — makes the bound unknown, naming the node,
rather than a number that may be wrong. Constant subgraphs (no input reaches them) are
exempt. The composition works on floats (the report) and on tensors (a differentiable
penalty) alike.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import operator
from typing import Any, Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..canonical import bind_schema, tensor_info

aten = torch.ops.aten
Number = Union[float, torch.Tensor]

# Largest slopes, rounded up (the maximum of the derivative, found in float64).
GELU = 1.128905            # at x = √2: Φ(√2) + √2 φ(√2) = 1.1289041…
GELU_TANH = 1.128994
SILU = 1.099840            # at x ≈ 2.3994
MISH = 1.088499
HARDSWISH = 1.5
HARDSIGMOID = 1 / 6


@dataclasses.dataclass(frozen=True)
class Unknown:
    """Why a node's Lipschitz constant is not known: the node and the reason."""

    node: str
    reason: str

    def __str__(self) -> str:
        return f"node {self.node}: {self.reason}"


Value = Union[Number, Unknown]


def _slope(module_or_kwargs: Any, name: str, default: float) -> float:
    value = getattr(module_or_kwargs, name, None) if not isinstance(module_or_kwargs, dict) \
        else module_or_kwargs.get(name)
    return default if value is None else float(value)


# Elementwise maps, by module type: the Lipschitz constant from the module.
MODULE_SLOPES: dict[type, Callable[[nn.Module], float]] = {
    nn.ReLU: lambda m: 1.0, nn.ReLU6: lambda m: 1.0, nn.Hardtanh: lambda m: 1.0, nn.Tanh: lambda m: 1.0,
    nn.Sigmoid: lambda m: 0.25, nn.Softplus: lambda m: 1.0, nn.Softsign: lambda m: 1.0,
    nn.LeakyReLU: lambda m: max(1.0, abs(m.negative_slope)), nn.ELU: lambda m: max(1.0, abs(m.alpha)),
    nn.GELU: lambda m: GELU_TANH if m.approximate == "tanh" else GELU, nn.SiLU: lambda m: SILU,
    nn.Mish: lambda m: MISH, nn.Hardswish: lambda m: HARDSWISH, nn.Hardsigmoid: lambda m: HARDSIGMOID,
    nn.Identity: lambda m: 1.0, nn.Softmax: lambda m: 1.0, nn.Flatten: lambda m: 1.0,
    nn.Unflatten: lambda m: 1.0,
}

# Elementwise (or shape-only) functions and methods: the constant from the call's kwargs.
FUNCTION_SLOPES: dict[Any, Callable[[dict], float]] = {}
for _f in (F.relu, torch.relu, torch.relu_, F.relu6, F.hardtanh, torch.tanh, F.tanh, F.softplus, F.softsign,
           torch.abs, operator.neg, torch.neg, operator.pos, F.softmax, torch.softmax,
           torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
           torch.clone, torch.t, torch.movedim,
           aten.relu.default, aten.relu_.default, aten.tanh.default, aten.abs.default, aten.neg.default,
           aten.hardtanh.default, aten.softplus.default, aten._softmax.default, aten.softmax.int,
           aten.clone.default, aten.view.default, aten.reshape.default, aten._unsafe_view.default,
           aten.permute.default, aten.transpose.int, aten.t.default, aten.squeeze.dim, aten.squeeze.dims,
           aten.squeeze.default, aten.unsqueeze.default, aten.flatten.using_ints, aten.contiguous.default,
           aten.alias.default, aten.detach.default, aten.slice.Tensor, aten.select.int, aten.relu6.default):
    FUNCTION_SLOPES[_f] = lambda kw: 1.0
for _f in (torch.sigmoid, F.sigmoid, aten.sigmoid.default):
    FUNCTION_SLOPES[_f] = lambda kw: 0.25
for _f in (F.leaky_relu, aten.leaky_relu.default):
    FUNCTION_SLOPES[_f] = lambda kw: max(1.0, abs(_slope(kw, "negative_slope", 0.01)))
for _f in (F.elu, aten.elu.default):
    FUNCTION_SLOPES[_f] = lambda kw: max(1.0, abs(_slope(kw, "alpha", 1.0)))
for _f in (F.gelu, aten.gelu.default):
    FUNCTION_SLOPES[_f] = lambda kw: GELU_TANH if kw.get("approximate") == "tanh" else GELU
for _f in (F.silu, aten.silu.default):
    FUNCTION_SLOPES[_f] = lambda kw: SILU
for _f in (F.mish, aten.mish.default):
    FUNCTION_SLOPES[_f] = lambda kw: MISH
for _f in (F.hardswish, aten.hardswish.default):
    FUNCTION_SLOPES[_f] = lambda kw: HARDSWISH
for _f in (F.hardsigmoid, aten.hardsigmoid.default):
    FUNCTION_SLOPES[_f] = lambda kw: HARDSIGMOID
del _f

METHOD_SLOPES: dict[str, float] = {
    **dict.fromkeys(("relu", "relu_", "tanh", "tanh_", "abs", "neg", "softmax", "clone", "contiguous", "detach",
                     "view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "t",
                     "float", "double", "half", "bfloat16", "to", "type_as", "view_as", "reshape_as"), 1.0),
    "sigmoid": 0.25,
}

ADDS = {operator.add, operator.iadd, torch.add, aten.add.Tensor, aten.add_.Tensor}
SUBS = {operator.sub, operator.isub, torch.sub, torch.subtract, aten.sub.Tensor, aten.sub_.Tensor}
MULS = {operator.mul, operator.imul, torch.mul, torch.multiply, aten.mul.Tensor, aten.mul.Scalar}
DIVS = {operator.truediv, operator.itruediv, torch.div, torch.true_divide, aten.div.Tensor, aten.div.Scalar}
CATS = {torch.cat, torch.concat, torch.stack, aten.cat.default, aten.stack.default}
SPLITS = {torch.split, torch.chunk, torch.unbind, aten.split.Tensor, aten.split_with_sizes.default,
          aten.chunk.default, aten.unbind.int}
MEANS = {torch.mean, aten.mean.dim, aten.mean.default}
SUMS = {torch.sum, aten.sum.dim_IntList, aten.sum.default}
PADS = {F.pad, aten.constant_pad_nd.default, aten.pad.default}
SHAPE_ATTRIBUTES = ("shape", "dtype", "device", "ndim", "is_cuda")
SHAPE_METHODS = ("size", "dim", "numel", "nelement", "ndimension")
BATCH_NORMS = {F.batch_norm, aten._native_batch_norm_legit_no_training.default, aten.batch_norm.default}


def _sqrt(x: Number) -> Number:
    return x.sqrt() if isinstance(x, torch.Tensor) else math.sqrt(x)


def _is_zero(x: Value) -> bool:
    return not isinstance(x, (Unknown, torch.Tensor)) and x == 0


class Composer:
    """Runs the rules over a graph. ``layer_norm(node)`` gives the upper bound (float or
    tensor) of a conv or linear node's operator norm, or an :class:`Unknown`. With
    ``inference`` the network is bounded as it runs in eval mode whatever mode it is in
    (BatchNorm with its running statistics, dropout as the identity): the bound a training
    penalty controls. Modules and held tensors are looked up by qualified name on ``root``
    (default: the graph module), so a graph captured from a copy can read a live model."""

    def __init__(self, gm: fx.GraphModule, layer_norm: Callable[[fx.Node], Value], inference: bool = False,
                 root: Optional[nn.Module] = None) -> None:
        self.gm = gm
        self.root = gm if root is None else root
        self.layer_norm = layer_norm
        self.inference = inference
        self.values: dict[fx.Node, Value] = {}

    def run(self) -> Value:
        result: Value = 0.0
        for node in self.gm.graph.nodes:
            if node.op == "output":
                result = self._root_sum_square(list(_tensors(node.args[0], self.values)), node)
                break
            self.values[node] = self._node(node)
        return result

    # Helpers ----------------------------------------------------------------------------

    def _l(self, arg: Any) -> Value:
        return self.values.get(arg, 0.0) if isinstance(arg, fx.Node) else 0.0

    def _root_sum_square(self, values: list[Value], node: fx.Node) -> Value:
        for v in values:
            if isinstance(v, Unknown):
                return v
        live = [v for v in values if not _is_zero(v)]
        if not live:
            return 0.0
        if len(live) == 1:
            return live[0]
        return _sqrt(sum(v * v for v in live))

    def _node(self, node: fx.Node) -> Value:
        if node.op == "placeholder":
            return 1.0 if tensor_info(node) is not None else 0.0
        if node.op == "get_attr":
            return 0.0
        inputs = [self.values.get(n, 0.0) for n in node.all_input_nodes]
        unknown = next((v for v in inputs if isinstance(v, Unknown)), None)
        if unknown is not None:
            return unknown
        if all(_is_zero(v) for v in inputs):
            return 0.0  # no input reaches this node: a constant
        try:
            return self._rule(node)
        except _NoRule as why:
            return Unknown(node.name, str(why))

    def _rule(self, node: fx.Node) -> Value:
        if node.op == "call_module":
            return self._module(node, self.root.get_submodule(node.target))
        if node.op == "call_method":
            return self._method(node)
        return self._function(node)

    # Modules ----------------------------------------------------------------------------

    def _module(self, node: fx.Node, module: nn.Module) -> Value:
        x = self._l(node.args[0]) if node.args else 0.0
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            return _scale(self.layer_norm(node), x)
        for kind, slope in MODULE_SLOPES.items():
            if type(module) is kind:
                return slope(module) * x
        if isinstance(module, nn.modules.dropout._DropoutNd):
            if module.training and module.p > 0 and not self.inference:
                raise _NoRule("dropout in training mode (random); put the model in eval mode")
            return x
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            if module.running_var is None or module.training and not self.inference:
                raise _NoRule(f"{type(module).__name__} in training mode depends on the batch; "
                              f"put the model in eval mode")
            return _scale(_bn_scale(module.weight, module.running_var, module.eps), x)
        if isinstance(module, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)):
            return _scale(self._max_pool(node, module.kernel_size, module.stride, module.padding,
                                         module.dilation, module.ceil_mode), x)
        if isinstance(module, (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)):
            return _scale(self._avg_pool(node, module.kernel_size, module.stride, module.padding, module.ceil_mode,
                                         module.count_include_pad, getattr(module, "divisor_override", None)), x)
        if isinstance(module, (nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)):
            return _scale(self._adaptive(node, module.output_size, average=True), x)
        if isinstance(module, (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)):
            return _scale(self._adaptive(node, module.output_size, average=False), x)
        if isinstance(module, nn.Upsample):
            return _scale(self._nearest(node, module.mode, module.scale_factor), x)
        if isinstance(module, nn.Sequential) and len(module) == 0:
            return x
        raise _NoRule(f"no Lipschitz rule for module {type(module).__name__} ({node.target})")

    # Functions --------------------------------------------------------------------------

    def _function(self, node: fx.Node) -> Value:
        target = node.target
        args, kwargs = node.args, node.kwargs
        if target in FUNCTION_SLOPES:
            return FUNCTION_SLOPES[target](_arguments(target, args, kwargs)) * self._l(args[0])
        if target in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, aten.dropout.default):
            training = kwargs.get("training", args[2] if len(args) > 2 else (target is aten.dropout.default))
            if training and not self.inference:
                raise _NoRule("dropout in training mode (random)")
            return self._l(args[0])
        if target in ADDS or target in SUBS:
            a, b = (args + (None,))[:2] if len(args) >= 2 else (args[0], kwargs.get("other"))
            alpha = kwargs.get("alpha", 1)
            la, lb = self._l(a), self._l(b)
            return la + abs(float(alpha)) * lb if not _is_zero(lb) else la
        if target in MULS or target in DIVS:
            return self._product(node, args[0], args[1] if len(args) > 1 else kwargs.get("other"),
                                 divide=target in DIVS)
        if target is operator.getitem:
            return self._getitem(node)
        if target is getattr and node.args[1] in SHAPE_ATTRIBUTES:
            return 0.0  # shape metadata, not a value that varies with the input's entries
        if target in CATS:
            return self._root_sum_square([self._l(t) for t in args[0]], node)
        if target in SPLITS:
            return self._l(args[0])
        if target in MEANS or target in SUMS:
            return self._reduce(node, average=target in MEANS)
        if target in PADS:
            return self._pad(node)
        if target in BATCH_NORMS:
            return self._batch_norm_function(node)
        if target in (F.max_pool1d, F.max_pool2d, F.max_pool3d, aten.max_pool2d_with_indices.default,
                      aten.max_pool2d.default, aten.max_pool3d_with_indices.default):
            bound = bind_schema(target, args, kwargs) if isinstance(target, torch._ops.OpOverload) else \
                _bind_pool(args, kwargs)
            return _scale(self._max_pool(node, bound["kernel_size"], bound.get("stride") or bound["kernel_size"],
                                         bound.get("padding", 0), bound.get("dilation", 1),
                                         bound.get("ceil_mode", False)), self._l(args[0]))
        if target in (F.avg_pool1d, F.avg_pool2d, F.avg_pool3d, aten.avg_pool2d.default, aten.avg_pool3d.default):
            bound = bind_schema(target, args, kwargs) if isinstance(target, torch._ops.OpOverload) else \
                _bind_pool(args, kwargs, average=True)
            return _scale(self._avg_pool(node, bound["kernel_size"], bound.get("stride") or bound["kernel_size"],
                                         bound.get("padding", 0), bound.get("ceil_mode", False),
                                         bound.get("count_include_pad", True), bound.get("divisor_override")),
                          self._l(args[0]))
        if target in (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
                      aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default,
                      aten.adaptive_avg_pool1d.default, aten._adaptive_avg_pool3d.default):
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            return _scale(self._adaptive(node, size, average=True), self._l(args[0]))
        if target in (F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d):
            size = args[1] if len(args) > 1 else kwargs["output_size"]
            return _scale(self._adaptive(node, size, average=False), self._l(args[0]))
        if target in (F.interpolate, F.upsample):
            mode = kwargs.get("mode", args[3] if len(args) > 3 else "nearest")
            scale = kwargs.get("scale_factor", args[2] if len(args) > 2 else None)
            return _scale(self._nearest(node, mode, scale), self._l(args[0]))
        if target in (F.linear, torch._C._nn.linear, aten.linear.default, torch.conv1d, torch.conv2d, torch.conv3d,
                      aten.convolution.default, aten.conv1d.default, aten.conv2d.default, aten.conv3d.default,
                      aten.conv1d.padding, aten.conv2d.padding, aten.conv3d.padding):
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            if not _is_zero(self._l(weight)):
                raise _NoRule("a layer whose weight depends on the input")
            return _scale(self.layer_norm(node), self._l(args[0]))
        raise _NoRule(f"no Lipschitz rule for {_target_name(target)}")

    def _method(self, node: fx.Node) -> Value:
        name = node.target
        x = self._l(node.args[0])
        if name in METHOD_SLOPES:
            return METHOD_SLOPES[name] * x
        if name in ("add", "add_", "sub", "sub_", "__add__", "__radd__", "__sub__", "__rsub__"):
            other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            alpha = node.kwargs.get("alpha", 1)
            lb = self._l(other)
            return x + abs(float(alpha)) * lb if not _is_zero(lb) else x
        if name in ("mul", "mul_", "div", "div_", "__mul__", "__rmul__", "__truediv__"):
            other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            return self._product(node, node.args[0], other, divide=name.startswith(("div", "__truediv")))
        if name in ("split", "chunk", "unbind"):
            return x
        if name in SHAPE_METHODS:
            return 0.0
        if name in ("mean", "sum"):
            return self._reduce(node, average=name == "mean")
        if name == "leaky_relu":
            return max(1.0, abs(float(node.kwargs.get("negative_slope", 0.01)))) * x
        raise _NoRule(f"no Lipschitz rule for method .{name}()")

    # Op-specific rules --------------------------------------------------------------------

    def _product(self, node: fx.Node, a: Any, b: Any, divide: bool) -> Value:
        la, lb = self._l(a), self._l(b)
        if not _is_zero(la) and not _is_zero(lb):
            raise _NoRule("a product of two input-dependent values is not globally Lipschitz")
        if divide and not _is_zero(lb):
            raise _NoRule("division by an input-dependent value")
        live, constant = (la, b) if not _is_zero(la) else (lb, a)
        magnitude = self._constant_magnitude(constant)
        if divide:
            if magnitude[1] == 0:
                raise _NoRule("division by a constant that has zero entries")
            return live / magnitude[1]
        return live * magnitude[0]

    def _constant_magnitude(self, value: Any) -> tuple[Number, Number]:
        """Largest and smallest magnitude of a constant factor (a number or a held tensor)."""
        if isinstance(value, (int, float)):
            return abs(float(value)), abs(float(value))
        if isinstance(value, fx.Node) and value.op == "get_attr":
            tensor = self._held(value)
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                return tensor.abs().max(), tensor.abs().min()
        raise _NoRule("a factor computed in the graph (its magnitude is not known before running it)")

    def _getitem(self, node: fx.Node) -> Value:
        source, index = node.args
        x = self._l(source)
        info = tensor_info(source)
        if info is None and isinstance(source, fx.Node):  # an element of a tuple (split, pooling indices, …)
            return x
        indices = index if isinstance(index, tuple) else (index,)
        if all(i is None or i is Ellipsis or isinstance(i, (int, slice)) for i in indices):
            return x  # a projection onto some entries
        raise _NoRule("indexing with a tensor or list (it may repeat entries)")

    def _spatial(self, node: fx.Node) -> tuple[int, ...]:
        """The shape of the node's (first) input."""
        info = tensor_info(node.args[0])
        if info is None:
            raise _NoRule("the graph records no shape for the input")
        return tuple(int(n) for n in info[0])

    def _max_pool(self, node: fx.Node, kernel: Any, stride: Any, padding: Any, dilation: Any,
                  ceil_mode: bool) -> float:
        shape = self._spatial(node)
        rank = len(kernel) if isinstance(kernel, (tuple, list)) else _pool_rank(node, shape)
        counts = 1
        for n, k, s, p, d in zip(shape[-rank:], *(_expand(v, rank) for v in (kernel, stride or kernel, padding,
                                                                            dilation))):
            counts *= int(_window_counts(n, k, s, p, d, ceil_mode).max())
        return math.sqrt(counts)

    def _avg_pool(self, node: fx.Node, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                  include_pad: bool, divisor: Optional[int]) -> float:
        shape = self._spatial(node)
        rank = len(kernel) if isinstance(kernel, (tuple, list)) else _pool_rank(node, shape)
        matrices = []
        for n, k, s, p in zip(shape[-rank:], *(_expand(v, rank) for v in (kernel, stride or kernel, padding))):
            matrices.append(_average_matrix(n, k, s, p, ceil_mode, include_pad, bool(divisor)))
        # The pooling matrix is the Kronecker product of the axes' (each window's divisor is
        # the product of its extents per axis, or the fixed divisor), and the Schur bound of
        # a Kronecker product is the product of the factors'.
        bound = math.prod(_schur(m) for m in matrices)
        return bound / divisor if divisor else bound

    def _adaptive(self, node: fx.Node, output_size: Any, average: bool) -> float:
        shape = self._spatial(node)
        rank = len(output_size) if isinstance(output_size, (tuple, list)) else _pool_rank(node, shape)
        sizes = _expand(output_size, rank) if not isinstance(output_size, (tuple, list)) else list(output_size)
        bound = 1.0
        for n, m in zip(shape[-rank:], sizes):
            m = n if m is None else int(m)
            starts = [(i * n) // m for i in range(m)]
            ends = [-(-((i + 1) * n) // m) for i in range(m)]
            matrix = torch.zeros(m, n, dtype=torch.float64)
            for i, (a, b) in enumerate(zip(starts, ends)):
                matrix[i, a:b] = 1.0 / (b - a) if average else 1.0
            bound *= _schur(matrix) if average else math.sqrt(float(matrix.sum(0).max()))
        return bound

    def _nearest(self, node: fx.Node, mode: Any, scale: Any) -> float:
        if mode != "nearest" or scale is None:
            raise _NoRule("upsampling other than 'nearest' by an integer scale factor")
        factors = list(scale) if isinstance(scale, (tuple, list)) else [scale] * (len(self._spatial(node)) - 2)
        if any(float(f) != int(f) for f in factors):
            raise _NoRule("nearest upsampling by a non-integer factor")
        return math.sqrt(math.prod(int(f) for f in factors))

    def _reduce(self, node: fx.Node, average: bool) -> Value:
        shape = self._spatial(node)
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if dims is None or dims == []:
            count = math.prod(shape)
        else:
            dims = dims if isinstance(dims, (tuple, list)) else [dims]
            count = math.prod(shape[d] for d in dims)
        x = self._l(node.args[0])
        # A mean over N entries is the row vector 1/N: norm 1/√N; a sum's is √N.
        return x / math.sqrt(count) if average else x * math.sqrt(count)

    def _pad(self, node: fx.Node) -> Value:
        x = self._l(node.args[0])
        if node.target is F.pad:
            mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        elif node.target is aten.pad.default:
            mode = bind_schema(node.target, node.args, node.kwargs)["mode"]
        else:
            mode = "constant"
        if mode != "constant":
            raise _NoRule(f"{mode} padding (it copies samples)")
        return x  # adding samples of a constant value changes no distance

    def _batch_norm_function(self, node: fx.Node) -> Value:
        if node.target is aten._native_batch_norm_legit_no_training.default:
            a = bind_schema(node.target, node.args, node.kwargs)
            weight, var, eps = a["weight"], a["running_var"], a["eps"]
        else:
            if node.target is F.batch_norm:
                names = ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"]
                a = dict(zip(names, node.args))
                a.update(node.kwargs)
                a.setdefault("training", False)
                a.setdefault("eps", 1e-5)
            else:
                a = bind_schema(node.target, node.args, node.kwargs)
            if a.get("training") and not self.inference:
                raise _NoRule("batch norm in training mode depends on the batch; put the model in eval mode")
            weight, var, eps = a.get("weight"), a["running_var"], a["eps"]
        held = [self._held(t) for t in (weight, var)]
        if held[1] is None or (weight is not None and held[0] is None):
            raise _NoRule("batch norm statistics computed in the graph")
        return _scale(_bn_scale(held[0], held[1], float(eps)), self._l(node.args[0]))

    def _held(self, value: Any) -> Optional[torch.Tensor]:
        if isinstance(value, fx.Node) and value.op == "get_attr":
            tensor = self.root
            for part in value.target.split("."):
                tensor = getattr(tensor, part)
            return tensor
        return None


class _NoRule(Exception):
    """The node has no rule; the message says why."""


def _scale(factor: Value, x: Value) -> Value:
    if isinstance(factor, Unknown):
        return factor
    return factor * x


def _bn_scale(weight: Optional[torch.Tensor], var: torch.Tensor, eps: float) -> Number:
    """``max |γ / √(var + ε)|`` in float64 (a float32 buffer's rounding would otherwise be
    the bound's), differentiable in ``γ``."""
    scale = 1.0 / torch.sqrt(var.detach().to(torch.float64) + eps)
    if weight is not None:
        scale = scale * weight.to(torch.float64)
    return scale.abs().max()


def _arguments(target: Any, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by name (slopes may be passed positionally): by schema for ATen
    ops, by signature for Python functions; builtins without one give their keywords."""
    if isinstance(target, torch._ops.OpOverload):
        return bind_schema(target, args, kwargs)
    try:
        bound = inspect.signature(target).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return dict(kwargs)
    bound.apply_defaults()
    return dict(bound.arguments)


def _tensors(value: Any, values: dict) -> list:
    if isinstance(value, fx.Node):
        return [values.get(value, 0.0)]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _tensors(item, values)]
    if isinstance(value, dict):
        return [v for item in value.values() for v in _tensors(item, values)]
    return []


def _expand(value: Any, rank: int) -> list[int]:
    if isinstance(value, (tuple, list)):
        return [int(v) for v in value] * (rank if len(value) == 1 else 1)
    return [int(value)] * rank


def _pool_rank(node: fx.Node, shape: tuple[int, ...]) -> int:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    if node.op == "call_module":
        name = type(node.graph.owning_module.get_submodule(node.target)).__name__
    for rank in (1, 2, 3):
        if f"{rank}d" in name.lower():
            return rank
    return len(shape) - 2


def _window_counts(n: int, k: int, s: int, p: int, d: int, ceil_mode: bool) -> torch.Tensor:
    """How many pooling windows read each of the ``n`` samples of one axis."""
    span = d * (k - 1) + 1
    out = (n + 2 * p - span + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1  # torch drops a last window that would start in the right padding
    counts = torch.zeros(n, dtype=torch.long)
    for t in range(out):
        for m in range(k):
            i = t * s + m * d - p
            if 0 <= i < n:
                counts[i] += 1
    return counts


def _average_matrix(n: int, k: int, s: int, p: int, ceil_mode: bool, include_pad: bool,
                    summed: bool) -> torch.Tensor:
    """One axis of an average pooling: row ``t`` averages window ``t`` (or sums it, where a
    fixed divisor is applied afterwards)."""
    out = (n + 2 * p - k + (s - 1 if ceil_mode else 0)) // s + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    matrix = torch.zeros(out, n, dtype=torch.float64)
    for t in range(out):
        start, end = t * s - p, min(t * s - p + k, n + p)
        inside = [i for i in range(start, end) if 0 <= i < n]
        if summed:
            weight = 1.0
        elif include_pad:
            weight = 1.0 / (end - start)
        else:
            weight = 1.0 / max(len(inside), 1)
        for i in inside:
            matrix[t, i] = weight
    return matrix


def _schur(matrix: torch.Tensor) -> float:
    """``√(‖A‖₁ ‖A‖_∞) ≥ ‖A‖₂``: tight for the averaging matrices of pooling."""
    a = matrix.abs()
    return math.sqrt(float(a.sum(0).max()) * float(a.sum(1).max()))


def _bind_pool(args: tuple, kwargs: dict, average: bool = False) -> dict:
    names = ["input", "kernel_size", "stride", "padding"] + (
        ["ceil_mode", "count_include_pad", "divisor_override"] if average else ["dilation", "ceil_mode"])
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _target_name(target: Any) -> str:
    if isinstance(target, str):
        return target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or str(target)
    return f"{module}.{name}" if module and not isinstance(target, torch._ops.OpOverload) else str(target)
