"""specfx's rewrite and analysis passes, one per file, in pipeline order.

Every pass is ``(gm, ctx) -> PassResult``; :data:`PIPELINE` is the order they run in,
and each entry's ``requires`` names the passes whose results it reads (checked by
:func:`specfx.pipeline.run_pipeline`; ``specfx passes`` lists them).
"""

from specfx.pipeline import RegisteredPass

from .find_chains import find_chains
from .fuse_chains import fuse_chains
from .lower_convs import lower_convs
from .merge_convs import merge_convs
from .plan_convs import plan_convs
from .time_chains import time_chains

PIPELINE: list[RegisteredPass] = [
    RegisteredPass("plan_convs", plan_convs, analysis=True,
                   doc="cost every conv (direct vs FFT) and plan the FFT grid of those to lower"),
    RegisteredPass("find_chains", find_chains, analysis=True,
                   doc="find conv -> ... -> conv chains, place their transforms by min-cut, plan fusion",
                   requires=("plan_convs",)),
    RegisteredPass("time_chains", time_chains, analysis=True,
                   doc="time the chains whose fusion is a close call, fused and per-conv, and keep the faster",
                   requires=("find_chains",)),
    # After find_chains: a fused chain's convs are lowered on the chain's grid (ctx.chain_plans).
    RegisteredPass("lower_convs", lower_convs, analysis=False,
                   doc="rewrite planned convs into to_spectrum -> spectral_mix -> from_spectrum",
                   requires=("plan_convs", "find_chains")),
    RegisteredPass("fuse_chains", fuse_chains, analysis=False,
                   doc="keep fused chains in the frequency domain (spectral activations, no transform pairs)",
                   requires=("find_chains", "lower_convs")),
    # After fuse_chains: the lowered convs a chain fused share spectra and must stay three ops.
    RegisteredPass("merge_convs", merge_convs, analysis=False,
                   doc="run each lowered conv outside a chain as one lowered_conv call",
                   requires=("lower_convs", "fuse_chains")),
]

__all__ = ["PIPELINE", "plan_convs", "find_chains", "time_chains", "lower_convs", "fuse_chains", "merge_convs"]
