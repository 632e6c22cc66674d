"""Keys specfx writes into ``node.meta``, so passes, verification and diffs agree."""

PLAN = "specfx_plan"                # on a conv node: its ConvPlan (passes/plan_convs.py)
LOWERED_FROM = "specfx_lowered_from"  # on every node a rewrite added: the conv's report name
REPLACES = "specfx_replaces"        # on the node that now computes a conv's output: the conv node's name
