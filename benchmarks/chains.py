"""Spectral chains, side by side: eager vs per-conv lowering vs exact chain fusion vs poly
activations vs what ``policy="auto"`` picks.

    python benchmarks/chains.py [--rounds 5] [--threads 1] [--quick] [--markdown /tmp/chains_table.md]

Every candidate of a case runs in the same process, interleaved round by round (a burst
of load on a shared machine hits all of them alike); the figure is the median of the
rounds. Errors are max |y − eager| / max |eager| on the benchmark input (fp32).

Candidates:
- ``eager``: the model as written (oneDNN convs);
- ``per-conv``: ``optimize(policy="always", chains=False)``: every conv lowered on its own;
- ``fused``: ``optimize(policy="always")``: every chain fused, exact spectral activations;
- ``poly``: ``optimize(policy="always", spectral_activation="poly")``: every activation a
  fitted degree-2 polynomial in the frequency domain (timed in one call instead of the
  rounds where its cost-model estimate exceeds ``--poly-limit-ms``, default 1 s: poly is
  O(N²) per channel);
- ``auto``: ``optimize(policy="auto", spectral_activation="poly")``: the cost model decides
  per conv and per chain, and offers poly only where it is estimated cheaper.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

import specfx
from specfx.verify import scaled_error

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_medians  # noqa: E402


# --- models --------------------------------------------------------------------------------

class ConvReluStack(nn.Module):
    """conv -> ReLU -> conv -> ReLU -> conv (dense or depthwise, circular or zero-padded)."""

    def __init__(self, channels: int, k: int, depthwise: bool, mode: str, layers: int = 3):
        super().__init__()
        groups = channels if depthwise else 1
        self.convs = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=k // 2, groups=groups,
                                             padding_mode=mode) for _ in range(layers))

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)
            if i < len(self.convs) - 1:
                x = F.relu(x)
        return x


class FNOStack(nn.Module):
    """FNO-style: per layer a global circular conv (kernel ≈ the grid) plus a pointwise
    bypass, then GELU; a pointwise lift and projection."""

    def __init__(self, channels: int, grid: int, layers: int = 4):
        super().__init__()
        k = grid - 1 if grid % 2 == 0 else grid
        self.lift = nn.Conv2d(3, channels, 1)
        self.spectral = nn.ModuleList(nn.Conv2d(channels, channels, k, padding=k // 2, padding_mode="circular")
                                      for _ in range(layers))
        self.bypass = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(layers))
        self.project = nn.Conv2d(channels, 1, 1)

    def forward(self, x):
        x = self.lift(x)
        for i, (spectral, bypass) in enumerate(zip(self.spectral, self.bypass)):
            x = spectral(x) + bypass(x)
            if i < len(self.spectral) - 1:
                x = F.gelu(x)
        return self.project(x)


class CausalLongConv(nn.Module):
    """1D causal long convs (padding k-1, then the chomp), GELU between them."""

    def __init__(self, channels: int, k: int, layers: int = 3, act: bool = True):
        super().__init__()
        self.chomp = k - 1
        self.convs = nn.ModuleList(nn.Conv1d(channels, channels, k, padding=k - 1, groups=channels)
                                   for _ in range(layers))
        self.act = act

    def forward(self, x):
        for i, conv in enumerate(self.convs):
            x = conv(x)[..., :-self.chomp]
            if self.act and i < len(self.convs) - 1:
                x = F.gelu(x)
        return x


@dataclasses.dataclass
class Case:
    label: str
    build: Callable[[], nn.Module]
    shape: tuple[int, ...]


def cases(quick: bool) -> list[Case]:
    s = 32 if quick else 64
    out = [
        *(Case(f"{kind} k={k} {mode}, {c}ch {s}x{s}", lambda c=c, k=k, kind=kind, mode=mode:
               ConvReluStack(c, k, kind == "depthwise", mode), (2, c, s, s))
          for kind, c in (("dense", 16), ("depthwise", 64)) for k in (15, 31) for mode in ("zeros", "circular")),
        Case("FNO 4 layers, 32ch 32x32", lambda: FNOStack(32, 32), (2, 3, 32, 32)),
        Case("FNO 4 layers, 16ch 8x8 (tiny grid)", lambda: FNOStack(16, 8), (2, 3, 8, 8)),
        Case("causal 1D depthwise k=255 GELU, 32ch L=4096", lambda: CausalLongConv(32, 255), (2, 32, 4096)),
        Case("causal 1D depthwise k=255 linear, 32ch L=4096", lambda: CausalLongConv(32, 255, act=False),
             (2, 32, 4096)),
    ]
    if quick:
        out = [c for c in out if "FNO 4 layers, 32ch" not in c.label]
    return out


@dataclasses.dataclass
class Row:
    label: str
    ms: dict[str, Optional[float]]
    errors: dict[str, float]
    transforms: dict[str, str]
    notes: list[str]


def _transforms(gm) -> str:
    t = gm.specfx_report.transforms
    return f"{t['forward']}+{t['inverse']}"


def _estimate_poly_ms(report) -> Optional[float]:
    estimates = [c.cost.poly_ms for c in report.chains if c.cost is not None and c.cost.poly_ms is not None]
    return sum(estimates) if estimates else None


def run_case(case: Case, rounds: int, poly_limit_ms: float) -> Row:
    torch.manual_seed(0)
    model = case.build().eval()
    x = torch.randn(case.shape)
    with torch.no_grad():
        expected = model(x)
    notes: list[str] = []
    built = {
        "per-conv": specfx.optimize(model, (x,), policy="always", chains=False),
        "fused": specfx.optimize(model, (x,), policy="always"),
    }
    poly_report = specfx.explain(model, (x,), policy="always", spectral_activation="poly")
    poly_estimate = _estimate_poly_ms(poly_report)
    built["poly"] = specfx.optimize(model, (x,), policy="always", spectral_activation="poly")
    built["auto"] = specfx.optimize(model, (x,), spectral_activation="poly")
    slow_poly = poly_estimate is not None and poly_estimate > poly_limit_ms
    candidates = {"eager": lambda: model(x)}
    candidates.update({name: (lambda gm=gm: gm(x)) for name, gm in built.items()
                       if not (slow_poly and name == "poly")})
    ms = interleaved_medians(candidates, rounds)
    if slow_poly:
        ms["poly"] = interleaved_medians({"poly": lambda: built["poly"](x)}, rounds=1, warmup=0)["poly"]
        notes.append(f"poly timed once (estimated {poly_estimate:.0f} ms)")
    with torch.no_grad():
        errors = {name: scaled_error(gm(x), expected) for name, gm in built.items()}
    transforms = {name: _transforms(gm) for name, gm in built.items()}
    auto = built["auto"].specfx_report
    fused_chains = [c for c in auto.chains if c.fused]
    modes = sorted({a.mode for c in fused_chains for a in c.activations if a.activation != "identity (mask)"})
    notes.append(f"auto: {len(auto.lowered)}/{len(auto.decisions)} convs lowered, "
                 f"{len(fused_chains)}/{len(auto.chains)} chains fused"
                 + (f" ({', '.join(modes)} activations)" if modes else ""))
    return Row(case.label, {k: ms.get(k) for k in ("eager", "per-conv", "fused", "poly", "auto")}, errors,
               transforms, notes)


# --- output --------------------------------------------------------------------------------

def _fmt(v: Optional[float]) -> str:
    return "—" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "—" if a is None or b is None else f"{b / a:.2f}x"


def markdown(rows: list[Row]) -> str:
    head = ("| case | eager ms | per-conv ms | fused ms | poly ms | auto ms | fused vs per-conv | "
            "poly vs per-conv | transforms fwd+inv (per-conv / fused / poly) | error fused | error poly | notes |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        m = r.ms
        lines.append(
            f"| {r.label} | {_fmt(m['eager'])} | {_fmt(m['per-conv'])} | {_fmt(m['fused'])} | {_fmt(m['poly'])} | "
            f"{_fmt(m['auto'])} | {_ratio(m['fused'], m['per-conv'])} | {_ratio(m['poly'], m['per-conv'])} | "
            f"{r.transforms['per-conv']} / {r.transforms['fused']} / {r.transforms.get('poly', '—')} | "
            f"{r.errors['fused']:.1e} | {('%.1e' % r.errors['poly']) if 'poly' in r.errors else '—'} | "
            f"{'; '.join(r.notes)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="smaller maps (32x32), for a smoke run")
    parser.add_argument("--poly-limit-ms", type=float, default=1000.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (1 gives steadier figures on a shared machine)")
    parser.add_argument("--markdown", help="also write the table (with the command and machine) to this file")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for case in cases(args.quick):
        row = run_case(case, args.rounds, args.poly_limit_ms)
        rows.append(row)
        print(f"{row.label}: " + ", ".join(f"{k} {_fmt(v)} ms" for k, v in row.ms.items() if v is not None)
              + " | errors " + ", ".join(f"{k} {v:.1e}" for k, v in row.errors.items())
              + f" | transforms {row.transforms} | {'; '.join(row.notes)}", flush=True)
    table = markdown(rows)
    print()
    print(table)
    if args.markdown:
        command = "python benchmarks/chains.py " + " ".join(sys.argv[1:] if argv is None else argv)
        machine = (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads, fp32, medians of {args.rounds} interleaved rounds")
        with open(args.markdown, "w") as f:
            f.write(f"<!-- generated by: {command} -->\n`{command}` on {machine}\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
