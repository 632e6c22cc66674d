"""Chains built by hand, as :mod:`specfx.chains.chain` describes them (no fx): the pure
modules' unit tests share them."""

from __future__ import annotations

from specfx.chains.chain import Chain, Member
from specfx.chains.recognize import OpKind
from specfx.cost_model import ConvShape


def conv(name: str, source: str, size: int = 8, k: int = 3, left: int = 1, anchor: bool = True,
         channels: int = 4) -> Member:
    """A stride-1 1D conv of ``channels`` channels (``left``: its left padding)."""
    shape = ConvShape(batch=1, in_channels=channels, out_channels=channels, groups=1, kernel_size=(k,),
                      out_size=(size,), element_bytes=4)
    return Member(name, OpKind.CONV, (source,), anchor, channels, channels, channels, 1, (size,), (k,), (1,),
                  (left,), (1,), False, shape, (16,) if anchor else (), needed=(size,))


def pointwise(name: str, kind: OpKind, *inputs: str, size: int = 8, channels: int = 4) -> Member:
    return Member(name, kind, inputs, rows_in=channels, rows_out=channels, channels_out=channels,
                  size_out=(size,), needed=(size,))


def chain(members: list[Member], outputs: tuple[str, ...] = (), inputs: dict[str, int] = None,
          channels: int = 4) -> Chain:
    """The chain of ``members`` (in graph order); ``outputs`` are also read outside it,
    ``inputs`` the sizes of the tensors it reads from outside."""
    by_name = {m.name: m for m in members}
    sizes = {m.name: (channels, m.size_out) for m in members}
    sizes.update({t: (channels, (n,)) for t, n in (inputs or {"x": 8}).items()})
    readers = {t: tuple(m.name for m in members if t in m.inputs) for t in sizes}
    elsewhere = {t: t in outputs for t in sizes}
    return Chain([m.name for m in members], by_name, sizes, readers, elsewhere)
