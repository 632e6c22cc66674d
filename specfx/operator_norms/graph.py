"""The linear layers of a model, found in its fx graph with the sizes they run at.

A model is captured as specfx captures it for optimization (:func:`specfx.capture.capture`:
``symbolic_trace``, then ``torch.export``), its convolutions found in every form by
:func:`specfx.canonical.find_conv_sites`, and its ``nn.Linear`` / ``F.linear`` calls
beside them. Each layer comes with its weight as the model holds it (so a clip writes
into the model's own parameter and a penalty differentiates through it) and, for a conv,
its :class:`~.layer.ConvOperator` at the spatial size its input has in the graph.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from ..canonical import ConvSite, find_conv_sites, source_name, tensor_info, weight_value
from ..capture import capture
from .layer import ConvOperator, LayerError, as_operator

ExampleInputs = Union[torch.Tensor, Sequence[Any]]
LINEAR_FUNCTIONS = (F.linear, torch._C._nn.linear, torch.ops.aten.linear.default)


@dataclasses.dataclass
class LayerSite:
    """One conv or linear layer of the graph.

    ``weight`` is the tensor the model holds (a parameter, or a parametrization's result);
    ``parameter`` is the model's ``nn.Parameter`` behind it where one can be written in
    place (``None`` for computed weights); ``op`` the conv's operator at its input size.
    ``problem`` says why the layer cannot be analysed, when it cannot.
    """

    name: str
    node: fx.Node
    kind: str  # "conv" | "linear"
    weight: Optional[torch.Tensor] = None
    parameter: Optional[nn.Parameter] = None
    op: Optional[ConvOperator] = None
    problem: Optional[str] = None

    def describe(self) -> str:
        if self.op is not None:
            return self.op.describe()
        if self.kind == "linear" and self.weight is not None:
            return f"Linear {self.weight.shape[1]}→{self.weight.shape[0]}"
        return self.kind


def as_inputs(example_inputs: ExampleInputs) -> tuple:
    """``example_inputs`` as a tuple of positional inputs (a lone tensor becomes one)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    return tuple(example_inputs)


def capture_graph(model: nn.Module, example_inputs: ExampleInputs, frontend: str = "auto",
                  notes: Optional[list[str]] = None) -> tuple[fx.GraphModule, str]:
    """The model's graph with shapes on every node, and the front end that captured it."""
    return capture(model, as_inputs(example_inputs), frontend, notes)


def find_layers(gm: fx.GraphModule) -> list[LayerSite]:
    """Every conv and linear layer of ``gm``, in graph order."""
    convs = {site.node: site for site in find_conv_sites(gm)}
    layers = []
    for node in gm.graph.nodes:
        if node in convs:
            layers.append(_conv_layer(gm, convs[node]))
        elif _is_linear(gm, node):
            layers.append(_linear_layer(gm, node))
    return layers


def _parameter(gm: fx.GraphModule, path: str) -> Optional[nn.Parameter]:
    owner, _, attr = path.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    value = module._parameters.get(attr)
    return value if isinstance(value, nn.Parameter) else None


def _conv_layer(gm: fx.GraphModule, site: ConvSite) -> LayerSite:
    layer = LayerSite(site.name, site.node, "conv")
    info = tensor_info(site.input)
    if info is None:
        layer.problem = "the graph records no shape for the conv's input"
        return layer
    spatial = tuple(int(n) for n in info[0][-site.rank:])
    if site.form == "module":
        module = gm.get_submodule(site.node.target)
        layer.weight = module.weight
        layer.parameter = None if site.parametrized_weight else _parameter(gm, site.weight)
        try:
            layer.op = as_operator(module, spatial, name=site.name)
        except LayerError as err:
            layer.problem = str(err)
        return layer
    weight = weight_value(gm, site)
    if weight is None:
        layer.problem = "its weight is computed in the graph, not held by the model"
        return layer
    layer.weight = weight
    if isinstance(site.weight, fx.Node) and site.weight.op == "get_attr":
        layer.parameter = _parameter(gm, site.weight.target)
    if site.transposed:
        layer.problem = "a functional transposed conv (only nn.ConvTransposeNd modules are analysed)"
        return layer
    try:
        layer.op = as_operator(weight, spatial, stride=site.stride, padding=site.padding, dilation=site.dilation,
                               groups=site.groups, name=site.name)
    except LayerError as err:
        layer.problem = str(err)
    return layer


def _is_linear(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), nn.Linear)
    return node.op == "call_function" and node.target in LINEAR_FUNCTIONS


def _linear_layer(gm: fx.GraphModule, node: fx.Node) -> LayerSite:
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        parametrized = nn.utils.parametrize.is_parametrized(module, "weight")
        return LayerSite(str(node.target), node, "linear", module.weight,
                         None if parametrized else _parameter(gm, f"{node.target}.weight"))
    name = source_name(node)
    weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    if not (isinstance(weight_node, fx.Node) and weight_node.op == "get_attr"):
        return LayerSite(name, node, "linear", problem="its weight is computed in the graph, not held by the model")
    weight = gm
    for part in weight_node.target.split("."):
        weight = getattr(weight, part)
    return LayerSite(name, node, "linear", weight, _parameter(gm, weight_node.target))


def current_weight(root: nn.Module, layer: LayerSite) -> torch.Tensor:
    """The layer's weight as ``root`` (the graph module, or the model it was captured from)
    holds it now, by qualified name: re-read, so a parametrization is recomputed and a
    replaced parameter is seen."""
    node = layer.node
    if node.op == "call_module":
        return root.get_submodule(node.target).weight
    weight_node = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
    value: Any = root
    for part in weight_node.target.split("."):
        value = getattr(value, part)
    return value
