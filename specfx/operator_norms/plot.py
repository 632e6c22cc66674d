"""Singular-value distributions of a report's layers, drawn with matplotlib (optional)."""

from __future__ import annotations

import math
import pathlib
from typing import TYPE_CHECKING, Union

import torch

from .asymptotic import asymptotic_singular_values
from .circular import circular_singular_values
from .layer import periodic

if TYPE_CHECKING:
    from .report import LayerRecord, SpectrumReport

# Layers with a matrix up to this many rows and columns are drawn from their exact SVD.
EXACT_PLOT_DIM = 2048


def layer_values(record: "LayerRecord") -> tuple[torch.Tensor, str]:
    """A layer's singular values for drawing, and how they were obtained: exact for
    periodic and small layers and for linear ones, Yi's approximation otherwise."""
    if record.kind == "linear":
        return torch.linalg.svdvals(record.weight.detach().to(torch.float64)), "exact"
    op = record.op
    if op.periodic:
        return circular_singular_values(periodic(op)), "exact (periodic)"
    if max(op.in_dim, op.out_dim) <= EXACT_PLOT_DIM:
        return torch.linalg.svdvals(op.matrix(None)), "exact"
    return asymptotic_singular_values(op), "Yi's approximation"


def plot_spectra(report: "SpectrumReport", path: Union[str, pathlib.Path], max_layers: int = 16) -> pathlib.Path:
    """One panel per analysed layer (the first ``max_layers``): its singular values sorted
    against their rank (as a fraction), with the certified upper bound as a dashed line."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("SpectrumReport.plot needs matplotlib (pip install matplotlib)") from err
    records = [r for r in report.layers if r.bounds is not None][:max_layers]
    if not records:
        raise ValueError("the report has no analysed layer to plot")
    cols = min(4, len(records))
    rows = math.ceil(len(records) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.6 * cols, 2.8 * rows), squeeze=False)
    for ax, record in zip(axes.flat, records):
        values, how = layer_values(record)
        fraction = (torch.arange(values.numel(), dtype=torch.float64) + 0.5) / values.numel()
        ax.plot(fraction.numpy(), values.numpy(), lw=1.2, label=f"σ ({how})")
        ax.axhline(record.bounds.upper, ls="--", color="tab:red", lw=1, label="certified upper bound")
        ax.set_title(f"{record.name}\n{record.description}", fontsize=7)
        ax.set_xlabel("rank / count", fontsize=7)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(records):]:
        ax.axis("off")
    line = report.lipschitz_line()
    fig.suptitle(line if len(report.layers) <= max_layers else
                 f"{line} (first {max_layers} of {len(report.layers)} layers)", fontsize=9)
    fig.tight_layout()
    path = pathlib.Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
