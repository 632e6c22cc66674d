"""specfx: move the convolutions of a PyTorch model into the frequency domain, exactly.

Importing specfx registers its spectral ops (``torch.ops.specfx.*``).
"""

from . import ops
from .api import explain, optimize
from .cost_model import CostProfile
from .diff import GraphDiff, diff, diff_passes
from .errors import CaptureError, ExampleInputError, SpecfxError, VerificationError
from .functional import spectral_conv
from .report import ConvDecision, Report

__all__ = [
    "optimize", "explain", "diff", "diff_passes", "GraphDiff", "spectral_conv", "Report", "ConvDecision",
    "CostProfile",
    "SpecfxError", "CaptureError", "ExampleInputError", "VerificationError",
]
__version__ = "0.1.0"
