"""Registration of the spectral ops with torch's dispatcher, in the ``specfx`` namespace.

A :class:`SpectralOp` has the interface of ``torch.library.custom_op`` (``register_fake``,
``register_autograd``, ``register_kernel``) and registers the same things — a schema
inferred from the type hints, one implementation for every device, a fake implementation,
an autograd formula — by one of two routes, chosen once at import (:data:`ROUTE`):

- ``"dispatcher"`` (:class:`_DispatcherOp`): straight onto the dispatcher, through
  private pieces of torch (:data:`PRIVATE_PIECES`). ``custom_op``'s generic wrappers (its
  keyword-argument handling, output-aliasing check and nested redispatch) cost ~45 µs per
  call on a 2-core CPU, ~130 µs of a ~0.65 ms lowered 1D conv of three ops; here the
  dispatch costs ~12 µs.
- ``"custom_op"`` (:class:`_CustomOp`): ``torch.library.custom_op``, public API only, for
  a torch that lacks one of those pieces (``pyproject`` accepts torch releases it was not tested on), or
  when the environment variable ``SPECFX_PUBLIC_LIBRARY=1`` asks for it (CI runs the
  tests that way too). :data:`ROUTE_REASONS` says why it was taken.

Both compute the same numbers: the route changes what a call costs, not what it runs.
"""

from __future__ import annotations

import abc
import functools
import inspect
import os
from typing import Any, Callable

import torch
from torch import _C

NAMESPACE = "specfx"
_LIBRARY = torch.library.Library(NAMESPACE, "DEF")

# torch._C attributes the dispatcher route calls.
PRIVATE_PIECES = ("_AutoDispatchBelowAutograd", "_after_autograd_keyset", "_dispatch_key_for_device",
                  "is_grad_enabled")


def _private_route_missing() -> list[str]:
    """Why the dispatcher route cannot be taken here (empty when it can)."""
    reasons = [f"torch._C.{name} is missing" for name in PRIVATE_PIECES if not hasattr(_C, name)]
    if "with_keyset" not in inspect.signature(torch.library.Library.impl).parameters:
        reasons.append("torch.library.Library.impl takes no with_keyset")
    if not hasattr(torch, "_disable_dynamo"):
        reasons.append("torch._disable_dynamo is missing")
    try:
        from torch._C._dynamo.eval_frame import get_eval_frame_callback  # noqa: F401
    except ImportError:
        reasons.append("torch._C._dynamo.eval_frame.get_eval_frame_callback is missing")
    return reasons


def _choose_route() -> tuple[str, list[str]]:
    if os.environ.get("SPECFX_PUBLIC_LIBRARY", "").strip() not in ("", "0"):
        return "custom_op", ["SPECFX_PUBLIC_LIBRARY is set"]
    missing = _private_route_missing()
    return ("custom_op", missing) if missing else ("dispatcher", [])


ROUTE, ROUTE_REASONS = _choose_route()


