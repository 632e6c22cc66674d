"""Check an optimized module against the user's original module, on the example inputs.

Errors are measured relative to each tensor's largest magnitude: an FFT conv's rounding
error is bounded in norm, not per element, so an output element that cancels to nearly
zero can carry a large relative error while the result is as exact as the arithmetic
allows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_map

from . import node_meta
from .capture import fresh_inputs, preserved_state
from .errors import VerificationError

# Largest error, relative to the output's scale, accepted per result dtype. An FFT conv
# in fp32 rounds to ~eps·log2(N) ≈ 1e-6 of the scale; the bound leaves room for a few
# dozen lowered layers compounding. Half-precision models are compared against a
# reference computed in half precision, whose own error dominates.
DEFAULT_TOLERANCE = {
    torch.float64: 1e-10,
    torch.float32: 1e-4,
    torch.float16: 1e-2,
    torch.bfloat16: 5e-2,
}


def check_tolerance(tolerance: Optional[float]) -> None:
    """A tolerance override must be a number ≥ 0 (0 accepts only exact results)."""
    if tolerance is not None and not (isinstance(tolerance, (int, float)) and tolerance >= 0):
        raise ValueError(f"verify_tol must be None or a number >= 0, got {tolerance!r}")


def tolerance_for(dtype: torch.dtype, override: Optional[float]) -> float:
    return override if override is not None else DEFAULT_TOLERANCE.get(dtype, 1e-4)


def scaled_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|."""
    a, e = actual.detach().double(), expected.detach().double()
    scale = e.abs().max().item() if e.numel() else 0.0
    return (a - e).abs().max().item() / max(scale, torch.finfo(torch.float64).tiny) if e.numel() else 0.0


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        self.values[n.name] = value
        return value


