"""Run the benchmark suites: eager, Inductor, fft-conv-pytorch and specfx, side by side.

    python benchmarks/run.py            # every suite, every case
    python benchmarks/run.py --quick    # a few cases per suite, fewer rounds
    python benchmarks/run.py --suite fftconv_1d --no-inductor

Prints a table of median milliseconds and ratios, checks the goals, writes
results.json and speedup.png into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from candidates import CANDIDATES, COMPILED_LOWERED_SUITES, auto_choice, make_candidate  # noqa: E402
from goals import check_goals  # noqa: E402
from suites import SUITES, Case  # noqa: E402
from timing import interleaved_medians, peak_extra_bytes  # noqa: E402


def run_case(case: Case, candidates: tuple[str, ...], rounds: int) -> dict:
    torch.manual_seed(0)
    module, x = case.build()
    names = [c for c in candidates if c != "specfx_inductor" or case.suite in COMPILED_LOWERED_SUITES]
    fns = {name: make_candidate(name, case, module, x) for name in names}
    medians = interleaved_medians(fns, rounds)
    return {"case": dataclasses.asdict(case), "ms": medians, "auto": auto_choice(case, module, x)}


def _ratio(results: dict, num: str, den: str) -> str:
    ms = results["ms"]
    return f"{ms[num] / ms[den]:.2f}x" if num in ms and den in ms else "-"


def table_rows(rows: list[dict], candidates: tuple[str, ...]) -> list[list[str]]:
    header = ["suite", "case", *[f"{c} ms" for c in candidates], "auto", "eager/specfx", "fft-conv/specfx", "eager/auto"]
    table = [header]
    for r in rows:
        ms = r["ms"]
        table.append([r["case"]["suite"], r["case"]["label"], *[f"{ms[c]:.3g}" if c in ms else "-" for c in candidates], r["auto"],
                      _ratio(r, "eager", "specfx"), _ratio(r, "fft_conv_pytorch", "specfx"),
                      _ratio(r, "eager", "specfx_auto")])
    return table


def print_table(table: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for i, row in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))


def markdown_table(table: list[list[str]]) -> str:
    lines = ["| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join(row) + " |" for row in table[1:]]
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    suites = list(dict.fromkeys(r["case"]["suite"] for r in rows))
    fig, axes = plt.subplots(1, len(suites), figsize=(4.2 * len(suites), 3.6), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        sub = [r for r in rows if r["case"]["suite"] == suite]
        xs = [r["case"]["x_value"] for r in sub]
        for num, label in (("eager", "specfx vs eager"), ("fft_conv_pytorch", "specfx vs fft-conv-pytorch")):
            if all(num in r["ms"] for r in sub):
                ax.plot(xs, [r["ms"][num] / r["ms"]["specfx"] for r in sub], marker="o", label=label)
        if all("specfx_auto" in r["ms"] for r in sub):
            ax.plot(xs, [r["ms"]["eager"] / r["ms"]["specfx_auto"] for r in sub], marker="x", ls="--",
                    label="specfx auto vs eager")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(suite, fontsize=9)
        ax.set_xlabel("kernel size" if suite not in ("wav2vec2_posconv", "convnet_layers") else
                      ("frames" if suite == "wav2vec2_posconv" else "layer"))
        ax.set_ylabel("speedup (x)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few cases per suite, 3 rounds")
    parser.add_argument("--suite", action="append", choices=sorted(SUITES), help="run only this suite (repeatable)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 7, quick 3)")
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile (slow to compile)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results"))
    args = parser.parse_args(argv)

    rounds = args.rounds or (3 if args.quick else 7)
    candidates = tuple(c for c in CANDIDATES if not (args.no_inductor and c in ("inductor", "specfx_inductor")))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds, fp32; medians in ms")
    rows = []
    for suite in args.suite or list(SUITES):
        for case in SUITES[suite](args.quick):
            print(f"  running {suite} {case.label} ...", file=sys.stderr, flush=True)
            rows.append(run_case(case, candidates, rounds))
    table = table_rows(rows, candidates)
    print_table(table)

    memory = {}
    if not args.no_memory:
        for r in rows:
            c = r["case"]
            if c["label"] == SUITES[c["suite"]](args.quick)[-1].label:
                memory[c["suite"]] = {cand: peak_extra_bytes(BENCH_DIR, c["suite"], c["label"], cand)
                                      for cand in ("eager", "fft_conv_pytorch", "specfx")}
        print("\npeak extra memory of one call (MiB), largest case per suite:")
        for suite, m in memory.items():
            eager = max(m["eager"], 1)
            print(f"  {suite}: eager {m['eager'] / 2**20:.1f}, fft-conv-pytorch {m['fft_conv_pytorch'] / 2**20:.1f}"
                  f" ({m['fft_conv_pytorch'] / eager:.1f}x), specfx {m['specfx'] / 2**20:.1f} ({m['specfx'] / eager:.1f}x)")

    print()
    failed = check_goals(rows, memory)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"torch": torch.__version__, "rounds": rounds, "rows": rows, "memory": memory}, f, indent=1)
    plot(rows, os.path.join(args.out, "speedup.png"))
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown_table(table) + "\n")
    print(f"\nwrote results.json, table.md and speedup.png into {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
