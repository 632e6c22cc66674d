"""``specfx.spectrum``: every linear layer's operator norm and the network's Lipschitz bound.

The report lists, for each conv and linear layer of the captured graph, its certified
interval, how its upper bound was obtained and how long it took, and the Lipschitz upper
bound of the whole network composed through the graph (:mod:`.network`) — or why that
bound is unknown. :func:`empirical_lipschitz` searches for the largest ratio
``‖f(x) − f(y)‖ / ‖x − y‖`` by gradient ascent: a lower bound the certified one must exceed.
"""

from __future__ import annotations

import dataclasses
import html
import pathlib
import time
from typing import Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

from ..html_report import CSS
from .bounds import F64_MARGIN, NormBounds, norm_bounds
from .graph import ExampleInputs, LayerSite, as_inputs, capture_graph, find_layers
from .layer import ConvOperator
from .network import Composer, Unknown, Value


@dataclasses.dataclass
class LayerRecord:
    """One layer of the report: its interval, or the reason it has none."""

    name: str
    kind: str
    description: str
    bounds: Optional[NormBounds] = None
    problem: Optional[str] = None
    op: Optional[ConvOperator] = dataclasses.field(default=None, repr=False)
    weight: Optional[torch.Tensor] = dataclasses.field(default=None, repr=False)


@dataclasses.dataclass
class SpectrumReport:
    """What :func:`spectrum` found. ``lipschitz`` is the network's certified Lipschitz
    upper bound (ℓ2, inputs to outputs), ``None`` when ``unknown`` says which node has no
    rule."""

    layers: list[LayerRecord]
    lipschitz: Optional[float]
    unknown: Optional[Unknown]
    frontend: str
    notes: list[str] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def layer(self, name: str) -> LayerRecord:
        """The record of the layer named ``name``."""
        for record in self.layers:
            if record.name == name:
                return record
        raise KeyError(f"no layer named {name!r}; layers: {', '.join(r.name for r in self.layers)}")

    def lipschitz_line(self) -> str:
        if self.lipschitz is not None:
            return f"network Lipschitz upper bound: {self.lipschitz:.6g}"
        return f"network Lipschitz upper bound: unknown ({self.unknown})"

    def __str__(self) -> str:
        lines = [f"specfx spectrum (front end: {self.frontend}, {len(self.layers)} layers, {self.seconds:.3g} s)"]
        lines += [f"  note: {note}" for note in self.notes]
        for record in self.layers:
            lines.append(f"  [{record.kind:6}] {record.name}: {record.description}")
            b = record.bounds
            if b is None:
                lines.append(f"           not analysed: {record.problem}")
            elif b.exact:
                lines.append(f"           norm {b.upper:.6g} (exact: {b.method}; {b.seconds:.3g} s)")
            else:
                lines.append(f"           norm in [{b.lower:.6g}, {b.upper:.6g}] (+{100 * b.gap:.2g}%; upper: "
                             f"{b.method}; {b.iterations} Lanczos steps; {b.seconds:.3g} s)")
        lines.append("  " + self.lipschitz_line())
        return "\n".join(lines)

    def html_section(self) -> str:
        """An ``<h2>`` section with the per-layer table, in :mod:`specfx.html_report`'s style."""
        rows = []
        for r in self.layers:
            b = r.bounds
            if b is None:
                cells = [r.name, r.kind, r.description, "", "", "", f"not analysed: {r.problem}", ""]
            else:
                gap = "exact" if b.exact else f"+{100 * b.gap:.2g}%"
                cells = [r.name, r.kind, r.description, f"{b.lower:.6g}", f"{b.upper:.6g}", gap, b.method,
                         f"{b.seconds:.3g}"]
            rows.append("<tr>" + "".join(
                f'<td class="num">{html.escape(c)}</td>' if i in (3, 4, 5, 7) else
                (f"<td><code>{html.escape(c)}</code></td>" if i == 0 else f"<td>{html.escape(c)}</td>")
                for i, c in enumerate(cells)) + "</tr>")
        head = "".join(f"<th>{html.escape(h)}</th>" for h in
                       ("layer", "kind", "description", "lower", "upper", "gap", "upper bound from", "seconds"))
        notes = "".join(f'<p class="note">{html.escape(n)}</p>' for n in self.notes)
        return (f"<h2>Operator norms</h2>\n{notes}<p class=\"meta\">{html.escape(self.lipschitz_line())} · "
                f"front end {html.escape(self.frontend)}</p>\n<table>\n<tr>{head}</tr>\n" + "\n".join(rows)
                + "\n</table>")

    def html(self, title: str = "specfx spectrum") -> str:
        """A self-contained page holding :meth:`html_section`."""
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\"/>\n"
                f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n"
                f"<h1>{html.escape(title)}</h1>\n{self.html_section()}\n</body>\n</html>\n")

    def to_html(self, path: Union[str, pathlib.Path], title: str = "specfx spectrum") -> pathlib.Path:
        path = pathlib.Path(path)
        path.write_text(self.html(title), encoding="utf-8")
        return path

    def plot(self, path: Union[str, pathlib.Path], max_layers: int = 16) -> pathlib.Path:
        """Each layer's singular values (sorted) beside its certified upper bound, as an
        image (needs matplotlib). See :func:`.plot.plot_spectra`."""
        from .plot import plot_spectra

        return plot_spectra(self, path, max_layers)


