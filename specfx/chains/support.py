"""Exactness: where a chain's tensors, held as spectra on one shared grid, are right.

All tensors of a chain share one grid P per axis; a tensor of spatial size L sits at
positions ``[0, L)``. Per axis the analysis tracks, for every tensor held as a spectrum,
``L``, the prefix ``[0, V)`` of positions known to hold the right values, and the
*support*: the grid positions that may be non-zero. (Axes are independent: supports are
products, a read is right when it is right on every axis.) A zero-padded conv's output
``t`` reads input positions ``r = t·s + m·d − left``; it is exact where every read is
either a valid data position (``0 ≤ r < V``) or a position outside ``[0, L)`` whose grid
cell ``r mod P`` is outside the support (a true zero). So:

- circular convs at ``P = L`` (output size = input size) are exact with no mask at all:
  every read is a data position;
- 'valid' convs read only ``[0, L)``; their wrap-around garbage at the end of the grid is
  never read again, so 'valid' chains need no mask (the final crop discards it);
- causal 1D convs (``padding = k−1`` followed by the crop ``[..., :L]``) read
  ``[t − (k−1)·d, t]``: their garbage is the "future" tail, which later causal convs
  never read, provided no support wraps onto the negative reads — ``P ≥ L + Σ (k_i −
  1)·d_i`` (over the convs of the chain) suffices, and :func:`specfx.chains.placement.grids`
  offers that grid when the convs' own grids are too small;
- zero-padded 'same' convs read ``[−left, L + right)``, so their input must be *clean*
  (zero outside ``[0, L)``): an exact spectral activation is (it crops and re-pads),
  a conv output is not. Such a tensor gets a mask: an identity ``spectral_activation``
  (a round trip, still one op instead of two) or, in poly mode, the poly activation's
  frequency-domain input mask ``(1/N)·F{m} ⊛ X``.

Per-channel constants (a conv's bias, BatchNorm's shift) are added as ``b·F{m}``: on the
data positions only, so they never turn a known zero into garbage. Pointwise maps keep
the support (∪ ``[0, L)``); a poly activation maps zero to its constant term, which is
why that term is ``a·F{m}`` and not ``a·N·δ``.

Pure functions of :mod:`.chain` data and numpy.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from .chain import Chain, Member
from .recognize import OpKind


@dataclasses.dataclass
class AxisState:
    """One axis of a tensor held as a spectrum on a grid of ``len(support)`` positions."""

    size: int      # L: the tensor's spatial size
    valid: int     # V: positions [0, V) hold the right values
    support: np.ndarray  # bool[P]: positions that may be non-zero

    @classmethod
    def clean(cls, size: int, grid: int) -> "AxisState":
        support = np.zeros(grid, dtype=bool)
        support[:size] = True
        return cls(size, size, support)

    def with_data(self) -> "AxisState":
        support = self.support.copy()
        support[: self.size] = True
        return AxisState(self.size, self.valid, support)


State = list[AxisState]


def clean_state(size: tuple[int, ...], grid: tuple[int, ...]) -> State:
    return [AxisState.clean(n, p) for n, p in zip(size, grid)]


def conv_axis(state: AxisState, kernel: int, dilation: int, left: int, stride: int, out: int,
              circular: bool) -> AxisState:
    """A conv's output on one axis: which outputs are right, and where it may be non-zero."""
    grid = len(state.support)
    taps = np.arange(kernel) * dilation
    if circular:
        # Periodic extension: exact when the input fills the grid and is right everywhere.
        ok = state.size == grid and state.valid == grid and out == grid and stride == 1
        return AxisState(out, out if ok else 0, np.ones(grid, dtype=bool))
    t = np.arange(out)[:, None] * stride
    reads = t + taps[None, :] - left
    data = (reads >= 0) & (reads < state.valid)
    outside = (reads < 0) | (reads >= state.size)
    zero = outside & ~state.support[reads % grid]
    good = (data | zero).all(axis=1)
    valid = out if good.all() else int(np.argmin(good))
    support = np.zeros(grid, dtype=bool)
    if stride == 1:
        for tap in taps:
            support |= np.roll(state.support, left - int(tap))
    support[: min(out, grid)] = True
    return AxisState(out, valid, support)


def conv_state(state: State, kernel, dilation, left, stride, out, circular) -> State:
    return [conv_axis(s, k, d, lp, st, o, circular)
            for s, k, d, lp, st, o in zip(state, kernel, dilation, left, stride, out)]


def masked(state: State) -> State:
    """After the zero mask: only ``[0, L)`` can be non-zero."""
    result = []
    for s in state:
        support = np.zeros(len(s.support), dtype=bool)
        support[: s.size] = True
        result.append(AxisState(s.size, s.valid, support))
    return result


def union(a: State, b: State) -> State:
    return [AxisState(x.size, min(x.valid, y.valid), x.support | y.support) for x, y in zip(a, b)]


def cropped(state: State, size: tuple[int, ...]) -> State:
    return [AxisState(n, min(s.valid, n), s.support.copy()) for s, n in zip(state, size)]


def fully_valid(state: State) -> bool:
    return all(s.valid >= s.size for s in state)


def enough(state: State, needed: tuple[int, ...]) -> bool:
    return all(a.valid >= n for a, n in zip(state, needed))


def _window_out(m: Member, x: State) -> State:
    return conv_state(x, m.kernel, m.dilation, m.left, m.stride, m.size_out, m.circular)


@dataclasses.dataclass
class Exactness:
    ok: bool
    reason: str
    masks: list[tuple[str, str]]  # (consumer, operand): mask the operand before the consumer reads it


def check(chain: Chain, labels: dict[str, str], modes: dict[str, str], grid: tuple[int, ...],
          poly_mask: dict[str, bool]) -> Exactness:
    """Whether the labelling is exact at ``grid``, and the masks that make it so (a conv
    reading garbage is given a masked input where that makes more of its output right)."""
    states: dict[str, State] = {}
    masks: list[tuple[str, str]] = []

    def state_of(tensor: str) -> State:
        return states[tensor] if tensor in states else clean_state(chain.rows_and_size(tensor)[1], grid)

    for n in chain.comp:
        m = chain.members[n]
        if labels[n] != "F" and not m.anchor:
            continue
        ins = [state_of(i) for i in m.inputs]
        if m.kind.windowed:
            out = _window_out(m, ins[0])
            if not enough(out, m.needed) and not m.circular:
                cleaned = _window_out(m, masked(ins[0]))
                if enough(cleaned, m.needed) or sum(a.valid for a in cleaned) > sum(a.valid for a in out):
                    masks.append((n, m.inputs[0]))
                    out = cleaned
            if not m.continues:
                if not fully_valid(out):
                    return Exactness(False, f"{n}: its output, read spatially, would not be exact at grid {grid}",
                                     masks)
                continue
            states[n] = out
        elif m.kind is OpKind.ACTIVATION:
            poly_unmasked = modes.get(n) == "poly" and not poly_mask.get(n)
            states[n] = [a.with_data() for a in ins[0]] if poly_unmasked else masked(ins[0])
        elif m.kind is OpKind.AFFINE:
            states[n] = [a.with_data() for a in ins[0]]
        elif m.kind is OpKind.ADD:
            states[n] = union(ins[0], ins[1])
        elif m.kind.view:
            states[n] = cropped(ins[0], m.size_out)
    for n in chain.produced_tensors():
        if labels[n] == "F" and chain.spatial_readers(n, labels) and not enough(states[n], chain.members[n].needed):
            return Exactness(False, f"{n} would not be exact at grid {grid}", masks)
    return Exactness(True, "", masks)
