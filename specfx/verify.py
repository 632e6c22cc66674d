"""Check an optimized graph against the graph it came from, on the example inputs.

Errors are measured relative to each tensor's largest magnitude: an FFT conv's rounding
error is bounded in norm, not per element, so an output element that cancels to nearly
zero can carry a large relative error while the result is as exact as the arithmetic
allows.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Optional

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from . import node_meta
from .capture import preserved_state
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


def verify(reference: fx.GraphModule, optimized: fx.GraphModule, example_inputs: tuple,
           tolerance: Optional[float] = None) -> tuple[float, float]:
    """Run both graphs on ``example_inputs`` and compare their outputs.

    Returns the worst scaled error and its tolerance. On a mismatch, both graphs are run
    again node by node and :class:`VerificationError` names the first node of the
    optimized graph whose value diverges from its counterpart.
    """
    check_tolerance(tolerance)
    with preserved_state(optimized), torch.no_grad():
        expected = reference(*example_inputs)
    with preserved_state(optimized), torch.no_grad():
        actual = optimized(*example_inputs)
    worst, tol, ok = _check(actual, expected, tolerance)
    if ok:
        return worst, tol

    ref_run, opt_run = _Recorder(reference), _Recorder(optimized)
    with preserved_state(optimized), torch.no_grad():
        ref_run.run(*example_inputs)
    with preserved_state(optimized), torch.no_grad():
        opt_run.run(*example_inputs)
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
            origin = f" (lowered from conv {source!r})" if source else ""
            raise VerificationError(
                f"optimized module diverges from the original at node {node.name!r}{origin}: "
                f"error {err:.3e} of the tensor's scale exceeds tolerance {node_tol:.0e}")
    raise VerificationError(
        f"optimized module's outputs differ from the original's: error {worst:.3e} of the "
        f"output scale exceeds tolerance {tol:.0e}")


def _counterpart(node: fx.Node, source: Optional[str], ref_nodes: dict[str, fx.Node]) -> Optional[str]:
    """The reference node computing the same value: the conv a lowered ``from_spectrum``
    replaced (recorded by the rewrite), else the node of the same name."""
    if source is None:
        return node.name
    replaced = node.meta.get(node_meta.REPLACES)
    return replaced if replaced in ref_nodes else None
