"""Singular values and operator norms of convolutional layers, in the frequency domain.

A conv layer is a linear operator: with circular padding a block matrix of circulant
blocks, which the DFT block-diagonalises (Sedghi, Gupta & Long, ICLR 2019); with zero
padding one of Toeplitz blocks, whose singular values Yi (2020) approximates from the
spectral density matrix. This package computes the exact values of periodic layers
(any rank, channels, groups, dilation and stride), certified intervals for the norm of
any layer at its real padding and size, Yi's approximation, a clip that keeps its
promise, a network Lipschitz bound composed through the fx graph, and a differentiable
penalty for training. ``docs/operator_norms.md`` explains the methods and their measured
accuracy and speed.
"""

from .analyze import operator_norm, singular_values
from .bounds import NormBounds
from .clip import ClipReport, ClipResult, clip_operator_norm_
from .layer import ConvOperator, LayerError, as_operator
from .penalty import spectral_penalty
from .report import LayerRecord, SpectrumReport, empirical_lipschitz, spectrum

__all__ = [
    "singular_values", "operator_norm", "NormBounds", "spectrum", "SpectrumReport", "LayerRecord",
    "clip_operator_norm_", "ClipReport", "ClipResult", "spectral_penalty", "empirical_lipschitz",
    "ConvOperator", "as_operator", "LayerError",
]
