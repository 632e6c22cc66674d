"""specfx's rewrite and analysis passes, one per file, in pipeline order.

Every pass is ``(gm, ctx) -> PassResult``; :data:`PIPELINE` is the order they run in.
"""

from specfx.pipeline import RegisteredPass

from .lower_convs import lower_convs
from .plan_convs import plan_convs

PIPELINE: list[RegisteredPass] = [
    RegisteredPass("plan_convs", plan_convs, analysis=True,
                   doc="cost every conv (direct vs FFT) and plan the FFT grid of those to lower"),
    RegisteredPass("lower_convs", lower_convs, analysis=False,
                   doc="rewrite planned convs into to_spectrum -> spectral_mix -> from_spectrum"),
]

__all__ = ["PIPELINE", "plan_convs", "lower_convs"]
