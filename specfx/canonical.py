"""One view of every convolution form in an fx graph.

``nn.ConvNd`` modules (``call_module``), ``F.convNd`` / ``torch.convNd`` calls,
``aten.convNd.default`` / ``.padding`` and ``aten.convolution.default`` all become a
:class:`ConvSite`: where the input, weight and bias come from, and the conv's arguments
in resolved form. Arguments are bound against the op's own signature (or schema), so
positional and keyword spellings, and defaults, read the same.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn
from torch.nn.utils import parametrize

from .geometry import PaddingArg, expand

aten = torch.ops.aten

FUNCTIONAL_CONVS = {torch.conv1d: 1, torch.conv2d: 2, torch.conv3d: 3}
FUNCTIONAL_TRANSPOSED = {torch.conv_transpose1d: 1, torch.conv_transpose2d: 2, torch.conv_transpose3d: 3}
ATEN_CONVS = {
    aten.conv1d.default: 1, aten.conv2d.default: 2, aten.conv3d.default: 3,
    aten.conv1d.padding: 1, aten.conv2d.padding: 2, aten.conv3d.padding: 3,
}
ATEN_TRANSPOSED = {aten.conv_transpose1d.default: 1, aten.conv_transpose2d.input: 2,
                   aten.conv_transpose3d.input: 3}


def _functional_conv_signature(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    """The Python signature of ``torch.convNd`` (a builtin, which has none of its own)."""


def _transposed_conv_signature(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1,
                               dilation=1):
    """The Python signature of ``torch.conv_transposeNd``."""


_FUNCTIONAL_SIGNATURE = inspect.signature(_functional_conv_signature)
_TRANSPOSED_SIGNATURE = inspect.signature(_transposed_conv_signature)


@dataclasses.dataclass
class ConvSite:
    """A convolution in the graph, in canonical form.

    ``weight`` and ``bias`` are graph nodes when the graph computes or fetches them, or
    attribute paths (``"layer.conv.weight"``) on the module for ``call_module`` convs,
    which the rewrite turns into ``get_attr`` nodes. ``padding`` is as written
    (ints, ``'same'``, ``'valid'``); ``padding_mode`` is ``nn.ConvNd``'s.
    """

    node: fx.Node
    name: str
    form: str  # "module" | "function" | "aten"
    rank: int
    input: fx.Node
    weight: Union[fx.Node, str]
    bias: Union[fx.Node, str, None]
    stride: list[int]
    padding: PaddingArg
    dilation: list[int]
    groups: int
    padding_mode: str = "zeros"
    transposed: bool = False
    parametrized_weight: bool = False
    not_lowerable: Optional[str] = None  # why this conv can't be lowered at all

    @property
    def weight_per_call(self) -> bool:
        """Whether the weight is a new tensor on every call (computed in the graph, e.g. by
        an exported weight norm, or through a parametrization): its spectrum is then
        computed on every call, where a parameter's is cached."""
        if self.parametrized_weight:
            return True
        return isinstance(self.weight, fx.Node) and self.weight.op not in ("get_attr", "placeholder")


def _padding_arg(padding: Any, rank: int) -> PaddingArg:
    return padding if isinstance(padding, str) else expand(padding, rank)


def _from_module(gm: fx.GraphModule, node: fx.Node) -> Optional[ConvSite]:
    module = gm.get_submodule(node.target)
    if not isinstance(module, nn.modules.conv._ConvNd):
        return None
    rank = len(module.kernel_size)
    has_bias = module.bias is not None
    site = ConvSite(
        node=node, name=str(node.target), form="module", rank=rank, input=node.args[0],
        weight=f"{node.target}.weight", bias=f"{node.target}.bias" if has_bias else None,
        stride=list(module.stride), padding=_padding_arg(module.padding, rank),
        dilation=list(module.dilation), groups=module.groups, padding_mode=module.padding_mode,
        transposed=module.transposed,
        parametrized_weight=parametrize.is_parametrized(module, "weight"),
    )
    if len(node.args) + len(node.kwargs) != 1:
        site.not_lowerable = "module called with more than the input (an output_size argument)"
    elif module._forward_hooks or module._forward_pre_hooks:
        site.not_lowerable = "module has forward hooks, which a lowered conv would not run"
    elif type(module).forward not in (nn.Conv1d.forward, nn.Conv2d.forward, nn.Conv3d.forward) and not site.transposed:
        site.not_lowerable = f"{type(module).__name__} overrides forward()"
    return site


def _from_function(node: fx.Node) -> ConvSite:
    bound = _FUNCTIONAL_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    rank = FUNCTIONAL_CONVS[node.target]
    return ConvSite(
        node=node, name=node.name, form="function", rank=rank, input=a["input"],
        weight=a["weight"], bias=a["bias"], stride=expand(a["stride"], rank),
        padding=_padding_arg(a["padding"], rank), dilation=expand(a["dilation"], rank),
        groups=a["groups"])


