"""Spectral ops (``torch.ops.specfx.*``); importing this package registers them."""

from .activation_ops import poly_activation, spectral_activation, spectral_add, spectral_affine
from .spectral_ops import from_spectrum, spectral_conv, spectral_mix, to_spectrum
from .weight_spectrum import SPECTRUM_CACHE
# Registers the Triton kernels as the ops' CUDA implementations where Triton is installed.
from .triton import TRITON_AVAILABLE

__all__ = ["to_spectrum", "spectral_mix", "from_spectrum", "spectral_conv", "spectral_activation", "poly_activation",
           "spectral_affine", "spectral_add", "SPECTRUM_CACHE", "TRITON_AVAILABLE"]
