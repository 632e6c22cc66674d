"""What an optimization did: one decision per convolution, with the figures behind it."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .cost_model import ChainCost, ConvCost


@dataclasses.dataclass
class ConvDecision:
    """The outcome for one convolution site."""

    name: str
    node: str
    description: str
    lowered: bool
    reason: str
    cost: Optional[ConvCost] = None


@dataclasses.dataclass
class SpectralActivationRecord:
    """One activation (or mask) computed in the frequency domain inside a fused chain.

    ``mode`` is ``"exact"`` (inverse transform, mask, activation, forward transform in one
    op) or ``"poly"`` (the Fourier-domain polynomial, no transform). ``error`` is the
    activation's own error on the example inputs, max |p(u) − act(u)| over max |act(u)|
    (0.0 where the polynomial is the activation itself; ``None`` for exact ones, which
    are exact to rounding).
    """

    node: str
    activation: str
    mode: str
    error: Optional[float] = None
    coefficients: Optional[list[list[float]]] = None
    mask_input: bool = False

    def summary(self) -> str:
        text = f"{self.node}: {self.activation}, {self.mode}"
        if self.mode == "poly":
            text += f" (degree {len(self.coefficients[0]) - 1 if self.coefficients else '?'}"
            text += ", input masked in the frequency domain)" if self.mask_input else ")"
            if self.error is not None:
                text += f", activation error {self.error:.3g} on the example inputs"
        return text


@dataclasses.dataclass
class ChainDecision:
    """The outcome for one chain of convolutions (passes/find_chains.py).

    ``convs`` are the report names of the lowered convs in the chain, ``ops`` the ops
    between them and the domain each was placed in; ``eliminated`` counts the
    inverse/forward transform pairs removed outright; ``transforms`` the transforms the
    chain runs fused and ``transforms_per_conv`` with each conv lowered on its own
    (a spectral activation counts as one of each: it runs a round trip inside).
    """

    name: str
    convs: list[str]
    ops: list[str]
    fused: bool
    reason: str
    padding: str = "zeros"
    grid: Optional[tuple[int, ...]] = None
    eliminated: int = 0
    activations: list[SpectralActivationRecord] = dataclasses.field(default_factory=list)
    cost: Optional[ChainCost] = None
    transforms: Optional[dict[str, int]] = None
    transforms_per_conv: Optional[dict[str, int]] = None


@dataclasses.dataclass
class PassRecord:
    """One pass of the pipeline: whether it changed the graph, and the code after it."""

    name: str
    modified: bool
    code: str


@dataclasses.dataclass
class Report:
    """The decisions of one ``specfx.optimize`` (or ``explain``) run.

    ``applied`` is False for :func:`specfx.explain`, where ``lowered`` lists the convs
    that would be lowered.
    """

    frontend: str
    policy: str
    applied: bool = True
    decisions: list[ConvDecision] = dataclasses.field(default_factory=list)
    passes: list[PassRecord] = dataclasses.field(default_factory=list)
    capture_notes: list[str] = dataclasses.field(default_factory=list)
    # The close calls timed, found in the timing cache, or left to the estimate
    # (specfx.close_calls), and where the timings are kept.
    timing_notes: list[str] = dataclasses.field(default_factory=list)
    # The graph code before the first pass, so the first pass's effect can be diffed.
    captured_code: Optional[str] = None
    verified_error: Optional[float] = None
    verified_tolerance: Optional[float] = None
    # How verification went where it was not a plain comparison (judged against a float64
    # run of the original, or skipped).
    verification_notes: list[str] = dataclasses.field(default_factory=list)
    # Spectral chains: one entry per chain found; the transforms (forward, inverse) the
    # optimized graph runs, and what plain per-conv lowering would run; the output error
    # measured on the example inputs when poly activations made the result approximate.
    chains: list[ChainDecision] = dataclasses.field(default_factory=list)
    transforms: Optional[dict[str, int]] = None
    transforms_per_conv: Optional[dict[str, int]] = None
    output_error: Optional[float] = None
    # The implementation each spectral op of the optimized graph runs on the example
    # inputs' device (specfx.ops.implementations).
    implementations: dict[str, str] = dataclasses.field(default_factory=dict)
    # specfx.structure: one entry per dense linear layer considered, replaced or kept.
    structured: list[StructuredLayerDecision] = dataclasses.field(default_factory=list)

    @property
    def lowered(self) -> list[str]:
        """Names of the convolutions rewritten into spectral ops."""
        return [d.name for d in self.decisions if d.lowered]

    @property
    def kept(self) -> dict[str, str]:
        """Every convolution left as it was, with the reason."""
        return {d.name: d.reason for d in self.decisions if not d.lowered}

    def __str__(self) -> str:
        verb = "lowered" if self.applied else "would lower"
        lines = [f"specfx report (front end: {self.frontend}, policy: {self.policy!r})"]
        if self.decisions or not self.structured:
            lines.append(f"  {len(self.lowered)} of {len(self.decisions)} convolutions {verb}")
        if self.structured:
            replaced = sum(layer.replaced for layer in self.structured)
            lines.append(f"  {replaced} of {len(self.structured)} linear layers "
                         f"{'replaced' if self.applied else 'would be replaced'} by structured ones")
        lines += [f"  note: {note}" for note in self.capture_notes]
        lines += [f"  timing: {note}" for note in self.timing_notes]
        for d in self.decisions:
            mark = "FFT   " if d.lowered else "direct"
            lines.append(f"  [{mark}] {d.name}: {d.description}")
            lines.append(f"           {d.reason}")
            if d.cost is not None:
                lines.append(f"           {d.cost.summary()}")
        for c in self.chains:
            mark = "fused " if c.fused else "kept  "
            grid = f" at {'x'.join(map(str, c.grid))}" if c.grid else ""
            lines.append(f"  [chain {mark}] {c.name}: {' -> '.join(c.convs)} ({c.padding} padding{grid})")
            lines.append(f"           {c.reason}")
            if c.ops:
                lines.append(f"           between the convs: {', '.join(c.ops)}")
            if c.fused:
                lines.append(f"           transform pairs eliminated: {c.eliminated}; transforms "
                             f"{_pair(c.transforms)} (per-conv lowering {_pair(c.transforms_per_conv)})")
            for a in c.activations:
                lines.append(f"           spectral activation {a.summary()}")
            if c.cost is not None:
                lines.append(f"           {c.cost.summary()}")
        for layer in self.structured:
            lines += layer.lines()
        if self.transforms is not None:
            lines.append(f"  transforms in the graph: {_pair(self.transforms)} "
                         f"(per-conv lowering: {_pair(self.transforms_per_conv)})")
        if self.output_error is not None:
            lines.append(f"  poly activations are approximate: output error {self.output_error:.3g} "
                         f"of the output scale on the example inputs (not verified against a tolerance)")
        if self.verified_error is not None:
            lines.append(f"  verified on the example inputs: max error {self.verified_error:.2e} "
                         f"of the output scale (tolerance {self.verified_tolerance:.0e})")
        lines += [f"  verification: {note}" for note in self.verification_notes]
        if self.implementations:
            lines.append("  implementations: " + ", ".join(f"{op} {how}" for op, how in self.implementations.items()))
        return "\n".join(lines)


def _pair(counts: Optional[dict[str, int]]) -> str:
    if not counts:
        return "forward 0, inverse 0"
    return f"forward {counts.get('forward', 0)}, inverse {counts.get('inverse', 0)}"


def approximate(report: Report) -> bool:
    """Whether the report's fused chains hold poly activations that are not exact."""
    return any(a.mode == "poly" and (a.error is None or a.error > 0)
               for c in report.chains if c.fused for a in c.activations)


