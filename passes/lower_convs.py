"""Rewrite each planned convolution into ``to_spectrum → spectral_mix → from_spectrum``
(between ``split_blocks`` and ``join_blocks`` for overlap-save blocking).

Module convs keep their parameters where they are (the new nodes read them from the
module), so the module's ``state_dict`` is unchanged; a parametrized weight (e.g.
``weight_norm``) is read through the module attribute, i.e. computed in the graph on
every call exactly as the module would. Each lowered conv first checks, per call, its
input against its weight and its module against its plan (:mod:`specfx.guards`).

A conv in a chain ``find_chains`` fused (``ctx.chain_plans``) is lowered onto the chain's
shared grid instead of its own. The node computing each conv's output records the three
lowered nodes (:data:`specfx.node_meta.LOWERED`), which ``fuse_chains`` rewrites.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult

from specfx import guards, node_meta
from specfx.canonical import ConvSite, TensorInfo, conv_site, tensor_info, weight_shape
from specfx.chains.plan import ConvPlan
from specfx.overlap_save import join_blocks, split_blocks
from specfx.sample_selection import emit_selection
from specfx.pipeline import PassContext, at_node

specfx_ops = torch.ops.specfx


def _operand(graph: fx.Graph, value: Union[fx.Node, str, None]) -> Optional[fx.Node]:
    return graph.get_attr(value) if isinstance(value, str) else value


def _checked_weight(gm: fx.GraphModule, site: ConvSite) -> fx.Node:
    """The weight operand, read through a check that the conv is still the one planned
    (:mod:`specfx.guards`): for a module conv, the module's geometry and weight shape (the
    module may be swapped or edited after optimize); otherwise the weight's shape."""
    graph = gm.graph
    if isinstance(site.weight, str):
        owner, _, attr = site.weight.rpartition(".")
        module = gm.get_submodule(owner)
        if site.parametrized_weight:  # computed by reading the module attribute
            module_node = graph.get_attr(owner)
            weight = graph.call_function(getattr, (module_node, attr))
        else:  # (in the order a trace of the lowered module creates the two)
            weight = graph.get_attr(site.weight)
            module_node = graph.get_attr(owner)
        return graph.call_function(guards.module_conv_weight, (
            module_node, weight, site.name, tuple(module.stride), module.padding, tuple(module.dilation),
            module.groups, module.padding_mode, tuple(module.weight.shape)))
    return graph.call_function(guards.conv_weight, (site.weight, site.name, weight_shape(gm, site)))


def _output_dtype(graph: fx.Graph, weight: fx.Node, plan: ConvPlan,
                  input_info: TensorInfo) -> Union[fx.Node, torch.dtype]:
    """The dtype ``from_spectrum`` returns: the weight's at run time (torch's conv requires
    the input's to match it, and returns it: a module converted with ``.double()`` computes
    and returns float64); under autocast (an output dtype other than the input's at
    capture) the captured one."""
    if input_info is not None and plan.out_dtype != input_info[1]:
        return plan.out_dtype
    return graph.call_function(getattr, (weight, "dtype"))


def _lower(gm: fx.GraphModule, site: ConvSite, plan: ConvPlan, input_info: TensorInfo) -> None:
    graph, g = gm.graph, plan.geometry
    with graph.inserting_before(site.node):
        weight = _checked_weight(gm, site)
        new_nodes = [*weight.all_input_nodes, weight]
        x = site.input
        if g.pre_pad is not None:
            mode, pads = g.pre_pad
            x = graph.call_function(F.pad, (x, list(pads)), {"mode": mode})
        if g.selection is not None:
            val = site.input.meta.get("val", site.input.meta.get("example_value"))
            x = emit_selection(gm, x, g, site.node.name, input_info,
                               val.device if isinstance(val, torch.Tensor) else None)
            new_nodes.append(x)
        blocks = g.overlap_save
        if blocks is not None:
            # The input's rank at run time: a conv planned on (N, C, L) also takes (C, L).
            # (Read before the conv, so that the input need not outlive it.)
            input_dim = graph.call_method("dim", (site.input,))
            x = graph.call_function(split_blocks, (x, blocks.left, blocks.right, blocks.window, blocks.block))
            new_nodes += [input_dim, x]
        bias = _operand(graph, site.bias)
        x_hat = graph.call_function(specfx_ops.to_spectrum.default, (x, list(g.in_size), list(g.fft_size)))
        y_hat = graph.call_function(specfx_ops.spectral_mix.default,
                                    (x_hat, weight, list(g.fft_size), list(g.dilation), list(g.shift), site.groups))
        # (Read where it is used: a trace of the lowered module creates it there.)
        out_dtype = _output_dtype(graph, weight, plan, input_info)
        y = graph.call_function(specfx_ops.from_spectrum.default,
                                (y_hat, list(g.fft_size), list(g.out_size), list(g.stride), bias, out_dtype))
        new_nodes += [x_hat, y_hat, y]
        lowered = node_meta.LoweredConv(x_hat, y_hat, y)
        if isinstance(out_dtype, fx.Node):
            new_nodes.append(out_dtype)
        if blocks is not None:
            y = graph.call_function(join_blocks, (y, blocks.count, blocks.out, input_dim))
            new_nodes.append(y)
    for new in new_nodes:
        new.meta.update({k: v for k, v in site.node.meta.items() if k in ("nn_module_stack", "stack_trace")})
        new.meta[node_meta.LOWERED_FROM] = site.name
    y.meta[node_meta.REPLACES] = site.node.name
    y.meta[node_meta.LOWERED] = lowered
    site.node.replace_all_uses_with(y)
    graph.erase_node(site.node)


def lower_convs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    # Input shapes are read before any rewrite: a conv whose input is another lowered
    # conv's output would find a node without shape metadata.
    planned = [(node, tensor_info(conv_site(gm, node).input)) for node in gm.graph.nodes
               if getattr(node.meta.get(node_meta.PLAN), "lowered", False)]
    chain_grids = {conv: plan.grid for plan in ctx.chain_plans for conv in plan.convs}
    for node, input_info in planned:
        plan = node.meta[node_meta.PLAN]
        if node.name in chain_grids:
            geometry = dataclasses.replace(plan.geometry, fft_size=tuple(chain_grids[node.name]))
            plan = dataclasses.replace(plan, geometry=geometry)
        with at_node(node):
            _lower(gm, conv_site(gm, node), plan, input_info)
    return PassResult(gm, bool(planned))
