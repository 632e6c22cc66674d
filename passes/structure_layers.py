"""Put the structured layers ``plan_structure`` fitted in place of the dense ones.

Each planned layer's module is replaced, at the same path, by its structured layer, and
each call of the dense layer (an ``nn.Linear`` call, or an ``F.linear``/``aten.linear``
call on that module's parameters) by a call of the new module. The new node carries the
old one's metadata, with ``specfx_replaces`` naming the node it replaces, so diffs and
reports find the layer. A second run finds no dense layer left to replace.
"""

from __future__ import annotations

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from specfx import node_meta
from specfx.nn.structure_plan import STRUCTURE_PLAN
from specfx.pipeline import PassContext, at_node


def structure_layers(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    installed: set[str] = set()
    modified = False
    for node in list(graph.nodes):
        plan = node.meta.get(STRUCTURE_PLAN)
        if plan is None:
            continue
        with at_node(node):
            if plan.path not in installed:
                gm.add_submodule(plan.path, plan.module)
                installed.add(plan.path)
            source = node.args[0] if node.args else node.kwargs["input"]
            with graph.inserting_before(node):
                new = graph.create_node("call_module", plan.path, (source,), {}, name=f"{node.name}_{plan.kind}")
            new.meta.update({key: value for key, value in node.meta.items() if key != STRUCTURE_PLAN})
            new.meta[node_meta.REPLACES] = node.name
            new.meta[node_meta.LOWERED_FROM] = plan.layer
            operands = [arg for arg in node.all_input_nodes if arg.op == "get_attr"]
            node.replace_all_uses_with(new)
            graph.erase_node(node)
            # The dense weight and bias the call read are gone with its module.
            for operand in operands:
                if not operand.users:
                    graph.erase_node(operand)
            modified = True
    return PassResult(gm, modified)
