"""Factor shapes of Kronecker layers: the balanced default and the checks of given ones.

A Kronecker term ``A ⊗ B`` of an ``out × in`` matrix has ``A`` of shape ``(a1, b1)`` and
``B`` of shape ``(a2, b2)`` with ``a1·a2 = out`` and ``b1·b2 = in``. A layer is a list of
:class:`TermGroup`: terms of one shape pair, ``rank`` of them (the paper's combination of
different shapes is several groups).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

Shape2 = tuple[int, int]
ShapePair = tuple[Shape2, Shape2]
FactorSpec = Optional[Union[ShapePair, Sequence[ShapePair]]]
RankSpec = Union[int, Sequence[int]]


@dataclasses.dataclass(frozen=True)
class TermGroup:
    """``rank`` Kronecker terms ``A_r ⊗ B_r`` with ``A_r`` of shape ``a`` and ``B_r`` of
    shape ``b``."""

    a: Shape2
    b: Shape2
    rank: int

    def describe(self) -> str:
        return f"{self.rank} x ({self.a[0]}x{self.a[1]} ⊗ {self.b[0]}x{self.b[1]})"


def balanced_split(n: int) -> tuple[int, int]:
    """``(d, n // d)`` with ``d`` the divisor of ``n`` closest to ``√n`` from below: the
    split that keeps both factors small (a prime ``n`` gives ``(1, n)``)."""
    if n < 1:
        raise ValueError(f"cannot split {n} into factors: it must be >= 1")
    d = math.isqrt(n)
    while n % d:
        d -= 1
    return d, n // d


def _is_shape_pair(spec: object) -> bool:
    return (isinstance(spec, (tuple, list)) and len(spec) == 2
            and all(isinstance(s, (tuple, list)) and len(s) == 2 and all(isinstance(v, int) for v in s)
                    for s in spec))


def term_groups(layer: str, out_size: int, in_size: int, factors: FactorSpec, rank: RankSpec,
                taps: int = 1) -> list[TermGroup]:
    """The term groups of a Kronecker layer mapping ``in_size`` to ``out_size`` features
    (or channels), checked.

    Args:
        layer: the layer's name, for error messages.
        factors: ``None`` (one group of balanced shapes, see :func:`balanced_split`), one
            shape pair ``((a1, b1), (a2, b2))``, or a sequence of shape pairs (mixed shapes).
        rank: terms per group: one int for every group, or one per group.
        taps: the kernel's size when ``B`` carries a conv kernel (1 for a linear layer).

    Raises:
        ValueError: a shape does not multiply out to the layer's size, a rank is < 1 or
            larger than the rearranged matrix allows (``min(a1·b1, a2·b2·taps)``
            independent terms), or ``rank`` and ``factors`` disagree in length.
    """
    if factors is None:
        a1, a2 = balanced_split(out_size)
        b1, b2 = balanced_split(in_size)
        pairs: list[ShapePair] = [((a1, b1), (a2, b2))]
    elif _is_shape_pair(factors):
        pairs = [tuple(map(tuple, factors))]  # type: ignore[list-item]
    elif isinstance(factors, (tuple, list)) and factors and all(_is_shape_pair(f) for f in factors):
        pairs = [tuple(map(tuple, f)) for f in factors]  # type: ignore[misc]
    else:
        raise ValueError(f"{layer}: factors must be None, ((a1, b1), (a2, b2)) or a list of such pairs, "
                         f"got {factors!r}")
    ranks = [rank] * len(pairs) if isinstance(rank, int) else list(rank)
    if len(ranks) != len(pairs):
        raise ValueError(f"{layer}: {len(ranks)} ranks given for {len(pairs)} factor shapes")
    groups = []
    for ((a1, b1), (a2, b2)), r in zip(pairs, ranks):
        if min(a1, b1, a2, b2) < 1 or a1 * a2 != out_size or b1 * b2 != in_size:
            raise ValueError(f"{layer}: factor shapes ({a1}, {b1}) ⊗ ({a2}, {b2}) do not make a "
                             f"{out_size} x {in_size} matrix (need a1·a2 = {out_size}, b1·b2 = {in_size})")
        if isinstance(r, bool) or not isinstance(r, int) or r < 1:
            raise ValueError(f"{layer}: rank must be an int >= 1, got {r!r}")
        limit = min(a1 * b1, a2 * b2 * taps)
        if r > limit:
            kernel = f" with {taps} kernel taps" if taps > 1 else ""
            raise ValueError(f"{layer}: rank {r} exceeds {limit}, the most independent terms of shapes "
                             f"({a1}, {b1}) ⊗ ({a2}, {b2}){kernel}")
        groups.append(TermGroup((a1, b1), (a2, b2), r))
    return groups
