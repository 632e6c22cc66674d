"""The poly plans of a graph's chain activations: the square exactly, every other
activation fitted (:func:`.poly.fit_poly`) on the pre-activation values the example inputs
produce, recorded by running the graph on them.

Kept apart from :mod:`.poly` so that the fit itself stays a function of tensors: this
module is the part that runs an fx graph. It may import :mod:`.poly`, :mod:`.plan`,
:mod:`.chain`, :mod:`.recognize` and :mod:`specfx.capture`.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from specfx.capture import preserved_state

from . import poly
from .chain import Member
from .plan import PolyPlan
from .recognize import ChainOp


class _Recorder(fx.Interpreter):
    """Runs the graph, keeping a copy of the tensor each ``wanted`` node makes."""

    def __init__(self, gm: fx.GraphModule, wanted: set[str]) -> None:
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        if n.name in self.wanted and isinstance(value, torch.Tensor):
            self.values[n.name] = value.detach().clone()
        return value


def _real_inputs(inputs: Optional[Sequence[Any]]) -> bool:
    """Whether ``inputs`` hold values to record (fake tensors have none)."""
    from torch._subclasses.fake_tensor import FakeTensor
    return inputs is not None and not any(isinstance(x, FakeTensor) for x in inputs if isinstance(x, torch.Tensor))


def fit_polys(gm: fx.GraphModule, example_inputs: Optional[Sequence[Any]], degree: int, acts: dict[str, ChainOp],
              members: dict[str, Member], rank: int) -> tuple[dict[str, PolyPlan], str]:
    """Each activation of ``acts``'s polynomial of ``degree`` (unmasked: the placement
    decides the mask), and why the fitted ones are missing, if they are ("": they are
    not, or none was wanted)."""
    fits = {name: PolyPlan(poly.square(members[name].channels_out, degree), False, 0.0)
            for name, op in acts.items() if op.activation == "square"}
    fitted = {n: op for n, op in acts.items() if n not in fits}
    if not fitted:
        return fits, ""
    if not _real_inputs(example_inputs):
        return fits, "no real example inputs to fit the polynomial activations on"
    recorder = _Recorder(gm, {op.inputs[0].name for op in fitted.values()})
    # The recording run must leave no trace (training-mode BatchNorm statistics, the RNG).
    with preserved_state(gm), torch.no_grad():
        recorder.run(*example_inputs)
    for name, op in fitted.items():
        samples = recorder.values.get(op.inputs[0].name)
        if samples is not None:
            coeffs, error = poly.fit_poly(samples, op.activation, op.slope, degree, rank)
            fits[name] = PolyPlan(coeffs, False, error)
    return fits, ""
