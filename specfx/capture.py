"""Front ends: turn a model into an ``fx.GraphModule`` with shapes on every node.

``torch.fx.symbolic_trace`` comes first: it keeps ``call_module`` nodes and the module
tree, so the optimized module's ``state_dict`` matches the original's. Models it cannot
trace (data-dependent Python control flow, as in most Hugging Face models) go to
``torch.export``, whose ATen-level graph carries each op's source module in
``nn_module_stack``.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from .errors import CaptureError

FRONTENDS = ("symbolic_trace", "export")


@contextlib.contextmanager
def preserved_state(module: nn.Module, seed: int = 0) -> Iterator[None]:
    """Run code on ``module`` without leaving a trace: buffers and parameters (e.g.
    BatchNorm running statistics in train mode) are restored afterwards, and the global
    RNG is forked and seeded, so runs that use dropout see the same random numbers."""
    tensors = [*module.parameters(), *module.buffers()]
    saved = [t.detach().clone() for t in tensors]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            with torch.no_grad():
                for tensor, value in zip(tensors, saved):
                    tensor.copy_(value)


def _keep_module_tree(gm: fx.GraphModule, model: nn.Module) -> fx.GraphModule:
    """Give the traced module the original's whole module tree.

    ``GraphModule`` copies only the submodules and attributes its graph touches, so
    unused parameters and buffers would be missing from its ``state_dict``. Graph targets
    resolve the same through the original children.
    """
    for name, child in model.named_children():
        setattr(gm, name, child)
    for name, param in model._parameters.items():
        if param is not None:
            gm.register_parameter(name, param)
    for name, buf in model._buffers.items():
        if buf is not None:
            gm.register_buffer(name, buf, persistent=name not in model._non_persistent_buffers_set)
    return gm


def _symbolic_trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    gm = _keep_module_tree(fx.symbolic_trace(model), model)
    with preserved_state(gm), torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    return gm


def _export(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    return torch.export.export(model, example_inputs).module()


_CAPTURE: dict[str, Callable[[nn.Module, tuple], fx.GraphModule]] = {
    "symbolic_trace": _symbolic_trace,
    "export": _export,
}


def capture(model: nn.Module, example_inputs: tuple, frontend: str = "auto") -> tuple[fx.GraphModule, str]:
    """Capture ``model`` (which the caller owns: it may be shared with the result) with
    the first front end that works, or the one named. Returns the graph and the name of
    the front end used; raises :class:`CaptureError` listing each failure."""
    if frontend != "auto" and frontend not in FRONTENDS:
        raise ValueError(f"frontend must be 'auto' or one of {FRONTENDS}, got {frontend!r}")
    names = FRONTENDS if frontend == "auto" else (frontend,)
    failures: list[str] = []
    for name in names:
        try:
            return _CAPTURE[name](model, example_inputs), name
        except Exception as err:  # each front end fails in its own ways; all are reported
            failures.append(f"{name}: {type(err).__name__}: {_first_line(err)}")
    raise CaptureError(f"could not capture {type(model).__name__} as an fx graph:\n  " + "\n  ".join(failures))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def run_module(module: nn.Module, example_inputs: tuple) -> Any:
    """``module(*example_inputs)`` without gradients or lasting side effects."""
    with preserved_state(module), torch.no_grad():
        return module(*example_inputs)