def linear_bounds(weight: torch.Tensor, name: str) -> NormBounds:
    """A linear layer's norm: its weight's largest singular value (float64)."""
    start = time.perf_counter()
    sigma = float(torch.linalg.matrix_norm(weight.detach().to(torch.float64), ord=2))
    return NormBounds(sigma * (1 - F64_MARGIN), sigma * (1 + F64_MARGIN), "SVD of the weight", True,
                      f"Linear {weight.shape[1]}→{weight.shape[0]}", 0, time.perf_counter() - start)


def layer_bounds(layer: LayerSite, method: str = "auto", steps: int = 80, seed: int = 0) -> NormBounds:
    if layer.kind == "linear":
        return linear_bounds(layer.weight, layer.name)
    return norm_bounds(layer.op, method, steps=steps, seed=seed)


def spectrum(model: nn.Module, example_inputs: ExampleInputs, *, method: str = "auto", steps: int = 80,
             seed: int = 0, frontend: str = "auto") -> SpectrumReport:
    """Every conv and linear layer of ``model`` (at the sizes ``example_inputs`` give them):
    its certified operator-norm interval (``method`` as for :func:`specfx.operator_norm`),
    and the network's Lipschitz upper bound composed through the graph. The model is read,
    never changed; BatchNorm and dropout are taken in the mode the model is in (eval mode
    gives a bound; train mode makes it unknown)."""
    start = time.perf_counter()
    notes: list[str] = []
    gm, used = capture_graph(model, example_inputs, frontend, notes)
    records, norms = [], {}
    for layer in find_layers(gm):
        record = LayerRecord(layer.name, layer.kind, layer.describe(), op=layer.op, weight=layer.weight)
        if layer.problem is not None:
            record.problem = layer.problem
            norms[layer.node] = Unknown(layer.node.name, f"{layer.name} not analysed: {layer.problem}")
        else:
            record.bounds = layer_bounds(layer, method, steps, seed)
            norms[layer.node] = record.bounds.upper
        records.append(record)
    lipschitz = _compose(gm, norms)
    if isinstance(lipschitz, Unknown):
        return SpectrumReport(records, None, lipschitz, used, notes, time.perf_counter() - start)
    value = float(lipschitz.detach()) if isinstance(lipschitz, torch.Tensor) else float(lipschitz)
    return SpectrumReport(records, value, None, used, notes, time.perf_counter() - start)


def _compose(gm: fx.GraphModule, norms: dict[fx.Node, Value]) -> Value:
    def layer_norm(node: fx.Node) -> Value:
        return norms.get(node, Unknown(node.name, "a layer specfx could not read"))

    return Composer(gm, layer_norm).run()


def empirical_lipschitz(model: nn.Module, example_inputs: ExampleInputs, steps: int = 100, restarts: int = 4,
                        seed: int = 0, lr: float = 0.05) -> float:
    """The largest ``‖f(x) − f(y)‖ / ‖x − y‖`` found by gradient ascent (Adam on ``x`` and
    ``y − x``, from seeded points around the example inputs): a lower bound on the
    network's Lipschitz constant. Gradients go to the pair only, never to the model."""
    inputs = as_inputs(example_inputs)
    variable = [i for i, t in enumerate(inputs) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    gen = torch.Generator().manual_seed(seed)
    best = 0.0

    def outputs(values: list[torch.Tensor]) -> torch.Tensor:
        call = list(inputs)
        for i, v in zip(variable, values):
            call[i] = v
        out = model(*call)
        flat = out if isinstance(out, torch.Tensor) else torch.cat([o.reshape(-1) for o in _leaves(out)])
        return flat.reshape(-1)

    for _ in range(restarts):
        scale = [max(float(inputs[i].detach().abs().mean()), 1e-3) for i in variable]
        xs = [(inputs[i].detach() + s * torch.randn(inputs[i].shape, generator=gen, dtype=inputs[i].dtype))
              .requires_grad_() for i, s in zip(variable, scale)]
        ds = [(0.1 * s * torch.randn(inputs[i].shape, generator=gen, dtype=inputs[i].dtype)).requires_grad_()
              for i, s in zip(variable, scale)]
        optimizer = torch.optim.Adam(xs + ds, lr=lr)
        for _ in range(steps):
            with torch.enable_grad():
                fx_, fy = outputs(xs), outputs([x + d for x, d in zip(xs, ds)])
                distance = torch.sqrt(sum(d.pow(2).sum() for d in ds))
                ratio = (fx_ - fy).norm() / distance
                grads = torch.autograd.grad(-torch.log(ratio), xs + ds)
            best = max(best, float(ratio.detach()))
            for p, g in zip(xs + ds, grads):
                p.grad = g
            optimizer.step()
    return best


def _leaves(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    return [leaf for item in value for leaf in _leaves(item)]
