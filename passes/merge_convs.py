"""Run a lowered conv outside any chain as one ``lowered_conv`` call.

``lower_convs`` emits ``to_spectrum → spectral_mix → from_spectrum`` so that
``fuse_chains`` can drop the transforms between convs. Where nothing but the conv's own
next op reads its two spectra, the split buys nothing and costs two dispatches and Python
calls: on a 2-core CPU the 1D conv (2, 8, 4096) k64 ran in 0.62 ms as one call against
0.78 ms as three. The triple becomes one node of the op that runs the same three
implementations (and, where a gradient is needed, the same three ops). The node takes over
the output node's metadata, so reports, diffs and verification still find the conv.
As the last pass, it also records in the report which implementation each spectral op of
the graph runs on the example inputs' device (``Report.implementations``).

One call holds its input until it returns, where the three ops free it after the forward
transform. A conv whose input dies there is merged only if that input is small
(:data:`HELD_INPUT_BYTES`): overlap-save blocks of wav2vec2's positional conv on 30 s of
audio, held through the contraction, took its peak from 21.7 to 25.0 MiB, and a conv on
inputs that large runs for milliseconds, where the merge saves nothing measurable.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.fx.passes.infra.pass_base import PassResult

from specfx import ops
from specfx.canonical import tensor_info
from specfx.pipeline import PassContext

OPS = torch.ops.specfx

HELD_INPUT_BYTES = 1 << 20


def _sole_reader(node: object, target) -> Optional[fx.Node]:
    """``node`` if it is a call of ``target`` read by one node only."""
    if isinstance(node, fx.Node) and node.target is target and len(node.users) == 1:
        return node
    return None


def _input_bytes(x: fx.Node, in_size: list[int]) -> Optional[int]:
    """Bytes of a conv's input ``x``; for the padded copy the lowering makes (reflect and
    replicate padding), its source's rows at the planned ``in_size``. ``None`` where
    unknown (overlap-save blocks)."""
    source = x.args[0] if x.target is F.pad else x
    info = tensor_info(source)
    if info is None:
        return None
    shape, dtype = info
    if source is not x:
        shape = (*shape[: len(shape) - len(in_size)], *in_size)
    return math.prod(optimization_hint(d) for d in shape) * dtype.itemsize


def _holding_costs_little(x: fx.Node, forward: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether holding ``x`` until the conv returns adds at most :data:`HELD_INPUT_BYTES`
    to the peak: it is a graph input or attribute, read again after ``forward``, or small."""
    if x.op in ("placeholder", "get_attr") or any(order[u] > order[forward] for u in x.users):
        return True
    size = _input_bytes(x, forward.args[1])
    return size is not None and size <= HELD_INPUT_BYTES


def merge_convs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    graph = gm.graph
    order = {node: i for i, node in enumerate(graph.nodes)}
    modified = False
    for out in list(graph.nodes):
        if out.target is not OPS.from_spectrum.default:
            continue
        mix = _sole_reader(out.args[0], OPS.spectral_mix.default)
        forward = mix and _sole_reader(mix.args[0], OPS.to_spectrum.default)
        if forward is None or not isinstance(forward.args[0], fx.Node) \
                or not _holding_costs_little(forward.args[0], forward, order):
            continue
        x, in_size, fft_size = forward.args
        _, weight, _, dilation, shift, groups = mix.args
        _, _, out_size, stride, bias, out_dtype = out.args
        with graph.inserting_before(out):
            conv = graph.call_function(OPS.lowered_conv.default, (
                x, weight, bias, in_size, fft_size, dilation, shift, groups, out_size, stride, out_dtype))
        conv.meta.update(out.meta)
        order[conv] = order[out]
        out.replace_all_uses_with(conv)
        for node in (out, mix, forward):
            graph.erase_node(node)
        modified = True
    ctx.report.implementations = ops.implementations(_spectral_ops(graph), _device(ctx))
    return PassResult(gm, modified)


def _spectral_ops(graph: fx.Graph) -> list[str]:
    """The names of the spectral ops the graph calls, in order of first call."""
    names = (n.target.overloadpacket.__name__ for n in graph.nodes
             if isinstance(n.target, torch._ops.OpOverload) and n.target.namespace == ops.library.NAMESPACE)
    return list(dict.fromkeys(names))


def _device(ctx: PassContext) -> torch.device:
    """The device of the example inputs, which the optimized graph runs on (the CPU when
    there are none)."""
    tensors = [t for t in ctx.example_inputs or () if isinstance(t, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")
