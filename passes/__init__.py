"""specfx's rewrite and analysis passes, one per file, in pipeline order.

Every pass is ``(gm, ctx) -> PassResult``; :data:`PIPELINE` is the order they run in.
"""

from specfx.pipeline import RegisteredPass

from .find_chains import find_chains
from .fuse_chains import fuse_chains
from .lower_convs import lower_convs
from .merge_convs import merge_convs
from .plan_convs import plan_convs

PIPELINE: list[RegisteredPass] = [
    RegisteredPass("plan_convs", plan_convs, analysis=True,
                   doc="cost every conv (direct vs FFT) and plan the FFT grid of those to lower"),
    RegisteredPass("find_chains", find_chains, analysis=True,
                   doc="find conv -> ... -> conv chains, place their transforms by min-cut, plan fusion"),
    RegisteredPass("lower_convs", lower_convs, analysis=False,
                   doc="rewrite planned convs into to_spectrum -> spectral_mix -> from_spectrum"),
    RegisteredPass("fuse_chains", fuse_chains, analysis=False,
                   doc="keep fused chains in the frequency domain (spectral activations, no transform pairs)"),
    RegisteredPass("merge_convs", merge_convs, analysis=False,
                   doc="run each lowered conv outside a chain as one spectral_conv call"),
]

__all__ = ["PIPELINE", "plan_convs", "find_chains", "lower_convs", "fuse_chains", "merge_convs"]
