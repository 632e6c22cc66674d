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
import weakref
from typing import Callable, Optional, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef

from . import contraction, fourier


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


def _complex_dtype(real: torch.dtype) -> torch.dtype:
    return torch.complex128 if real == torch.float64 else torch.complex64


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
                       dtype=_complex_dtype(real), device=w.device)
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
    """Weight spectra kept across calls, one per (weight tensor, FFT geometry).

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
    """

    def __init__(self, verify_contents: bool = True) -> None:
        # id(weight) -> (weak reference to the weight, {geometry: entry}); an entry is
        # (stamp, storage, contents, spectrum). Looked up by id on every call, so that a
        # hit costs a dict lookup, not a weak-key wrapper per call.
        self._entries: dict[int, tuple[weakref.ref, dict]] = {}
        self.verify_contents = verify_contents
        self.hits = 0
        self.misses = 0

    def get(self, w: torch.Tensor, fft_size: Sequence[int], dilation: Sequence[int],
            shift: Sequence[int], groups: int, path: str) -> torch.Tensor:
        """The spectrum of ``w`` laid out for the contraction ``path``
        (:func:`weight_spectrum`), so the layout work is cached too."""
        if w.is_inference() or not _is_plain_tensor(w):
            return weight_spectrum(w, fft_size, dilation, shift, groups, path)
        geometry = (tuple(fft_size), tuple(dilation), tuple(shift), groups, path)
        stamp = (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape), w.stride(),
                 w.storage_offset())
        per_weight = self._per_weight(w)
        cached = per_weight.get(geometry)
        if cached is not None and self._still_valid(cached, stamp, w):
            self.hits += 1
            return cached[3]
        self.misses += 1
        # Stale spectra go before the replacement is computed: in training the weights
        # change every step, and holding both would add a spectrum to the step's peak.
        for key in [key for key, entry in per_weight.items() if key == geometry or entry[0] != stamp]:
            del per_weight[key]
        spectrum = weight_spectrum(w, fft_size, dilation, shift, groups, path)
        contents = w.detach().clone() if self.verify_contents else None
        per_weight[geometry] = (stamp, StorageWeakRef(w.untyped_storage()), contents, spectrum)
        return spectrum

    def _per_weight(self, w: torch.Tensor) -> dict:
        """The entries of ``w`` (created empty); they die with ``w``."""
        key = id(w)
        found = self._entries.get(key)
        if found is not None and found[0]() is w:
            return found[1]
        entries = self._entries

        def forget(ref: weakref.ref) -> None:
            if entries.get(key, (None,))[0] is ref:
                del entries[key]

        per_weight: dict = {}
        entries[key] = (weakref.ref(w, forget), per_weight)
        return per_weight

    def _still_valid(self, cached, stamp, w: torch.Tensor) -> bool:
        cached_stamp, cached_storage, contents, _ = cached
        if cached_stamp != stamp:
            return False
        if self.verify_contents:
            # Equal values give the same spectrum, whatever storage holds them.
            return contents is not None and _same_values(w.detach(), contents)
        # A live weak reference pins the storage object, so equal references mean the
        # same storage; an expired one means the cached storage is gone.
        return not cached_storage.expired() and cached_storage == StorageWeakRef(w.untyped_storage())

    def clear(self) -> None:
        """Forget every cached spectrum."""
        self._entries = {}


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


def _is_plain_tensor(t: torch.Tensor) -> bool:
    """A real, eager tensor (not fake, functional or a tensor subclass being traced)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


SPECTRUM_CACHE = SpectrumCache()
