"""Spectral ops (``torch.ops.specfx.*``); importing this package registers them."""

from .spectral_ops import from_spectrum, spectral_mix, to_spectrum
from .weight_spectrum import SPECTRUM_CACHE

__all__ = ["to_spectrum", "spectral_mix", "from_spectrum", "SPECTRUM_CACHE"]
