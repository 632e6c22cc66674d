"""A chain as the pure analyses see it: its members and the reads between them, by node
name, with no fx. :mod:`.members` builds it from the graph; exactness
(:mod:`.support`) and placement (:mod:`.placement`) read only this."""

from __future__ import annotations

import dataclasses
import functools
from typing import Optional

from specfx.cost_model import ConvShape

from .recognize import OpKind


@dataclasses.dataclass
class Member:
    """A node of a chain: an anchor (a lowered conv) or a chainable op."""

    name: str
    kind: OpKind
    inputs: tuple[str, ...]   # the chain tensors it reads
    anchor: bool = False
    rows_in: int = 0
    rows_out: int = 0
    channels_out: int = 0
    batch: int = 1
    size_out: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    left: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    circular: bool = False
    shape: Optional[ConvShape] = None  # for convs and pools
    own_grid: tuple[int, ...] = ()     # an anchor's grid when lowered on its own
    written: bool = False  # an in-place write into its output can be observed (writes.observed_writes)
    # The prefix of its positions anything reads: all of them, unless every reader is a
    # crop (in the chain or not), then the largest crop.
    needed: tuple[int, ...] = ()

    @property
    def continues(self) -> bool:
        """Its output can stay a spectrum: stride 1, and no observed in-place write into it."""
        if self.written:
            return False
        return all(s == 1 for s in self.stride) if self.kind.windowed else True

    @property
    def pointwise(self) -> bool:
        """A 1x1 conv without padding (stride 1): it reads only its own position."""
        return self.kind is OpKind.CONV and all(k == 1 for k in self.kernel) \
            and all(lp == 0 for lp in self.left) and all(s == 1 for s in self.stride)


@dataclasses.dataclass
class Chain:
    """One chain (``comp``: its member names in graph order) and the tensors around it.

    ``members`` holds every member of the graph at this rank (a reader in another chain
    counts as a reader from outside); ``sizes`` maps each tensor a member reads or
    produces to ``(rows, spatial size)``; ``readers`` to the members reading it as a chain
    input (in the order the graph lists its users), and ``read_elsewhere`` to whether
    anything else reads it (an op outside every chain, a non-chain operand, an output)."""

    comp: list[str]
    members: dict[str, Member]
    sizes: dict[str, tuple[int, tuple[int, ...]]]
    readers: dict[str, tuple[str, ...]]
    read_elsewhere: dict[str, bool]

    @functools.cached_property
    def set(self) -> frozenset[str]:
        return frozenset(self.comp)

    @property
    def rank(self) -> int:
        return len(self.members[self.comp[0]].size_out)

    def rows_and_size(self, tensor: str) -> tuple[int, tuple[int, ...]]:
        return self.sizes[tensor]

    def readers_of(self, name: str) -> tuple[list[str], bool]:
        """Members of this chain reading ``name`` as a chain input, and whether anything
        else (another chain, outside, a graph output, a parameter use) reads it."""
        inside = [r for r in self.readers[name] if r in self.set]
        return inside, self.read_elsewhere[name] or len(inside) < len(self.readers[name])

    def produced_tensors(self) -> list[str]:
        return [n for n in self.comp if self.members[n].continues]

    def read_tensors(self) -> list[str]:
        return list(dict.fromkeys(i for n in self.comp for i in self.members[n].inputs))

    def spectral_readers(self, tensor: str, labels: dict[str, str]) -> list[str]:
        return [r for r in self.readers_of(tensor)[0] if labels[r] == "F" or self.members[r].anchor]

    def spatial_readers(self, name: str, labels: dict[str, str]) -> bool:
        readers, outside = self.readers_of(name)
        return outside or any(labels[r] == "S" and not self.members[r].anchor for r in readers)
