"""Structured layers side by side with dense ``nn.Linear``: forward, and forward +
backward, at batch 256 and n = 256 ... 8192 (n inputs and n outputs).

    python benchmarks/structured.py [--rounds 5] [--sizes 256 1024 ...] [--threads N] [--out DIR]

Candidates per size (all fp32, CPU):
- ``dense``: ``nn.Linear(n, n)``; ``dense copy``: a second one, the noise control (its
  ratio to ``dense`` is what the machine's noise alone makes of two equal layers);
- ``butterfly``: ``ButterflyLinear(n, n)``, ``2·n·log2 n`` weights;
- ``kronecker 4x``: ``KroneckerLinear`` with ``A`` 2x2 and ``B`` (n/2)x(n/2), rank 1:
  about 4x fewer weights than dense, the compression the paper reports (3.6x);
- ``kronecker r4``: balanced factors (``√n``-sized), rank 4: ``8·n`` weights.

Every candidate of a size runs in the same process, interleaved round by round (a burst
of load hits all alike); the figure is the median over rounds. A forward + backward call
drops the previous gradients (as ``zero_grad(set_to_none=True)``) and back-propagates a
fixed random upstream gradient into the input and the weights. FLOPs count multiplies and
adds apart (dense: ``2·batch·n²``).

Writes results.json, table.md and speedup.png into ``--out`` (default
benchmarks/results/structured).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Callable

import torch
import torch.nn as nn

from specfx.nn import ButterflyLinear, KroneckerLinear

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)
from timing import interleaved_medians  # noqa: E402

SIZES = (256, 512, 1024, 2048, 4096, 8192)
BATCH = 256


def candidates(n: int) -> dict[str, nn.Module]:
    """The layers compared at size ``n``, dense first."""
    return {
        "dense": nn.Linear(n, n),
        "dense copy": nn.Linear(n, n),
        "butterfly": ButterflyLinear(n, n),
        "kronecker 4x": KroneckerLinear(n, n, rank=1, factors=((2, 2), (n // 2, n // 2))),
        "kronecker r4": KroneckerLinear(n, n, rank=4),
    }


def flops(layer: nn.Module, rows: int) -> int:
    if isinstance(layer, nn.Linear):
        return rows * (2 * layer.in_features * layer.out_features + layer.out_features)
    return rows * layer.flops_per_row()


def forward_backward(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> Callable[[], None]:
    params = list(layer.parameters())

    def step() -> None:
        x.grad = None
        for p in params:
            p.grad = None
        with torch.enable_grad():  # interleaved_medians times under no_grad
            layer(x).backward(upstream)
    return step


def run_size(n: int, rounds: int) -> list[dict]:
    torch.manual_seed(0)
    layers = candidates(n)
    x = torch.randn(BATCH, n)
    x_grad = x.clone().requires_grad_()
    upstream = torch.randn(BATCH, n)
    fwd = interleaved_medians({name: (lambda m=m: m(x)) for name, m in layers.items()}, rounds)
    both = interleaved_medians({name: forward_backward(m, x_grad, upstream) for name, m in layers.items()}, rounds)
    return [{"n": n, "layer": name, "params": sum(p.numel() for p in m.parameters()), "flops": flops(m, BATCH),
             "fwd_ms": fwd[name], "fwd_bwd_ms": both[name],
             "fwd_speedup": fwd["dense"] / fwd[name], "fwd_bwd_speedup": both["dense"] / both[name]}
            for name, m in layers.items()]


def _count(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.3g}{suffix}"
    return f"{value:g}"


def markdown_table(rows: list[dict]) -> str:
    lines = ["| n | layer | params | FLOPs | fwd ms | fwd+bwd ms | fwd speed-up | fwd+bwd speed-up |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['n']} | {r['layer']} | {_count(r['params'])} | {_count(r['flops'])} | {r['fwd_ms']:.3g} | "
                     f"{r['fwd_bwd_ms']:.3g} | {r['fwd_speedup']:.2f}x | {r['fwd_bwd_speedup']:.2f}x |")
    return "\n".join(lines)


def plot(rows: list[dict], path: str, title: str) -> None:
    """Speed-up over dense against n, forward and forward + backward."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    names = [name for name in dict.fromkeys(r["layer"] for r in rows) if name != "dense"]
    colors = {"dense copy": "grey", "butterfly": "tab:blue", "kronecker 4x": "tab:orange", "kronecker r4": "tab:green"}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, key, label in zip(axes, ("fwd_speedup", "fwd_bwd_speedup"), ("forward", "forward + backward")):
        for name in names:
            points = [(r["n"], r[key]) for r in rows if r["layer"] == name]
            ax.plot(*zip(*points), marker="o", label=name, color=colors.get(name),
                    linestyle="--" if name == "dense copy" else "-")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("n (n inputs, n outputs)")
        ax.set_title(f"{label}, batch {BATCH}", fontsize=9)
    axes[0].set_ylabel("speed-up over dense nn.Linear")
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per size (default 5)")
    parser.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="values of n (even)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "structured"))
    args = parser.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    header = (f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.machine()}, "
              f"{args.rounds} rounds, batch {BATCH}, fp32; medians in ms; load average {load:.1f} at start")
    print(header)
    rows = []
    for n in args.sizes:
        print(f"  n = {n} ...", file=sys.stderr, flush=True)
        rows += run_size(n, args.rounds)
    table = markdown_table(rows)
    print(table)
    header += f", {os.getloadavg()[0]:.1f} at the end"
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"header": header, "torch": torch.__version__, "threads": torch.get_num_threads(),
                   "rounds": args.rounds, "batch": BATCH, "rows": rows}, f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(header + "\n\n" + table + "\n")
    plot(rows, os.path.join(args.out, "speedup.png"), header)
    print(f"\nwrote results.json, table.md and speedup.png into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
