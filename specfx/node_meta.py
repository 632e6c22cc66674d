"""Keys specfx writes into ``node.meta``, so passes, verification and diffs agree."""

from typing import NamedTuple

import torch.fx as fx

PLAN = "specfx_plan"                # on a conv node: its ConvPlan (specfx/chains/plan.py)
LOWERED_FROM = "specfx_lowered_from"  # on every node a rewrite added: the conv's report name
REPLACES = "specfx_replaces"        # on the node that now computes a conv's output: the conv node's name
LOWERED = "specfx_lowered"          # on that node, for a lowered conv: its LoweredConv (passes/lower_convs.py)


class LoweredConv(NamedTuple):
    """The nodes ``lower_convs`` made of one conv (``fuse_chains`` rewires them)."""

    to_spectrum: fx.Node
    spectral_mix: fx.Node
    from_spectrum: fx.Node
