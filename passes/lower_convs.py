"""Rewrite each planned convolution into ``to_spectrum → spectral_mix → from_spectrum``
(between ``split_blocks`` and ``join_blocks`` for overlap-save blocking).

Module convs keep their parameters where they are (the new nodes read them with
``get_attr``), so the module's ``state_dict`` is unchanged; a parametrized weight (e.g.
``weight_norm``) is read through the module attribute, i.e. computed in the graph on
every call exactly as the module would.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from specfx import node_meta
from specfx.canonical import ConvSite, conv_site
from specfx.overlap_save import join_blocks, split_blocks
from specfx.pipeline import PassContext

from .plan_convs import ConvPlan

specfx_ops = torch.ops.specfx


def _attribute_node(graph: fx.Graph, path: str, through_module: bool) -> fx.Node:
    if not through_module:
        return graph.get_attr(path)
    owner, _, attr = path.rpartition(".")
    return graph.call_function(getattr, (graph.get_attr(owner), attr))


def _operand(graph: fx.Graph, value: Union[fx.Node, str, None],
             site: ConvSite) -> Optional[fx.Node]:
    if isinstance(value, str):
        parametrized = site.parametrized_weight and value.endswith(".weight")
        return _attribute_node(graph, value, parametrized)
    return value


def _lower(gm: fx.GraphModule, site: ConvSite, plan: ConvPlan) -> None:
    graph, g = gm.graph, plan.geometry
    with graph.inserting_before(site.node):
        x = site.input
        if g.pre_pad is not None:
            mode, pads = g.pre_pad
            x = graph.call_function(F.pad, (x, list(pads)), {"mode": mode})
        blocks = g.overlap_save
        new_nodes = []
        if blocks is not None:
            x = graph.call_function(split_blocks, (x, blocks.left, blocks.right, blocks.window, blocks.block))
            new_nodes.append(x)
        weight = _operand(graph, site.weight, site)
        bias = _operand(graph, site.bias, site)
        x_hat = graph.call_function(specfx_ops.to_spectrum.default, (x, list(g.in_size), list(g.fft_size)))
        y_hat = graph.call_function(specfx_ops.spectral_mix.default,
                                    (x_hat, weight, list(g.fft_size), list(g.dilation), list(g.shift), site.groups))
        y = graph.call_function(specfx_ops.from_spectrum.default,
                                (y_hat, list(g.fft_size), list(g.out_size), list(g.stride), bias, plan.out_dtype))
        new_nodes += [x_hat, y_hat, y]
        if blocks is not None:
            y = graph.call_function(join_blocks, (y, blocks.count, blocks.out))
            new_nodes.append(y)
    for new in new_nodes:
        new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        new.meta[node_meta.LOWERED_FROM] = site.name
    y.meta[node_meta.REPLACES] = site.node.name
    site.node.replace_all_uses_with(y)
    graph.erase_node(site.node)


def lower_convs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    modified = False
    for node in list(gm.graph.nodes):
        plan = node.meta.get(node_meta.PLAN)
        if plan is None or not plan.lowered:
            continue
        _lower(gm, conv_site(gm, node), plan)
        modified = True
    return PassResult(gm, modified)
