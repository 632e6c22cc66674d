"""Weight spectra: a conv kernel placed on the FFT grid and transformed, cached per weight.

A conv output is ``y[t] = Σ_m x[t·s + m·d − pad_left] · w[m]``. Placing tap ``m`` of the
kernel at grid position ``(m·d − pad_left) mod P`` and correlating circularly gives that
sum directly at ``t·s``: dilation and the left padding live in the weight spectrum, so the
input is never padded or shifted, and the output needs only a strided crop. Taps that land
on the same position (a kernel wider than a circular grid) simply add, which is what
circular padding means.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils.weak import WeakIdKeyDictionary

from . import fourier


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


def weight_spectrum(w: torch.Tensor, fft_size: Sequence[int], dilation: Sequence[int],
                    shift: Sequence[int]) -> torch.Tensor:
    """Conjugate spectrum of the placed kernel, shape ``(C_out, C_in/groups, *bins)``.

    The conjugate turns the pointwise product into a correlation, as torch's convs are.
    It is materialized, not a lazy conj view: a custom op's kernel called under a
    ``TorchDispatchMode`` (AOTAutograd runs the first call of every compiled graph under
    one) runs with the ``Conjugate`` dispatch key excluded, so ops there ignore the conj bit.
    """
    real = fourier.real_dtype_for(w.dtype)
    return fourier.rfftn(place_kernel(w.to(real), fft_size, dilation, shift), fft_size).conj_physical()


def weight_spectrum_adjoint(grad: torch.Tensor, w: torch.Tensor, fft_size: Sequence[int],
                            dilation: Sequence[int], shift: Sequence[int]) -> torch.Tensor:
    """Adjoint of :func:`weight_spectrum`: the gradient of the spatial kernel."""
    rank = len(fft_size)
    grid = fourier.rfftn_adjoint(grad.conj(), fft_size)
    return place_kernel_adjoint(grid, w.shape[-rank:], dilation, shift).to(w.dtype)


class SpectrumCache:
    """Weight spectra kept across calls, one per (weight tensor, FFT geometry).

    An entry is reused only while the weight tensor is the same object, at the same
    autograd version (every in-place update — an optimizer step, ``load_state_dict`` —
    bumps it), over the same storage, offset, shape and strides (``param.data = ...``
    swaps them but keeps the version), and — while :attr:`verify_contents` is on, the
    default — with the same values. The storage is identified by a weak reference, not by
    its address: after ``param.data`` is swapped twice, the new storage can sit at the
    address the cached one had. The values are compared because writes through
    ``param.data`` (``param.data.copy_(...)``, EMA updates written that way, and
    ``torch.autograd.gradcheck``'s own perturbations) bump no version of ``param``. The
    comparison costs a pass over the kernel and a stored copy of it (1.8 ms per call for
    wav2vec2's 768x48x128 positional conv on a 2-core CPU, a fifth of the lowered conv's
    time) and, on a GPU, a device sync; code that never writes weights through ``.data``
    can turn it off (``SPECTRUM_CACHE.verify_contents = False``). Tensors that carry no
    version (inference tensors, tensors being traced) are never cached. Entries die with
    their weight.
    """

    def __init__(self, verify_contents: bool = True) -> None:
        self._entries: WeakIdKeyDictionary = WeakIdKeyDictionary()
        self.verify_contents = verify_contents
        self.hits = 0
        self.misses = 0

    def get(self, w: torch.Tensor, fft_size: Sequence[int], dilation: Sequence[int],
            shift: Sequence[int], groups: int,
            layout: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
        """The spectrum of ``w`` as ``layout(spectrum, groups)`` lays it out for the
        channel contraction, so the layout work is cached too."""
        if w.is_inference() or not _is_plain_tensor(w):
            return layout(weight_spectrum(w, fft_size, dilation, shift), groups)
        geometry = (tuple(fft_size), tuple(dilation), tuple(shift), groups, layout)
        stamp = (w._version, w.data_ptr(), w.dtype, w.device, tuple(w.shape), w.stride(),
                 w.storage_offset())
        storage = StorageWeakRef(w.untyped_storage())
        per_weight = self._entries.setdefault(w, {})
        cached = per_weight.get(geometry)
        if cached is not None and self._still_valid(cached, stamp, storage, w):
            self.hits += 1
            return cached[3]
        self.misses += 1
        spectrum = layout(weight_spectrum(w, fft_size, dilation, shift), groups)
        contents = w.detach().clone() if self.verify_contents else None
        per_weight[geometry] = (stamp, storage, contents, spectrum)
        return spectrum

    def _still_valid(self, cached, stamp, storage, w: torch.Tensor) -> bool:
        cached_stamp, cached_storage, contents, _ = cached
        # A live weak reference pins the storage object, so equal references mean the
        # same storage; an expired one means the cached storage is gone.
        if cached_stamp != stamp or cached_storage.expired() or cached_storage != storage:
            return False
        if self.verify_contents:
            return contents is not None and torch.equal(w.detach(), contents)
        return True

    def clear(self) -> None:
        """Forget every cached spectrum."""
        self._entries = WeakIdKeyDictionary()


def _is_plain_tensor(t: torch.Tensor) -> bool:
    """A real, eager tensor (not fake, functional or a tensor subclass being traced)."""
    return type(t) in (torch.Tensor, torch.nn.Parameter) and not torch._C._functorch.is_functorch_wrapped_tensor(t)


SPECTRUM_CACHE = SpectrumCache()
