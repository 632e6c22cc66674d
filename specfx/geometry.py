"""Where a convolution's samples sit on the FFT grid: FFT size, shift, crop.

Everything here is integer arithmetic on shapes, shared by the planner (to cost a conv)
and the rewrite (to emit its spectral ops).
"""

from __future__ import annotations

import dataclasses
import functools
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
class SampleSelection:
    """The input samples a conv reads, taken before its transform (:mod:`specfx.sample_selection`).

    Samples a conv never reads contribute nothing to its output, but a transform that
    holds them rounds every output at their magnitude: a strided, dilated conv fed huge
    values on the samples it skips was off by 1e-3 of its output's scale, where the direct
    conv is off by 4e-7. Per axis, the input of spatial size ``size`` (after ``pre_pad``)
    is sliced ``start:stop:step``: ``step`` is gcd(stride, dilation), since every tap of
    every output reads the same residue modulo it, and the slice ends at the first and last
    samples read. Samples inside the slice that no output reads (a kernel shorter than the
    remaining stride, gaps at the edges or between dilated taps) are zeroed where
    ``zero_unread``; the geometry's other fields describe the selected signal.
    """

    size: tuple[int, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    step: tuple[int, ...]
    zero_unread: bool


@dataclasses.dataclass(frozen=True)
class SpectralGeometry:
    """How one conv maps onto a real FFT grid, per spatial axis.

    ``pre_pad`` is the spatial padding still done by ``F.pad`` before the transform
    (reflect and replicate modes), as ``(mode, pads)`` in ``F.pad`` order, or ``None``.
    ``selection`` keeps only the samples the conv reads (after ``pre_pad``), or is ``None``
    where it reads them all; ``in_size``, ``shift``, ``dilation`` and ``stride`` then
    describe the conv on the selected samples. ``in_size`` is the size the transform sees.
    With ``overlap_save`` the other fields describe one block: a 'valid' conv of a window
    onto ``block`` outputs.
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
    selection: Optional[SampleSelection] = None

    @property
    def rank(self) -> int:
        return len(self.fft_size)

    @property
    def skips_phases(self) -> bool:
        """Whether, on some axis, the kernel is shorter than the (remaining) stride, so that
        whole phases of the selected input are never read and go through the transform as
        zeros: a polyphase split would avoid that, but such convs are tiny kernels that a
        direct conv computes with fewer operations than the transform alone."""
        return any(k < s and out > 1 for k, s, out in zip(self.kernel_size, self.stride, self.out_size))

    def unread(self) -> list[bytearray]:
        """Per axis of the transformed (selected) input, a byte per sample: 1 where no
        output reads it."""
        return [bytearray(b ^ 1 for b in _read_samples(n, k, s, d, left, out, self.circular))
                for n, k, s, d, left, out in zip(self.in_size, self.kernel_size, self.stride, self.dilation,
                                                  self.shift, self.out_size)]


def _read_samples(n: int, k: int, s: int, d: int, left: int, out: int, circular: bool) -> bytearray:
    """A byte per input sample of one axis: 1 where some output ``t`` reads it through some
    tap ``m`` (position ``t·s + m·d − left``, modulo ``n`` on a circular axis). One slice
    assignment per tap (and per wrap of a circular axis), not one per output."""
    read = bytearray(n)
    for m in range(k):
        first = m * d - left
        if circular:
            # The positions repeat after n / gcd(n, s) outputs.
            remaining, position = min(out, n // math.gcd(n, s)), first % n
            while remaining > 0:
                count = min(remaining, (n - 1 - position) // s + 1)
                read[position: position + (count - 1) * s + 1: s] = b"\x01" * count
                remaining -= count
                position = (position + count * s) % n
            continue
        lo = -(first // s) if first < 0 else 0  # the first output whose read is ≥ 0
        hi = min(out - 1, (n - 1 - first) // s)
        if lo <= hi:
            read[first + lo * s: first + hi * s + 1: s] = b"\x01" * (hi - lo + 1)
    return read


# spectral_conv plans on every call: a long axis costs a pass over its samples per tap.
@functools.lru_cache(maxsize=1024)
def _select_axis(n: int, k: int, s: int, d: int, left: int, out: int,
                 circular: bool) -> tuple[tuple[int, int, int], int, int, int, int, bool]:
    """One axis's selection ``(start, stop, step)`` and the conv on the selected samples:
    its size, left padding, stride and dilation, and whether samples inside it go unread."""
    read = _read_samples(n, k, s, d, left, out, circular)
    first = read.find(1)
    if first < 0:
        # Every output reads padding only: one sample stays (zeroed), so the grid keeps a size.
        return (0, 1, 1), 1, left, s, d, True
    g = math.gcd(s, d)
    if circular:
        # Decimating a periodic axis keeps it periodic only where g divides its length;
        # cropping it would break the wrap-around.
        g = g if n % g == 0 else 1
        start, stop = (-left) % g, n
    else:
        start, stop = first, read.rfind(1) + 1
    kept = read[start:stop:g]
    return (start, stop, g), len(kept), (left + start) // g, s // g, d // g, 0 in kept


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
    The grid is planned for the samples the conv reads (:class:`SampleSelection`).
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

    sizes, shifts, strides, dilations, fft_size, out_size = [], [], [], [], [], []
    start, stop, step, zero_unread = [], [], [], False
    for axis, (n, k, s, (left, right), d) in enumerate(zip(in_size, kernel_size, stride, padding, dilation)):
        span = d * (k - 1) + 1
        out = (n + left + right - span) // s + 1
        if out < 1:
            raise ValueError(f"kernel span {span} is larger than the padded input size {n + left + right}")
        window, n, left, s, d, unread = _select_axis(n, k, s, d, left, out, circular)
        if circular:
            fft_size.append(n)
        else:
            last_read = (out - 1) * s + d * (k - 1) - left
            # A grid that is a multiple of the stride lets the output be folded in the
            # frequency domain (an inverse transform s times smaller).
            last_axis = axis == rank - 1
            fft_size.append(smooth_size(max(n + left, last_read + 1, n), primes, even=last_axis, multiple_of=s))
        for values, value in zip((start, stop, step, sizes, shifts, strides, dilations, out_size),
                                 (*window, n, left, s, d, out)):
            values.append(value)
        zero_unread = zero_unread or unread
    selection = None
    if zero_unread or any((a, b, c) != (0, n, 1) for a, b, c, n in zip(start, stop, step, in_size)):
        selection = SampleSelection(size=tuple(in_size), start=tuple(start), stop=tuple(stop), step=tuple(step),
                                    zero_unread=zero_unread)
    return SpectralGeometry(
        in_size=tuple(sizes), kernel_size=tuple(kernel_size), fft_size=tuple(fft_size), shift=tuple(shifts),
        dilation=tuple(dilations), stride=tuple(strides), out_size=tuple(out_size), circular=circular,
        pre_pad=pre_pad, selection=selection)


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
