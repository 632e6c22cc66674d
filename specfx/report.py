"""What an optimization did: one decision per convolution, with the figures behind it."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .cost_model import ConvCost


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
    # The graph code before the first pass, so the first pass's effect can be diffed.
    captured_code: Optional[str] = None
    verified_error: Optional[float] = None
    verified_tolerance: Optional[float] = None

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
        lines = [f"specfx report (front end: {self.frontend}, policy: {self.policy!r})",
                 f"  {len(self.lowered)} of {len(self.decisions)} convolutions {verb}"]
        lines += [f"  note: {note}" for note in self.capture_notes]
        for d in self.decisions:
            mark = "FFT   " if d.lowered else "direct"
            lines.append(f"  [{mark}] {d.name}: {d.description}")
            lines.append(f"           {d.reason}")
            if d.cost is not None:
                lines.append(f"           {d.cost.summary()}")
        if self.verified_error is not None:
            lines.append(f"  verified on the example inputs: max error {self.verified_error:.2e} "
                         f"of the output scale (tolerance {self.verified_tolerance:.0e})")
        return "\n".join(lines)
