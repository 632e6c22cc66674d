"""specfx: move the convolutions of a PyTorch model into the frequency domain, exactly.

Importing specfx registers its spectral ops (``torch.ops.specfx.*``): import it before
running a graph that holds them, e.g. before ``torch.export.load`` of an exported
:func:`optimize` result. ``torch.compile(model, backend="specfx")`` needs no import: the
backend is found through the package's ``torch_dynamo_backends`` entry point, which imports
specfx (and so registers the ops) when the backend is first looked up.
"""

from . import nn, ops
from .api import explain, optimize
from .backend import clear_compiled_reports, compiled_reports
from .cost_model import CostProfile
from .diff import GraphDiff, diff, diff_passes
from .errors import CaptureError, ExampleInputError, PassError, SpecfxError, StalePlanError, VerificationError
from .functional import spectral_conv
from .operator_norms import (NormBounds, clip_operator_norm_, operator_norm, singular_values, spectral_penalty,
                             spectrum)
from .report import ConvDecision, Report
from .structure import structure

__all__ = [
    "optimize", "explain", "diff", "diff_passes", "GraphDiff", "spectral_conv", "Report", "ConvDecision",
    "structure", "nn",
    "CostProfile", "compiled_reports", "clear_compiled_reports",
    "singular_values", "operator_norm", "NormBounds", "spectrum", "clip_operator_norm_", "spectral_penalty",
    "SpecfxError", "CaptureError", "ExampleInputError", "PassError", "StalePlanError", "VerificationError",
]
__version__ = "0.1.0"