@dataclasses.dataclass
class StructuredLayerDecision:
    """The outcome for one dense linear layer under :func:`specfx.structure`.

    ``factors`` describes the structured layer tried (the one installed where
    ``replaced``; for a kept layer, the closest one tried, if any). ``params_*`` count
    weights and bias; ``flops_*`` are the layer's FLOPs on the example inputs. Errors are
    relative Frobenius norms: ``weight_error`` ``‖W − Ŵ‖ / ‖W‖``, ``output_error`` that of
    the layer's outputs on the inputs it received when the model ran on the examples.
    """

    layer: str
    kind: str
    replaced: bool
    reason: str
    in_features: int
    out_features: int
    factors: Optional[str] = None
    params_before: int = 0
    params_after: Optional[int] = None
    flops_before: Optional[int] = None
    flops_after: Optional[int] = None
    weight_error: Optional[float] = None
    output_error: Optional[float] = None

    def lines(self) -> list[str]:
        """The report's lines for this layer."""
        mark = "replaced" if self.replaced else "kept    "
        head = f"  [{self.kind} {mark}] {self.layer}: Linear {self.in_features}→{self.out_features}"
        lines = [head + (f" as {self.factors}" if self.factors else ""), f"           {self.reason}"]
        figures = []
        if self.params_after is not None:
            ratio = self.params_before / max(self.params_after, 1)
            figures.append(f"params {self.params_before:,} → {self.params_after:,} "
                           f"({f'{ratio:.1f}x fewer' if ratio > 1 else 'no fewer'})")
        if self.flops_before is not None and self.flops_after is not None:
            figures.append(f"FLOPs {self._count(self.flops_before)} → {self._count(self.flops_after)} "
                           f"on the example inputs")
        if self.weight_error is not None:
            figures.append(f"weight error {self.weight_error:.3g}")
        if self.output_error is not None:
            figures.append(f"output error {self.output_error:.3g}")
        if figures:
            lines.append("           " + "; ".join(figures))
        return lines

    @staticmethod
    def _count(value: int) -> str:
        for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
            if value >= scale:
                return f"{value / scale:.3g}{suffix}"
        return str(value)
