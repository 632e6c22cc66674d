"""Structured layers users build models from: Kronecker layers (Zhou et al., 2015) and
butterfly layers (Ailon, Leibovitch, Nair, 2020). :func:`specfx.structure` puts them into
a trained model in place of its dense linear layers."""

from .butterfly import ButterflyLinear
from .kronecker import KroneckerConv2d, KroneckerLinear

__all__ = ["KroneckerLinear", "KroneckerConv2d", "ButterflyLinear"]
