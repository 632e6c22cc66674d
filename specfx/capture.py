"""Front ends: turn a model into an ``fx.GraphModule`` with shapes on every node.

``torch.fx.symbolic_trace`` comes first: it keeps ``call_module`` nodes and the module
tree, so the optimized module's ``state_dict`` matches the original's. Models it cannot
trace (data-dependent Python control flow, as in most Hugging Face models) go to
``torch.export``, whose ATen-level graph carries each op's source module in
``nn_module_stack``. Export leaves the batch dimension free (where the example's is > 1
and the model allows it) and fixes the other sizes; a call that breaks its input guards
raises a ``ValueError`` saying to optimize again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import sys
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
import torch.utils._pytree as pytree
from torch.fx.passes.shape_prop import ShapeProp

from . import guards
from .errors import CaptureError
from .ops.spectral_ops import gradient_after_weight
from .torch_compat import add_deepcopy_hook

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


def fresh_inputs(inputs: Any) -> Any:
    """A copy of ``inputs`` with every tensor cloned (strides, ``requires_grad`` kept).

    Every run specfx makes of a model gets its own copy: a forward that writes into its
    input (``x.mul_(2)``) would otherwise change the caller's tensors, and each later run
    would start from the changed values.
    """
    def clone(leaf: Any) -> Any:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        return leaf.detach().clone().requires_grad_(leaf.requires_grad)

    return pytree.tree_map(clone, inputs)


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


@dataclasses.dataclass(frozen=True)
class _NonPersistentBuffers:
    """Deep-copy hook of a captured module: ``GraphModule.__deepcopy__`` re-registers every
    root buffer as persistent, so a copy's ``state_dict`` would gain the original's
    non-persistent buffers. (A class, not a closure, so the module still pickles.)"""

    names: frozenset[str]

    def __call__(self, copied: fx.GraphModule) -> None:
        copied._non_persistent_buffers_set.update(name for name in self.names if name in copied._buffers)


def keep_buffers_non_persistent_on_copy(gm: fx.GraphModule) -> None:
    if gm._non_persistent_buffers_set:
        add_deepcopy_hook(gm, _NonPersistentBuffers(frozenset(gm._non_persistent_buffers_set)))


# Calls a lowered module makes that a trace of it keeps as calls: the call-time checks of
# lowered convs (specfx.guards), which branch on shapes, and the bias reads that order a
# conv's gradients (they branch on requires_grad).
_KEPT_CALLS = (*guards.CHECKS, gradient_after_weight)


class _Tracer(fx.Tracer):
    """``symbolic_trace``'s tracer, keeping the input guards of a module captured by export
    (being optimized again) as one call, so that they still explain themselves, and the
    calls of :data:`_KEPT_CALLS` as calls."""

    def __init__(self) -> None:
        super().__init__(autowrap_functions=_KEPT_CALLS)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, InputGuards) or super().is_leaf_module(m, module_qualified_name)


def _unmark_checks(graph: fx.Graph) -> None:
    """The tracer marks the checks it kept as calls, and the code of a marked node declares
    it wrapped for later traces: _Tracer wraps them anyway, and the code of a lowered module
    traced again then reads as it did."""
    for node in graph.nodes:
        if node.target in _KEPT_CALLS:
            node.meta.pop("is_wrapped", None)


def _symbolic_trace(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    # fx writes its own account of a failure to stderr before raising (ShapeProp prints the
    # whole traceback; a GraphModule inside the model prints its generated code), which for
    # a model that export then captures is a page of noise: the failure belongs in the
    # capture notes. So stderr is held while tracing (process-wide, as sys.stderr is) and
    # passed on only if the trace succeeds; when it fails, the next front end runs the
    # model again and its own output with it.
    held = io.StringIO()
    with contextlib.redirect_stderr(held):
        tracer = _Tracer()
        graph = tracer.trace(model)
        _unmark_checks(graph)
        gm = _keep_module_tree(fx.GraphModule(tracer.root, graph, type(model).__name__), model)
        with preserved_state(gm), torch.no_grad():
            _propagate_shapes(gm, fresh_inputs(example_inputs))
    sys.stderr.write(held.getvalue())
    return gm


class _ShapeProp(ShapeProp):
    """``ShapeProp`` that remembers the node it is running, to name the one that fails."""

    node: Optional[fx.Node] = None

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        return super().run_node(n)


def _propagate_shapes(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """``ShapeProp`` on ``gm``, failing with the node that failed and its error (ShapeProp's
    own error spells out the node's whole ``meta``, and hides the error in its cause)."""
    interpreter = _ShapeProp(gm)
    try:
        interpreter.propagate(*example_inputs)
    except Exception as err:
        failed = interpreter.node.name if interpreter.node is not None else "?"
        cause = err.__cause__ if isinstance(err.__cause__, Exception) else err
        raise RuntimeError(f"the traced graph failed at node {failed}: {type(cause).__name__}: "
                           f"{_first_line(cause)}") from err


def _batch_dynamic_shapes(example_inputs: tuple) -> tuple:
    """``dynamic_shapes`` for ``torch.export`` that leave the leading (batch) dim of each
    tensor input free, as a ``call_module`` graph does. ``Dim.AUTO`` lets export
    specialize it where the model needs a fixed size (e.g. the channels of an unbatched
    input). Size-1 dims stay static: export specializes them anyway, with a warning."""
    return tuple({0: torch.export.Dim.AUTO}
                 if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] > 1 else None
                 for x in example_inputs)


