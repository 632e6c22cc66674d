"""Weight spectra: a conv kernel placed on the FFT grid and transformed, cached per weight.

A conv output is ``y[t] = Σ_m x[t·s + m·d − pad_left] · w[m]``. Placing tap ``m`` of the
kernel at grid position ``(m·d − pad_left) mod P`` and correlating circularly gives that
sum directly at ``t·s``: dilation and the left padding live in the weight spectrum, so the
input is never padded or shifted, and the output needs only a strided crop. Taps that land
on the same position (a kernel wider than a circular grid) simply add, which is what
circular padding means.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
import threading
import weakref
from collections import OrderedDict
from typing import Callable, Optional, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import contraction, fourier

# Budget of the global cache (SPECFX_SPECTRUM_CACHE_MB overrides it): a sixteenth of the
# machine's memory, within [256 MiB, 4 GiB]. 256 MiB holds all the spectra of
# RepLKNet-31B's 24 depthwise 31x31 kernels at 224x224 (92 MiB) for two input sizes, or
# wav2vec2's positional conv on 30 s of audio (243 MiB); three dense 64x64x15x15 convs on
# 64x64 maps need 262 MiB (87 MiB each), and a 24 GiB machine gives 1.5 GiB. A stream of
# one-off weights, each spectrum 18 MiB for an 8x8x5x5 kernel on 256x256 inputs, stops
# at the budget instead of growing by gigabytes.
MIN_DEFAULT_BYTES, MAX_DEFAULT_BYTES = 256 * 2**20, 4 * 2**30


def _default_max_bytes() -> int:
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return MIN_DEFAULT_BYTES
    return min(max(memory // 16, MIN_DEFAULT_BYTES), MAX_DEFAULT_BYTES)


DEFAULT_MAX_BYTES = _default_max_bytes()

# A spectrum computed for the second time does not evict entries used since its first:
# they and it take turns in a loop that does not fit, where evicting the least recently
# used entry evicts the very one the loop reads next (three 87 MiB spectra in a 256 MiB
# budget missed on every call, 12x slower than cached; kept, two of the three hit). A
# spectrum computed for the first time (a new model, new weights) evicts as usual.
# Misses remembered, at most:
REMEMBERED_MISSES = 4096


def tap_positions(kernel_size: int, dilation: int, shift: int, fft_size: int, device) -> torch.Tensor:
    """Grid position of each kernel tap along one axis."""
    return (torch.arange(kernel_size, device=device) * dilation - shift) % fft_size


def place_kernel(w: torch.Tensor, fft_size: Sequence[int], dilation: Sequence[int],
                 shift: Sequence[int]) -> torch.Tensor:
    """Scatter the kernel taps onto the zero ``fft_size`` grid (trailing dims of ``w``)."""
    rank = len(fft_size)
    placed = w
    for axis, (n, d, s) in enumerate(zip(fft_size, dilation, shift)):
        dim = w.dim() - rank + axis
        index = tap_positions(w.shape[dim], d, s, n, w.device)
        grid_shape = list(placed.shape)
        grid_shape[dim] = n
        placed = placed.new_zeros(grid_shape).index_add_(dim, index, placed)
    return placed


def place_kernel_adjoint(grid: torch.Tensor, kernel_size: Sequence[int], dilation: Sequence[int],
                         shift: Sequence[int]) -> torch.Tensor:
    """Adjoint of :func:`place_kernel`: gather each tap's value back from the grid."""
    rank = len(kernel_size)
    taps = grid
    for axis, (k, d, s) in enumerate(zip(kernel_size, dilation, shift)):
        dim = grid.dim() - rank + axis
        index = tap_positions(k, d, s, grid.shape[dim], grid.device)
        taps = taps.index_select(dim, index)
    return taps