def _tensor_pairs(actual: Any, expected: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    a_leaves, _ = tree_flatten(actual)
    e_leaves, _ = tree_flatten(expected)
    for a, e in zip(a_leaves, e_leaves):
        if isinstance(a, torch.Tensor) and isinstance(e, torch.Tensor) and e.is_floating_point():
            yield a, e


def _excess(err: float, tol: float) -> float:
    """How many tolerances ``err`` is (a zero tolerance admits only exact results)."""
    if tol > 0:
        return err / tol
    return math.inf if err > 0 else 0.0


def _check(actual: Any, expected: Any, override: Optional[float]) -> tuple[float, float, bool]:
    """Worst scaled error, its tolerance, and whether every tensor is within its own."""
    worst, worst_tol, ok = 0.0, tolerance_for(torch.float32, override), True
    for a, e in _tensor_pairs(actual, expected):
        err, tol = scaled_error(a, e), tolerance_for(e.dtype, override)
        ok &= err <= tol
        if _excess(err, tol) >= _excess(worst, worst_tol):
            worst, worst_tol = err, tol
    return worst, worst_tol, ok


# Where the optimized module misses the tolerance against the original, both are judged
# against a float64 run of the original: specfx is rejected only if its error there is
# more than this many times the original's own (fp32 rounding in a deep network can exceed
# the tolerance in eager mode alone: timm's res2net50_14w_8s at (1, 3, 64, 64) is 7.9e-5 of
# the output scale from its fp64 run).
ACCURACY_SLACK = 2.0


@dataclasses.dataclass(frozen=True)
class Verified:
    """The outcome of a successful verification: the worst error against the original
    (relative to the output's scale), its tolerance, and how it was accepted when the
    float64 judgement was needed."""

    error: float
    tolerance: float
    note: Optional[str] = None


def run_copy(module: Callable[..., Any], example_inputs: tuple) -> Any:
    """``module`` on its own copy of the inputs, without gradients or lasting side effects."""
    state = preserved_state(module) if isinstance(module, nn.Module) else contextlib.nullcontext()
    with state, torch.no_grad():
        return module(*fresh_inputs(example_inputs))


def measured_error(original: nn.Module, optimized: fx.GraphModule, example_inputs: tuple) -> float:
    """The worst error of ``optimized``'s outputs against ``original``'s on the example
    inputs, relative to each output's largest magnitude."""
    return _check(run_copy(optimized, example_inputs), run_copy(original, example_inputs), None)[0]


def _as_float64(value: Any) -> Any:
    return value.to(torch.float64) if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _float64_outputs(original: nn.Module, example_inputs: tuple) -> Optional[Any]:
    """The original's outputs computed in float64 (a float64 copy of the module on float64
    inputs), or ``None`` where the module cannot run in float64."""
    try:
        module = copy.deepcopy(original).to(torch.float64)
        return run_copy(module, tree_map(_as_float64, example_inputs))
    except Exception:  # a model that fixes its own dtypes cannot be judged this way
        return None


def _judge_in_float64(actual: Any, expected: Any, exact: Any, override: Optional[float]) -> Optional[str]:
    """Why the optimized outputs are as accurate as the original's, judged against the
    float64 outputs ``exact``; ``None`` if some output is not."""
    notes = []
    for (a, e), (_, x) in zip(_tensor_pairs(actual, expected), _tensor_pairs(actual, exact)):
        if scaled_error(a, e) <= tolerance_for(e.dtype, override):
            continue
        optimized_error, original_error = scaled_error(a, x), scaled_error(e, x)
        if optimized_error > ACCURACY_SLACK * original_error:
            return None
        notes.append(f"against a float64 run the optimized output's error is {optimized_error:.2e} "
                     f"and the original's {original_error:.2e} of the output scale")
    return "; ".join(notes) or None


def verify(original: nn.Module, reference: fx.GraphModule, optimized: fx.GraphModule, example_inputs: tuple,
           tolerance: Optional[float] = None) -> Verified:
    """Run the user's ``original`` module and ``optimized`` on their own copies of
    ``example_inputs`` and compare the outputs.

    With the default tolerances (``tolerance=None``), outputs beyond them are accepted
    where the optimized module is about as accurate as the original itself against a
    float64 run of the original (:data:`ACCURACY_SLACK`), or where every node specfx wrote
    agrees with the original within tolerance at its own scale and the difference grows
    only in the original's own ops (a slice of exact zeros, a cancellation: relative to
    their outputs' scale, any rounding there is large). An explicit ``tolerance`` is applied
    to the outputs as given. Otherwise :class:`VerificationError` names the first node of
    the optimized graph whose value diverges from its counterpart in ``reference`` (the
    graph as captured, before any pass), or says that the capture itself differs.
    """
    check_tolerance(tolerance)
    expected = run_copy(original, example_inputs)
    actual = run_copy(optimized, example_inputs)
    worst, tol, ok = _check(actual, expected, tolerance)
    if ok:
        return Verified(worst, tol)
    exceeded = f"error {worst:.2e} exceeds tolerance {tol:.0e}"
    # An explicit tolerance is the caller's bound; the default ones are judged further.
    exact = _float64_outputs(original, example_inputs) if tolerance is None else None
    if exact is not None:
        note = _judge_in_float64(actual, expected, exact, tolerance)
        if note is not None:
            return Verified(worst, tol, f"{exceeded}, but {note}: accepted")
    captured_error, _, captured_ok = _check(run_copy(reference, example_inputs), expected, tolerance)
    if not captured_ok:
        raise VerificationError(
            f"the captured graph already differs from the original module (error {captured_error:.3e} of the "
            f"output scale): the front end did not capture what the module computes")
    divergence = _first_divergence(reference, optimized, example_inputs, tolerance)
    if divergence is not None and (divergence.source is not None or tolerance is not None):
        raise VerificationError(divergence.message())
    if divergence is None:
        raise VerificationError(f"optimized module's outputs differ from the original's: {exceeded} of the "
                                f"output scale")
    return Verified(worst, tol, f"{exceeded}, but every node specfx wrote agrees with the original; the "
                                f"difference grows at node {divergence.node!r} of the original model "
                                f"({divergence.error:.2e} of that node's scale): accepted")


@dataclasses.dataclass(frozen=True)
class _Divergence:
    node: str
    source: Optional[str]  # the conv a specfx node was lowered from; None for the model's own nodes
    error: float
    tolerance: float

    def message(self) -> str:
        origin = f" (lowered from conv {self.source!r})" if self.source else ""
        return (f"optimized module diverges from the original at node {self.node!r}{origin}: "
                f"error {self.error:.3e} of the tensor's scale exceeds tolerance {self.tolerance:.0e}")


def _first_divergence(reference: fx.GraphModule, optimized: fx.GraphModule, example_inputs: tuple,
                      tolerance: Optional[float]) -> Optional[_Divergence]:
    """Run both graphs node by node: the first node of ``optimized`` whose value diverges
    from its counterpart's, if any."""
    ref_run, opt_run = _Recorder(reference), _Recorder(optimized)
    with preserved_state(optimized), torch.no_grad():
        ref_run.run(*fresh_inputs(example_inputs))
    with preserved_state(optimized), torch.no_grad():
        opt_run.run(*fresh_inputs(example_inputs))
    ref_nodes = {n.name: n for n in reference.graph.nodes}
    for node in optimized.graph.nodes:
        source = node.meta.get(node_meta.LOWERED_FROM)
        if node.op == "output" or (source is None and node.name not in ref_nodes):
            continue
        counterpart = _counterpart(node, source, ref_nodes)
        if counterpart is None or counterpart not in ref_run.values:
            continue
        err, node_tol, node_ok = _check(opt_run.values[node.name], ref_run.values[counterpart], tolerance)
        if not node_ok:
            return _Divergence(node.name, source, err, node_tol)
    return None


def _counterpart(node: fx.Node, source: Optional[str], ref_nodes: dict[str, fx.Node]) -> Optional[str]:
    """The reference node computing the same value: the conv a lowered ``from_spectrum``
    replaced (recorded by the rewrite), else the node of the same name."""
    if source is None:
        return node.name
    replaced = node.meta.get(node_meta.REPLACES)
    return replaced if replaced in ref_nodes else None