class InputGuards(nn.Module):
    """Wraps the input guards ``torch.export`` puts at the top of its graph: a call with
    inputs the graph was not captured for (another spatial size) raises a ``ValueError``
    that says what to do, instead of a bare ``AssertionError: Guard failed``."""

    _is_impure = True  # called for its checks only: dead-code elimination must keep it

    def __init__(self, guards: nn.Module, captured_for: str) -> None:
        super().__init__()
        self.guards = guards
        self.captured_for = captured_for

    def forward(self, *args: Any) -> Any:
        try:
            return self.guards(*args)
        except AssertionError as err:
            got = describe_inputs(args)
            raise ValueError(
                f"specfx: this module was captured with torch.export for inputs like "
                f"({self.captured_for}) and cannot run on ({got}): {_first_line(err)}; run "
                f"specfx.optimize again with an example input of that size") from err


def _export(model: nn.Module, example_inputs: tuple) -> fx.GraphModule:
    try:
        program = torch.export.export(model, example_inputs, dynamic_shapes=_batch_dynamic_shapes(example_inputs))
    except Exception:  # a model that cannot take a free batch size may still export as is
        program = torch.export.export(model, example_inputs)
    gm = program.module()
    guards = getattr(gm, "_guards_fn", None)
    if isinstance(guards, nn.Module):
        gm._guards_fn = InputGuards(guards, describe_inputs(example_inputs))
    return gm


_CAPTURE: dict[str, Callable[[nn.Module, tuple], fx.GraphModule]] = {
    "symbolic_trace": _symbolic_trace,
    "export": _export,
}


def capture(model: nn.Module, example_inputs: tuple, frontend: str = "auto",
            notes: Optional[list[str]] = None) -> tuple[fx.GraphModule, str]:
    """Capture ``model`` (which the caller owns: it may be shared with the result) with
    the first front end that works, or the one named. Returns the graph and the name of
    the front end used; raises :class:`CaptureError` listing each failure. When a front
    end fails and a later one succeeds, the failure is appended to ``notes``."""
    check_frontend(frontend)
    names = FRONTENDS if frontend == "auto" else (frontend,)
    failures: list[str] = []
    for name in names:
        try:
            gm = _CAPTURE[name](model, example_inputs)
        except Exception as err:  # each front end fails in its own ways; all are reported
            failures.append(f"{name}: {type(err).__name__}: {_first_line(err)}")
            continue
        if notes is not None:
            notes.extend(f"{failure} (fell back to {name})" for failure in failures)
        keep_buffers_non_persistent_on_copy(gm)
        return gm, name
    raise CaptureError(f"could not capture {type(model).__name__} as an fx graph:\n  " + "\n  ".join(failures))


def check_frontend(frontend: str) -> None:
    if frontend != "auto" and frontend not in FRONTENDS:
        raise ValueError(f"frontend must be 'auto' or one of {FRONTENDS}, got {frontend!r}")


def describe_inputs(inputs: tuple) -> str:
    """``inputs`` for a message: ``Tensor(2, 3, 8, 8) float32`` per tensor, the type's name
    for anything else."""
    return ", ".join(f"Tensor{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                     if isinstance(x, torch.Tensor) else type(x).__name__ for x in inputs)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else ""


def run_module(module: nn.Module, example_inputs: tuple) -> Any:
    """``module(*example_inputs)`` without gradients or lasting side effects (on a copy
    of the inputs)."""
    with preserved_state(module), torch.no_grad():
        return module(*fresh_inputs(example_inputs))