def bind_schema(op: torch._ops.OpOverload, args: tuple, kwargs: dict) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in."""
    bound: dict[str, Any] = {}
    for i, arg in enumerate(op._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        elif arg.has_default_value():
            bound[arg.name] = arg.default_value
        else:
            raise TypeError(f"{op} is missing required argument {arg.name!r}")
    return bound


def _from_aten(node: fx.Node) -> ConvSite:
    a = bind_schema(node.target, node.args, node.kwargs)
    if node.target is aten.convolution.default:
        rank = len(a["stride"])
        transposed = bool(a["transposed"])
    else:
        rank = ATEN_CONVS.get(node.target) or ATEN_TRANSPOSED[node.target]
        transposed = node.target in ATEN_TRANSPOSED
    return ConvSite(
        node=node, name=node.name, form="aten", rank=rank, input=a["input"], weight=a["weight"],
        bias=a["bias"], stride=expand(a["stride"], rank), padding=_padding_arg(a["padding"], rank),
        dilation=expand(a["dilation"], rank), groups=a["groups"], transposed=transposed)


def _transposed_function(node: fx.Node) -> ConvSite:
    bound = _TRANSPOSED_SIGNATURE.bind(*node.args, **node.kwargs)
    bound.apply_defaults()
    a = bound.arguments
    rank = FUNCTIONAL_TRANSPOSED[node.target]
    return ConvSite(node=node, name=node.name, form="function", rank=rank, input=a["input"],
                    weight=a["weight"], bias=a["bias"], stride=expand(a["stride"], rank),
                    padding=expand(a["padding"], rank), dilation=expand(a["dilation"], rank),
                    groups=a["groups"], transposed=True)


def conv_site(gm: fx.GraphModule, node: fx.Node) -> Optional[ConvSite]:
    """The canonical view of ``node`` if it is a convolution, else ``None``."""
    site: Optional[ConvSite] = None
    if node.op == "call_module":
        site = _from_module(gm, node)
    elif node.op == "call_function":
        if node.target in FUNCTIONAL_CONVS:
            site = _from_function(node)
        elif node.target in FUNCTIONAL_TRANSPOSED:
            site = _transposed_function(node)
        elif node.target in ATEN_CONVS or node.target in ATEN_TRANSPOSED or node.target is aten.convolution.default:
            site = _from_aten(node)
    if site is None:
        return None
    if site.form != "module":
        site.name = source_name(node)
    if site.transposed:
        site.not_lowerable = "transposed convolution: specfx lowers forward convolutions only"
    return site


_DYNAMO_ROOT = re.compile(r"^L\['[^']*'\]\.?")  # "L['self'].block.conv" -> "block.conv"


def source_name(node: fx.Node) -> str:
    """The qualified name of the module a node came from (``nn_module_stack`` meta, as
    export and tracing record it; Dynamo's paths lose their ``L['self'].`` root), or the
    node's own name when it came from the root."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack")
    if stack:
        path = _DYNAMO_ROOT.sub("", list(stack.values())[-1][0])
        if path:
            return path
    return node.name


def find_conv_sites(gm: fx.GraphModule) -> list[ConvSite]:
    """Every convolution in the graph, in graph order, with unique names."""
    sites = [site for node in gm.graph.nodes if (site := conv_site(gm, node)) is not None]
    seen: dict[str, int] = {}
    for site in sites:
        count = seen.get(site.name, 0)
        seen[site.name] = count + 1
        if count:
            site.name = f"{site.name}#{count + 1}"
    return sites


def weight_value(gm: fx.GraphModule, site: ConvSite) -> Optional[torch.Tensor]:
    """The weight tensor when it lives on the module (parameter or computed by a
    parametrization), else ``None`` (then its shape comes from graph metadata)."""
    if isinstance(site.weight, str):
        owner, _, attr = site.weight.rpartition(".")
        return getattr(gm.get_submodule(owner), attr)
    if site.weight.op == "get_attr":
        return _fetch_attr(gm, site.weight.target)
    return None


def weight_shape(gm: fx.GraphModule, site: ConvSite) -> Optional[tuple[int, ...]]:
    """The weight's shape: from the tensor where the module holds it, else from the graph's
    shape metadata; ``None`` where neither knows it."""
    weight = weight_value(gm, site)
    if weight is not None:
        return tuple(weight.shape)
    info = tensor_info(site.weight)
    return tuple(info[0]) if info is not None else None


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


TensorInfo = tuple[torch.Size, torch.dtype]


def tensor_info(node: Any) -> Optional[TensorInfo]:
    """Shape and dtype of a node's value, from shape-propagation or fake-tensor meta
    (``"val"`` in export and AOT graphs, ``"example_value"`` in Dynamo graphs). Under
    dynamic shapes the sizes may be ``torch.SymInt``."""
    if not isinstance(node, fx.Node):
        return None
    for key in ("val", "example_value"):
        val = node.meta.get(key)
        if isinstance(val, torch.Tensor):
            return val.shape, val.dtype
    meta = node.meta.get("tensor_meta")
    if meta is not None and hasattr(meta, "shape"):
        return meta.shape, meta.dtype
    return None