def kernel_blocks(groups: int, out_per_group: int, bytes_per_channel: int) -> list[tuple[slice, slice]]:
    """Blocks ``(groups, output channels within each group)`` of a kernel of about
    :data:`fourier.BLOCK_BYTES` each, for work that costs ``bytes_per_channel`` per output
    channel: whole groups at a time where a group fits, else slices of one group."""
    per_group = out_per_group * bytes_per_channel
    if per_group <= fourier.BLOCK_BYTES:
        step = max(1, fourier.BLOCK_BYTES // per_group)
        return [(slice(g, min(g + step, groups)), slice(None)) for g in range(0, groups, step)]
    step = max(1, fourier.BLOCK_BYTES // bytes_per_channel)
    return [(slice(g, g + 1), slice(o, min(o + step, out_per_group)))
            for g in range(groups) for o in range(0, out_per_group, step)]


def weight_spectrum(w: torch.Tensor, fft_size: Sequence[int], dilation: Sequence[int],
                    shift: Sequence[int], groups: int, path: str) -> torch.Tensor:
    """Conjugate spectrum of the placed kernel, laid out for the contraction ``path``
    (:func:`contraction.laid_shape`).

    The conjugate turns the pointwise product into a correlation, as torch's convs are.
    It is materialized, not a lazy conj view: a custom op's kernel called under a
    ``TorchDispatchMode`` (AOTAutograd runs the first call of every compiled graph under
    one) runs with the ``Conjugate`` dispatch key excluded, so ops there ignore the conj bit.
    The kernels are placed and transformed a block of output channels at a time and written
    straight into the layout, so the peak is the spectrum and one block: in training it is
    computed every step.
    """
    real = fourier.real_dtype_for(w.dtype)
    rank = len(fft_size)
    c_out, c_in_g = w.shape[:2]
    out_per_group = c_out // groups
    freqs = math.prod(fourier.rfft_bins(fft_size))
    laid = torch.empty(contraction.laid_shape(c_out, c_in_g, freqs, groups, path),
                       dtype=fourier.complex_dtype_for(real), device=w.device)
    target = contraction.group_view(laid, groups, path)
    kernels = w.reshape(groups, out_per_group, c_in_g, *w.shape[2:])
    grid_bytes = c_in_g * math.prod(fft_size) * laid.element_size()
    for group_block, out_block in kernel_blocks(groups, out_per_group, grid_bytes):
        block = kernels[group_block, out_block].to(real)
        spectrum = fourier.rfftn(place_kernel(block, fft_size, dilation, shift), fft_size)
        target[group_block, out_block] = spectrum.conj_physical_().flatten(-rank)
    return laid


def kernel_gradient(x_hat: torch.Tensor, grad: torch.Tensor, kernel_size: Sequence[int],
                    fft_size: Sequence[int], dilation: Sequence[int], shift: Sequence[int],
                    groups: int, dtype: torch.dtype) -> torch.Tensor:
    """Gradient of the spatial kernel of a spectral conv whose input spectrum is ``x_hat``
    and whose output spectrum has gradient ``grad``: the adjoint of :func:`weight_spectrum`
    applied to the kernel spectrum's gradient ``Σ_n conj(x̂[n, c])·ĝ[n, o]``.

    That adjoint undoes the spectrum's conjugate, so what is transformed is
    ``K[o, c] = Σ_n x̂[n, c]·conj(ĝ[n, o])``: ``N·irfftn(K / multiplicity)`` on the grid,
    read back at the kernel's taps. One inverse transform of ``(C_out, C_in/g)`` grids,
    run a block of output channels at a time, so only a block of ``K`` and of the grids
    exists at once. Returns ``(C_out, C_in/g, *kernel_size)`` in ``dtype``.
    """
    rank = len(fft_size)
    x = contraction.flatten_groups(x_hat, groups, rank)
    g = contraction.flatten_groups(grad, groups, rank)
    batch, c_in_g, out_per_group = x.shape[0], x.shape[2], g.shape[2]
    scale = fourier.rfftn_adjoint_scale(fft_size, x_hat.real.dtype, x_hat.device)
    out = torch.empty((groups, out_per_group, c_in_g, *kernel_size), dtype=dtype, device=x_hat.device)
    # Per output channel: its conjugated gradient (over the batch), its products with the
    # input channels and their grids.
    channel_bytes = (batch + c_in_g) * math.prod(fft_size) * x_hat.element_size()
    for group_block, out_block in kernel_blocks(groups, out_per_group, channel_bytes):
        k = contraction.batch_outer(x[:, group_block], g[:, group_block, out_block].conj_physical())
        k = k.view(*k.shape[:3], *x_hat.shape[-rank:]).mul_(scale)
        grid = fourier.irfftn(k, fft_size)
        out[group_block, out_block] = place_kernel_adjoint(grid, kernel_size, dilation, shift)
    return out.view(groups * out_per_group, c_in_g, *kernel_size)


class SpectrumCache:
    """Weight spectra kept across calls, one per (weight tensor, FFT geometry), within a
    byte budget.

    An entry is reused only while the weight tensor is the same object, at the same
    autograd version (every in-place update — an optimizer step, ``load_state_dict`` —
    bumps it), at the same address, offset, shape and strides (``param.data = ...`` swaps
    them but keeps the version), and — while :attr:`verify_contents` is on, the default —
    with the same values; with it off, over the same storage, identified by a weak
    reference, not by its address: after ``param.data`` is swapped twice, the new storage
    can sit at the address the cached one had. The values are compared because writes through
    ``param.data`` (``param.data.copy_(...)``, EMA updates written that way, and
    ``torch.autograd.gradcheck``'s own perturbations) bump no version of ``param``. The
    comparison costs a pass over the kernel and a stored copy of it (1.8 ms per call for
    wav2vec2's 768x48x128 positional conv on a 2-core CPU, a fifth of the lowered conv's
    time) and, on a GPU, a device sync; code that never writes weights through ``.data``
    can turn it off (``SPECTRUM_CACHE.verify_contents = False``). Tensors that carry no
    version (inference tensors, tensors being traced) are never cached. Entries die with
    their weight.

    In training the weights change every step: the forward computes the spectrum (a miss),
    the backward's input gradient reads it (a hit), so it is computed once per step; the
    stale entry is dropped before the new spectrum is computed.

    Budget: the spectra and the stored copies of the weights together hold at most
    :attr:`max_bytes`, on whatever devices they are (the constructor's ``max_bytes``; the
    global :data:`SPECTRUM_CACHE` reads it from the environment variable
    ``SPECFX_SPECTRUM_CACHE_MB``, in MiB, at import, else :data:`DEFAULT_MAX_BYTES`). Past
    it the least recently used entries go; a spectrum larger than the whole budget is
    computed and returned but not cached, and ``0`` turns caching off. :attr:`nbytes` is
    what is held now. Lowering :attr:`max_bytes` evicts at once. A spectrum computed again
    does not evict entries used since it was last computed (it goes uncached instead): a
    model whose spectra exceed the budget keeps those that fit, instead of evicting, on
    every call, the one it reads next. A tensor over a cached weight's memory (same offset, shape and strides: what a
    checkpointed backward unpacks for a parameter) finds the weight's entries.

    Threads: calls may run concurrently with each other and with writes to the weights. A
    miss takes the weight's stamp, then copies its values, and transforms that copy, so a
    cached spectrum is always the spectrum of the values stored beside it, whatever is
    written meanwhile; a call overlapping a write gets the weight before or after it, or,
    like any op reading a tensor while another thread writes it, partly written. Hits take
    no lock; the bookkeeping (insertion, eviction, dead weights) is under one lock, never
    held while a spectrum is computed.
    """

    def __init__(self, verify_contents: bool = True, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        # id(weight) -> its record. Looked up by id on every call, so that a hit costs a
        # dict lookup, not a weak-key wrapper per call.
        self._records: dict[int, _Record] = {}
        # (id(weight), geometry) of every entry, least recently used first. Hits move
        # their key to the end without the lock: move_to_end, like the popitem that
        # evicts, is one step under the GIL, and neither iterates.
        self._lru: OrderedDict[tuple[int, tuple], _Record] = OrderedDict()
        # Not reentrant: a weight's death callback can run inside a locked section of the
        # same thread (any allocation there can collect garbage), and must then defer its
        # work to _dead rather than edit the dicts under the section's feet.
        self._lock = threading.Lock()
        self._dead: list[tuple[int, weakref.ref]] = []
        self._nbytes = 0
        self._max_bytes = _check_budget(max_bytes)
        self.verify_contents = verify_contents
        self.hits = 0
        self.misses = 0
        # Lookups so far, the count at each entry's last use, and at each key's last miss
        # (see REMEMBERED_MISSES). Hits update the first two without the lock: a lost
        # increment only ages an entry less.
        self._lookups = 0
        self._last_used: dict[tuple[int, tuple], int] = {}
        self._last_miss: OrderedDict[tuple[int, tuple], int] = OrderedDict()
        # The memory each cached weight views (_alias_key) -> its record's key.
        self._aliases: dict[tuple, int] = {}

    @property
    def nbytes(self) -> int:
        """Bytes held: the cached spectra and the stored copies of their weights."""
        return self._nbytes

    @property
    def max_bytes(self) -> int:
        """The budget :attr:`nbytes` stays within; setting it evicts down to it."""
        return self._max_bytes

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self._lock.acquire()
        try:
            self._max_bytes = _check_budget(value)
            self._evict_down_to(self._max_bytes)
        finally:
            self._release()

    def get(self, w: torch.Tensor, fft_size: Sequence[int], dilation: Sequence[int],
            shift: Sequence[int], groups: int, path: str) -> torch.Tensor:
        """The spectrum of ``w`` laid out for the contraction ``path``
        (:func:`weight_spectrum`), so the layout work is cached too."""
        if w.is_inference() or not is_plain_tensor(w):
            return weight_spectrum(w, fft_size, dilation, shift, groups, path)
        geometry = (tuple(fft_size), tuple(dilation), tuple(shift), groups, path)
        self._lookups += 1
        stamp = (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape), w.stride(),
                 w.storage_offset())
        key = id(w)
        record = self._records.get(key)
        if record is None or record.ref() is not w:
            # Another tensor over a cached weight's memory, with its shape and strides: what
            # a checkpointed backward unpacks for a saved parameter. Its stamp and values
            # decide, as for the weight itself.
            record = self._records.get(self._aliases.get(_alias_key(w)))
            key = record.key if record is not None else key
        if record is not None and record.ref() is not None:
            entry = record.entries.get(geometry)
            if entry is not None and entry.stamp == stamp and self._still_valid(entry, w):
                try:
                    self._lru.move_to_end((key, geometry))
                    self._last_used[(key, geometry)] = self._lookups
                except KeyError:  # evicted meanwhile; this call still has its spectrum
                    pass
                self.hits += 1
                return entry.spectrum
        return self._compute(w, geometry, stamp)

    def _compute(self, w: torch.Tensor, geometry: tuple, stamp: tuple) -> torch.Tensor:
        """A miss: transform a snapshot of ``w`` and cache the spectrum with it."""
        self._lock.acquire()
        try:
            self.misses += 1
            # Stale spectra go before the replacement is computed: in training the weights
            # change every step, and holding both would add a spectrum to the step's peak.
            record = self._record_of(w)
            for key in [key for key, entry in record.entries.items() if key == geometry or entry.stamp != stamp]:
                self._discard(record, key)
        finally:
            self._release()
        # The stamp was taken before the snapshot, and the spectrum is of the snapshot: a
        # write after the stamp leaves an entry that a later call either rejects (its stamp
        # or values differ) or rightly reuses (the values are what was transformed).
        storage = StorageWeakRef(w.untyped_storage())
        contents = w.detach().clone() if self.verify_contents else None
        spectrum = weight_spectrum(w if contents is None else contents, *geometry)
        entry = _Entry(stamp, storage, contents, spectrum)
        self._lock.acquire()
        try:
            self._insert(w, geometry, entry)
        finally:
            self._release()
        return spectrum

    def _still_valid(self, entry: _Entry, w: torch.Tensor) -> bool:
        if self.verify_contents:
            # Equal values give the same spectrum, whatever storage holds them.
            return entry.contents is not None and _same_values(w.detach(), entry.contents)
        # A live weak reference pins the storage object, so equal references mean the
        # same storage; an expired one means the cached storage is gone.
        return not entry.storage.expired() and entry.storage == StorageWeakRef(w.untyped_storage())

    def _insert(self, w: torch.Tensor, geometry: tuple, entry: _Entry) -> None:
        """Cache ``entry``, evicting the least recently used entries outside the working set
        to make room; one that finds no room, or is larger than the whole budget, is not
        cached. Under the lock."""
        if entry.nbytes > self._max_bytes:
            return
        # A concurrent miss of the same geometry may have cached its own snapshot: both
        # are self-consistent, the later one replaces it.
        record = self._record_of(w)
        self._discard(record, geometry)
        key = (record.key, geometry)
        previous_miss = self._last_miss.pop(key, None)
        self._last_miss[key] = self._lookups
        if len(self._last_miss) > REMEMBERED_MISSES:
            self._last_miss.popitem(last=False)
        if not self._evict_down_to(self._max_bytes - entry.nbytes, spare_used_since=previous_miss):
            return
        record.entries[geometry] = entry
        record.alias = _alias_key(w)
        self._aliases[record.alias] = record.key
        self._lru[(record.key, geometry)] = record
        self._last_used[(record.key, geometry)] = self._lookups
        self._nbytes += entry.nbytes

    def _record_of(self, w: torch.Tensor) -> _Record:
        """The record of ``w``, created empty; it dies with ``w``. Under the lock."""
        key = id(w)
        record = self._records.get(key)
        if record is not None and record.ref() is w:
            return record
        if record is not None:
            # A dead weight's, whose id ``w`` now has; its callback may not have run yet.
            self._drop_record(key)
        cache = weakref.ref(self)

        def forget(ref: weakref.ref) -> None:
            found = cache()
            if found is not None:
                found._dead.append((key, ref))
                if found._lock.acquire(blocking=False):
                    found._release()

        record = _Record(key, weakref.ref(w, forget))
        self._records[key] = record
        return record

    def _discard(self, record: _Record, geometry: tuple) -> None:
        self._lru.pop((record.key, geometry), None)
        self._last_used.pop((record.key, geometry), None)
        entry = record.entries.pop(geometry, None)
        if entry is not None:
            self._nbytes -= entry.nbytes

    def _drop_record(self, key: int) -> None:
        record = self._records.pop(key)
        if record.alias is not None and self._aliases.get(record.alias) == key:
            del self._aliases[record.alias]
        for geometry in list(record.entries):
            self._discard(record, geometry)

    def _evict_down_to(self, limit: int, spare_used_since: Optional[int] = None) -> bool:
        """Evict the least recently used entries until at most ``limit`` bytes are held;
        stop at the first entry used after lookup ``spare_used_since`` (where given).
        Whether the limit was reached. Under the lock."""
        while self._nbytes > limit:
            key, record = next(iter(self._lru.items()))
            if spare_used_since is not None and self._last_used.get(key, 0) > spare_used_since:
                return False
            self._discard(record, key[1])
        return True

    def _release(self) -> None:
        """Release the lock, first dropping the records of weights that died meanwhile."""
        while True:
            while self._dead:
                key, ref = self._dead.pop()
                record = self._records.get(key)
                if record is not None and record.ref is ref:
                    self._drop_record(key)
            self._lock.release()
            # A weight that died after the drain found the lock held and queued itself:
            # drop it now, unless another thread holds the lock and will.
            if not self._dead or not self._lock.acquire(blocking=False):
                return

    def clear(self) -> None:
        """Forget every cached spectrum."""
        self._lock.acquire()
        try:
            self._records = {}
            self._lru = OrderedDict()
            self._last_used = {}
            self._last_miss = OrderedDict()
            self._aliases = {}
            self._nbytes = 0
        finally:
            self._release()


class _Record:
    """A weight's cached spectra, by geometry, with its id and a weak reference to it."""

    __slots__ = ("key", "ref", "entries", "alias")

    def __init__(self, key: int, ref: weakref.ref) -> None:
        self.key = key
        self.ref = ref
        self.entries: dict[tuple, _Entry] = {}
        self.alias: Optional[tuple] = None


class _Entry:
    """A cached spectrum and what it was computed from; never changed, so that a hit
    reading it without the lock sees a consistent entry."""

    __slots__ = ("stamp", "storage", "contents", "spectrum", "nbytes")

    def __init__(self, stamp: tuple, storage: StorageWeakRef, contents: Optional[torch.Tensor],
                 spectrum: torch.Tensor) -> None:
        self.stamp = stamp
        self.storage = storage
        self.contents = contents
        self.spectrum = spectrum
        self.nbytes = _nbytes(spectrum) + (0 if contents is None else _nbytes(contents))


def _alias_key(w: torch.Tensor) -> tuple:
    """The memory ``w`` views, as a key: its storage, offset, shape, strides, dtype, device."""
    return (w.untyped_storage().data_ptr(), w.storage_offset(), tuple(w.shape), w.stride(), w.dtype, w.device)


def _nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _check_budget(max_bytes: int) -> int:
    if max_bytes < 0:
        raise ValueError(f"a spectrum cache's budget is a number of bytes >= 0, got {max_bytes}")
    return int(max_bytes)


def _budget_from_environment() -> int:
    """The global cache's budget: ``SPECFX_SPECTRUM_CACHE_MB`` (MiB, fractions allowed),
    else :data:`DEFAULT_MAX_BYTES`."""
    text = os.environ.get("SPECFX_SPECTRUM_CACHE_MB", "").strip()
    if not text:
        return DEFAULT_MAX_BYTES
    try:
        mib = float(text)
    except ValueError:
        mib = math.nan
    if not mib >= 0:
        raise ValueError(f"SPECFX_SPECTRUM_CACHE_MB must be a number of MiB >= 0, got {text!r}")
    return int(mib * 2**20)


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` (same shape, dtype and strides) hold the same values. On CPU
    their bytes are compared with libc's ``memcmp``: equal bytes are equal values (a NaN
    weight too), in one pass with no temporary. In a lowered 1D conv of ~0.7 ms (8x8x64
    kernel, 2-core CPU) that is 0.05 ms less than NumPy's comparison of the values, and
    ``torch.equal`` is slower than both."""
    if _MEMCMP is not None and a.device.type == "cpu" and a.is_contiguous() and b.is_contiguous():
        return _MEMCMP(a.data_ptr(), b.data_ptr(), a.numel() * a.element_size()) == 0
    return torch.equal(a, b)


def _load_memcmp() -> Optional[Callable[[int, int, int], int]]:
    """The C library's ``memcmp``, or ``None`` where no C library can be loaded."""
    for name in (None, ctypes.util.find_library("c"), "msvcrt"):
        try:
            memcmp = ctypes.CDLL(name).memcmp
        except (OSError, AttributeError, TypeError):
            continue
        memcmp.restype = ctypes.c_int
        memcmp.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t)
        return memcmp
    return None


_MEMCMP = _load_memcmp()


def is_plain_tensor(t: torch.Tensor) -> bool:
    """A real, eager tensor (not fake, functional or a tensor subclass being traced)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


SPECTRUM_CACHE = SpectrumCache(max_bytes=_budget_from_environment())
