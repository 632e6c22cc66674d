"""What :func:`specfx.structure`'s passes share: the user's options, and the plan of one
dense layer, which ``plan_structure`` leaves on the layer's call node for
``structure_layers`` to carry out."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch.nn as nn

KINDS = ("kronecker", "butterfly")

# node.meta key: the LayerPlan of a linear call node whose layer is replaced.
STRUCTURE_PLAN = "specfx_structure_plan"


@dataclasses.dataclass(frozen=True)
class StructureOptions:
    """The options of :func:`specfx.structure`, checked.

    ``rank`` (Kronecker only) fixes the number of terms; ``None`` tries 1, 2, 4, ... and
    keeps the smallest rank whose output error is within ``max_error``, up to the ranks
    that still have fewer parameters and FLOPs than the dense layer. ``steps`` bounds the L-BFGS
    iterations of a butterfly fit.
    """

    kind: str = "kronecker"
    max_error: float = 0.05
    min_features: int = 256
    rank: Optional[int] = None
    steps: int = 50

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        # inf is allowed: replace every layer that can be, whatever its error.
        if isinstance(self.max_error, bool) or not isinstance(self.max_error, (int, float)) \
                or not self.max_error >= 0:
            raise ValueError(f"max_error must be a number >= 0 (inf allowed), got {self.max_error!r}")
        for name in ("min_features", "steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.rank is not None:
            if self.kind != "kronecker":
                raise ValueError(f"rank applies to kind='kronecker' only, got kind={self.kind!r}")
            if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
                raise ValueError(f"rank must be None or an int >= 1, got {self.rank!r}")


@dataclasses.dataclass
class LayerPlan:
    """A dense linear layer's replacement: the fitted structured ``module`` (of ``kind``),
    installed at ``path`` in the module tree, where the dense layer's module was; ``layer``
    is the layer's name in the report."""

    module: nn.Module
    path: str
    layer: str
    kind: str
