"""Where a convolution's samples sit on the FFT grid: FFT size, shift, crop.

Everything here is integer arithmetic on shapes, shared by the planner (to cost a conv)
and the rewrite (to emit its spectral ops).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence, Union

PaddingArg = Union[str, int, Sequence[int]]


# FFTs of 5-smooth sizes run at full speed; a factor 7 costs ~10% more on a 2-core x86
# CPU (MKL), and an odd last axis (the half-spectrum axis of a real FFT) up to 60% more.
FFT_PRIMES = (2, 3, 5)


def smooth_size(n: int, primes: Sequence[int] = FFT_PRIMES, even: bool = False, multiple_of: int = 1) -> int:
    """The smallest integer ≥ ``n`` whose prime factors are all in ``primes`` and that is
    even (if asked) and a multiple of ``multiple_of`` (when that is itself smooth)."""
    step = math.lcm(2 if even else 1, multiple_of if _is_smooth(multiple_of, primes) else 1)
    candidate = max(n, step)
    while True:
        if candidate % step:
            candidate += step - candidate % step
            continue
        if _is_smooth(candidate, primes):
            return candidate
        candidate += step


def _is_smooth(n: int, primes: Sequence[int]) -> bool:
    for p in primes:
        while n % p == 0:
            n //= p
    return n == 1


def resolve_padding(padding: PaddingArg, kernel_size: Sequence[int], dilation: Sequence[int],
                    stride: Sequence[int]) -> list[tuple[int, int]]:
    """Per-axis ``(left, right)`` padding, as torch resolves ints, tuples, ``'valid'``
    and ``'same'`` (for even kernels the odd extra element goes on the right)."""
    rank = len(kernel_size)
    if isinstance(padding, str):
        if padding == "valid":
            return [(0, 0)] * rank
        if padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
            totals = [d * (k - 1) for k, d in zip(kernel_size, dilation)]
            return [(t // 2, t - t // 2) for t in totals]
        raise ValueError(f"invalid padding string {padding!r}; expected 'same' or 'valid'")
    pads = expand(padding, rank)
    return [(p, p) for p in pads]


def expand(value: Union[int, Sequence[int]], rank: int) -> list[int]:
    """An int or a 1-element sequence repeated to ``rank`` entries, as torch's convs do."""
    if isinstance(value, int):
        return [value] * rank
    values = [int(v) for v in value]
    return values * rank if len(values) == 1 else values


@dataclasses.dataclass(frozen=True)
class OverlapSave:
    """A 1D conv run as ``count`` blocks of ``block`` outputs (:mod:`specfx.overlap_save`):
    block ``j`` reads the ``window = block + span − 1`` samples from ``j·block`` of the
    input zero-padded by ``left`` and ``right`` (``right`` covers the last block's
    overhang); the first ``out`` outputs are kept."""

    block: int
    window: int
    count: int
    left: int
    right: int
    out: int


@dataclasses.dataclass(frozen=True)
class SpectralGeometry:
    """How one conv maps onto a real FFT grid, per spatial axis.

    ``pre_pad`` is the spatial padding still done by ``F.pad`` before the transform
    (reflect and replicate modes), as ``(mode, pads)`` in ``F.pad`` order, or ``None``.
    ``in_size`` is the size the transform sees (after ``pre_pad``). With ``overlap_save``
    the other fields describe one block: a 'valid' conv of a window onto ``block`` outputs.
    """

    in_size: tuple[int, ...]
    kernel_size: tuple[int, ...]
    fft_size: tuple[int, ...]
    shift: tuple[int, ...]
    dilation: tuple[int, ...]
    stride: tuple[int, ...]
    out_size: tuple[int, ...]
    circular: bool
    pre_pad: tuple[str, tuple[int, ...]] | None
    overlap_save: Optional[OverlapSave] = None

    @property
    def rank(self) -> int:
        return len(self.fft_size)


def plan_geometry(in_size: Sequence[int], kernel_size: Sequence[int], stride: Sequence[int],
                  padding: Sequence[tuple[int, int]], dilation: Sequence[int], padding_mode: str,
                  primes: Sequence[int] = FFT_PRIMES) -> SpectralGeometry:
    """The smallest exact FFT grid for a conv with the given resolved padding.

    Zero padding: output ``t`` reads input positions ``t·s + m·d − left`` for every tap
    ``m``. On a circular grid of size ``P`` those reads are exact as long as the ones that
    fall outside the input (the padding) wrap onto grid positions the input does not
    occupy, i.e. ``P ≥ L + left`` and ``P`` exceeds the last position read. 'valid' convs
    therefore need only ``P = L``. Circular padding is periodic extension, which the grid
    does natively at ``P = L``. Reflect and replicate padding is done spatially first.
    """
    rank = len(kernel_size)
    pre_pad = None
    if padding_mode in ("reflect", "replicate"):
        flat = tuple(p for left, right in reversed(padding) for p in (left, right))
        pre_pad = (padding_mode, flat)
        in_size = [n + left + right for n, (left, right) in zip(in_size, padding)]
        padding = [(0, 0)] * rank
    elif padding_mode not in ("zeros", "circular"):
        raise ValueError(f"unknown padding_mode {padding_mode!r}")
    circular = padding_mode == "circular"

    fft_size, out_size = [], []
    for axis, (n, k, s, (left, right), d) in enumerate(zip(in_size, kernel_size, stride, padding, dilation)):
        span = d * (k - 1) + 1
        out = (n + left + right - span) // s + 1
        if out < 1:
            raise ValueError(f"kernel span {span} is larger than the padded input size {n + left + right}")
        if circular:
            fft_size.append(n)
        else:
            last_read = (out - 1) * s + span - 1 - left
            # A grid that is a multiple of the stride lets the output be folded in the
            # frequency domain (an inverse transform s times smaller).
            last_axis = axis == rank - 1
            fft_size.append(smooth_size(max(n + left, last_read + 1, n), primes, even=last_axis, multiple_of=s))
        out_size.append(out)
    return SpectralGeometry(
        in_size=tuple(in_size), kernel_size=tuple(kernel_size), fft_size=tuple(fft_size),
        shift=tuple(left for left, _ in padding), dilation=tuple(dilation), stride=tuple(stride),
        out_size=tuple(out_size), circular=circular, pre_pad=pre_pad)


def overlap_save_geometry(length: int, kernel_size: int, padding: tuple[int, int], dilation: int,
                          fft_size: int) -> Optional[SpectralGeometry]:
    """A stride-1, zero-padded 1D conv on ``length`` samples in overlap-save blocks whose
    windows fill an FFT of ``fft_size`` (a smooth size), or ``None`` when that makes
    fewer than two blocks."""
    span = dilation * (kernel_size - 1) + 1
    block = fft_size - span + 1
    left, right = padding
    out = length + left + right - span + 1
    if block < 1 or out < 1 or math.ceil(out / block) < 2:
        return None
    count = math.ceil(out / block)
    plan = OverlapSave(block=block, window=fft_size, count=count, left=left,
                       right=count * block + span - 1 - length - left, out=out)
    return SpectralGeometry(in_size=(fft_size,), kernel_size=(kernel_size,), fft_size=(fft_size,), shift=(0,),
                            dilation=(dilation,), stride=(1,), out_size=(block,), circular=False, pre_pad=None,
                            overlap_save=plan)