class SpectralOp(abc.ABC):
    """The operator ``specfx::<name>`` whose implementation is ``kernel``. Calling it
    calls the operator (through the dispatcher), as ``torch.ops.specfx.<name>`` does.
    :func:`spectral_op` makes the subclass of the chosen :data:`ROUTE`."""

    overload: torch._ops.OpOverload

    def __init__(self, name: str, kernel: Callable[..., torch.Tensor]) -> None:
        self.name = name
        self.qualname = f"{NAMESPACE}::{name}"
        # The implementation the dispatcher runs on devices with no kernel of their own.
        self.kernel = kernel
        # The undecorated implementation per device type, for kernels composed of this op.
        self._device_kernels: dict[str, Callable[..., torch.Tensor]] = {}
        functools.update_wrapper(self, kernel)

    def __call__(self, *args: Any) -> torch.Tensor:
        return self.overload(*args)

    def implementation(self, device: torch.device) -> Callable[..., torch.Tensor]:
        """The function that implements the op on ``device``, for a kernel composed of
        this op to call without a second trip through the dispatcher."""
        return self._device_kernels.get(device.type, self.kernel)

    @abc.abstractmethod
    def register_fake(self, fake: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """The op's output metadata from its inputs', for fake tensors (export, compile)."""

    @abc.abstractmethod
    def register_kernel(self, device_type: str, kernel: Callable[..., torch.Tensor]) -> None:
        """Run ``kernel`` instead of the default implementation on ``device_type``."""

    @abc.abstractmethod
    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        """Differentiate the op with ``backward(ctx, grad)``, which returns one gradient
        per input (``None`` for non-tensors), after ``setup_context(ctx, inputs, output)``
        saved what it needs: the conventions of ``torch.library.custom_op``."""

    @abc.abstractmethod
    def register_composite_autograd(self, composite: Callable[..., torch.Tensor]) -> None:
        """Differentiate the op as ``composite``, the same computation written with
        differentiable ops: where a gradient is needed the op runs ``composite`` (so
        autograd, and the graphs AOTAutograd traces, hold those ops and their formulas);
        where none is, its own kernel."""


class _DispatcherOp(SpectralOp):
    """The dispatcher route: the op's kernels registered with ``torch.library.Library``
    under their dispatch keys, and an autograd kernel that calls the backend's kernel
    itself where nothing else (fake tensors, functionalization, tracing) lies between."""

    def __init__(self, name: str, kernel: Callable[..., torch.Tensor]) -> None:
        super().__init__(name, kernel)
        _LIBRARY.define(name + torch.library.infer_schema(kernel, mutates_args=()))
        default = _opaque_to_dynamo(kernel)
        _LIBRARY.impl(name, default, "CompositeExplicitAutograd")
        # The kernel the dispatcher runs for each backend key, for calls that need no
        # autograd and meet no other key on the way (see _register_autograd_kernel).
        self._backend_kernels = {_C.DispatchKey.CPU: default}
        self.overload = getattr(getattr(torch.ops, NAMESPACE), name).default

    def register_fake(self, fake: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        torch.library.register_fake(self.qualname, fake, lib=_LIBRARY)
        return fake

    def register_kernel(self, device_type: str, kernel: Callable[..., torch.Tensor]) -> None:
        key, opaque = _C._dispatch_key_for_device(device_type), _opaque_to_dynamo(kernel)
        _LIBRARY.impl(self.name, opaque, key)
        self._backend_kernels[getattr(_C.DispatchKey, key)] = opaque
        self._device_kernels[device_type] = kernel

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        overload = self.overload

        def forward(*args: Any) -> torch.Tensor:
            # Grad mode is off in here, so this reaches the backend kernel.
            return _owning_storage(overload(*args))

        # Named after the op, so that a backward node reads ``specfx_<name>Backward``.
        differentiable = type(f"specfx_{self.name}", (torch.autograd.Function,), {
            "forward": staticmethod(forward),
            "setup_context": staticmethod(setup_context),
            "backward": staticmethod(backward),
        })
        self._register_autograd_kernel(differentiable.apply)

    def register_composite_autograd(self, composite: Callable[..., torch.Tensor]) -> None:
        self._register_autograd_kernel(composite)

    def _register_autograd_kernel(self, differentiable: Callable[..., torch.Tensor]) -> None:
        overload, backend_kernels = self.overload, self._backend_kernels

        def autograd_kernel(keyset: _C.DispatchKeySet, *args: Any) -> torch.Tensor:
            if _C.is_grad_enabled() and _any_requires_grad(args):
                return differentiable(*args)
            below = keyset & _C._after_autograd_keyset
            with _C._AutoDispatchBelowAutograd():
                # Where a backend is next (no fake or functional tensors, no tracing mode),
                # call its kernel here: what the redispatch would reach, without a second
                # trip through the dispatcher (~10 µs).
                kernel = backend_kernels.get(below.highestPriorityTypeId())
                if kernel is not None:
                    return kernel(*args)
                return overload.redispatch(below, *args)

        _LIBRARY.impl(self.name, autograd_kernel, "Autograd", with_keyset=True)


class _CustomOp(SpectralOp):
    """The public route: the op is a ``torch.library.custom_op``."""

    def __init__(self, name: str, kernel: Callable[..., torch.Tensor]) -> None:
        super().__init__(name, kernel)
        self._op = torch.library.custom_op(self.qualname, _owning_results(kernel), mutates_args=(),
                                           schema=torch.library.infer_schema(kernel, mutates_args=()))
        self.overload = getattr(getattr(torch.ops, NAMESPACE), name).default

    def register_fake(self, fake: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        self._op.register_fake(fake)
        return fake

    def register_kernel(self, device_type: str, kernel: Callable[..., torch.Tensor]) -> None:
        self._op.register_kernel(device_type, _owning_results(kernel))
        self._device_kernels[device_type] = kernel

    def register_autograd(self, backward: Callable, setup_context: Callable) -> None:
        self._op.register_autograd(backward, setup_context=setup_context)

    def register_composite_autograd(self, composite: Callable[..., torch.Tensor]) -> None:
        # custom_op takes only backward formulas: the formula differentiates ``composite``
        # run again on the saved inputs (with grad mode on, so that a gradient of the
        # gradient flows back to those inputs through the composite's ops).
        def setup_context(ctx: Any, inputs: tuple, output: torch.Tensor) -> None:
            tensors = [i for i, a in enumerate(inputs) if isinstance(a, torch.Tensor)]
            ctx.save_for_backward(*(inputs[i] for i in tensors))
            ctx.tensor_positions = tensors
            ctx.inputs = [None if isinstance(a, torch.Tensor) else a for a in inputs]

        def backward(ctx: Any, grad: torch.Tensor) -> tuple:
            inputs = list(ctx.inputs)
            for i, t in zip(ctx.tensor_positions, ctx.saved_tensors):
                inputs[i] = t
            wanted = [i for i, need in enumerate(ctx.needs_input_grad) if need and inputs[i] is not None]
            with torch.enable_grad():
                out = composite(*inputs)
            grads = torch.autograd.grad(out, [inputs[i] for i in wanted], grad, allow_unused=True,
                                        create_graph=torch.is_grad_enabled())
            result: list = [None] * len(inputs)
            for i, g in zip(wanted, grads):
                result[i] = g
            return tuple(result)

        self._op.register_autograd(backward, setup_context=setup_context)


# Autocast kernels live in a library of their own: both routes' ops take them the same way.
_AUTOCAST_LIBRARY = torch.library.Library(NAMESPACE, "IMPL")
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}


def autocast_as_conv(op: SpectralOp) -> SpectralOp:
    """Under ``torch.autocast``, run ``op`` as autocast runs the conv it computes (part of):
    in the autocast dtype. Its real floating tensors of the autocast device, except
    float64 ones, are cast to that dtype, and so is a floating ``dtype`` argument (the
    output dtype), as autocast casts a conv's input, weight and bias and returns its
    output in that dtype. Spectra (complex) are left alone: the transforms compute in
    float32 whatever the real dtype. Autocast is off for the call itself."""
    for device_type, key in _AUTOCAST_KEYS.items():
        def kernel(*args: Any, device_type: str = device_type) -> torch.Tensor:
            dtype = torch.get_autocast_dtype(device_type)
            cast = [_autocast_arg(a, device_type, dtype) for a in args]
            with torch.autocast(device_type, enabled=False):
                return op.overload(*cast)

        _AUTOCAST_LIBRARY.impl(op.name, kernel, key)
    return op


def _autocast_arg(arg: Any, device_type: str, dtype: torch.dtype) -> Any:
    if isinstance(arg, torch.Tensor):
        eligible = arg.is_floating_point() and arg.dtype != torch.float64 and arg.device.type == device_type
        return arg.to(dtype) if eligible else arg
    if isinstance(arg, torch.dtype) and arg.is_floating_point and arg != torch.float64:
        return dtype
    return arg


def spectral_op(name: str) -> Callable[[Callable[..., torch.Tensor]], SpectralOp]:
    """Decorator: define ``specfx::<name>`` with the decorated function as its
    implementation, by the chosen :data:`ROUTE`."""
    return functools.partial(_DispatcherOp if ROUTE == "dispatcher" else _CustomOp, name)


def _any_requires_grad(args: tuple) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _owning_storage(out: torch.Tensor) -> torch.Tensor:
    """``out``, copied where it is a view of a kernel's own temporary (a crop that keeps
    the layout): autograd forbids in-place writes into a view made inside a Function,
    which the caller's ``relu_()`` on the result would be. The dispatcher route copies
    only where a gradient is recorded."""
    return out.clone() if out._base is not None else out


def _owning_results(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``kernel`` with :func:`_owning_storage` results: custom_op runs the same kernel with
    and without autograd, so the copy cannot be kept to the autograd path as above."""
    def run(*args: Any) -> torch.Tensor:
        return _owning_storage(kernel(*args))

    return functools.wraps(kernel)(run)


def _opaque_to_dynamo(kernel: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``kernel`` as torch.compile should see it: a call it does not trace into (the op is
    one node of a captured graph; its implementation runs only when the graph does)."""
    from torch._C._dynamo.eval_frame import get_eval_frame_callback

    shielded = torch._disable_dynamo(kernel)

    def run(*args: Any) -> torch.Tensor:
        # Outside torch.compile no frame callback is set, and the shield (~5 µs) guards
        # against nothing.
        if get_eval_frame_callback() is None:
            return kernel(*args)
        return shielded(*args)

    return functools.wraps(kernel)(run)
