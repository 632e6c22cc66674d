"""Is ``policy="auto"`` right on this machine, with no calibrated profile? And what does
its timing of close calls cost at optimize time?

    python benchmarks/auto_decisions.py [--rounds 7] [--markdown PATH]

Runs with no profile (``$SPECFX_PROFILE`` pointed at a file that does not exist) and an
empty timing cache (a fresh ``$SPECFX_CACHE_DIR``), as on a machine specfx has never seen.

1. Convs: the direct conv (eager), the lowered conv (``policy="always"``) and what
   ``auto`` chose, timed side by side (benchmarks/timing.py); auto's time over the faster
   of the two must be ≤ 1.15 (the goal) on every conv.
2. Chains (conv-ReLU-conv stacks): per-conv lowering and the fused chain, side by side,
   and auto's choice between them, against the same goal.
3. Optimize time: a model of 100 convs of which 10 are distinct close calls (and 90 clear
   ones): ``optimize`` with the timing budget at 0 (estimates only), with the default
   budget on an empty cache, and again on the filled cache; the extra seconds are what
   timing costs (goal: ≤ 2 s extra, 0 s on the cache hit).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time

# Before specfx is imported: no calibrated profile, an empty timing cache.
os.environ["SPECFX_PROFILE"] = os.path.join(tempfile.mkdtemp(prefix="specfx-no-profile-"), "none.json")
os.environ["SPECFX_CACHE_DIR"] = tempfile.mkdtemp(prefix="specfx-fresh-cache-")
os.environ.pop("SPECFX_MEASURE_BUDGET_S", None)

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

import specfx  # noqa: E402
from chains import ConvReluStack  # noqa: E402
from timing import interleaved_medians  # noqa: E402

GOAL = 1.15


def conv_cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    def dw(rank: int, c: int, k: int) -> nn.Module:
        return (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1](c, c, k, padding=k // 2, groups=c)

    return [
        ("depthwise 2D k11, (2,64,64,64)", dw(2, 64, 11), (2, 64, 64, 64)),
        ("depthwise 2D k13, (2,64,64,64)", dw(2, 64, 13), (2, 64, 64, 64)),
        ("depthwise 3D k7 (MedNeXt), (1,16,32,32,32)", dw(3, 16, 7), (1, 16, 32, 32, 32)),
        ("depthwise 2D k7, (2,64,64,64)", dw(2, 64, 7), (2, 64, 64, 64)),
        ("depthwise 2D k17, (2,64,64,64)", dw(2, 64, 17), (2, 64, 64, 64)),
        ("depthwise 2D k31 (RepLKNet), (2,64,64,64)", dw(2, 64, 31), (2, 64, 64, 64)),
        ("dense 2D k3 64->64, (2,64,32,32)", nn.Conv2d(64, 64, 3, padding=1), (2, 64, 32, 32)),
        ("dense 2D k7 16->16, (2,16,64,64)", nn.Conv2d(16, 16, 7, padding=3), (2, 16, 64, 64)),
        ("dense 2D k11 16->16, (2,16,64,64)", nn.Conv2d(16, 16, 11, padding=5), (2, 16, 64, 64)),
        ("dense 2D k15 16->16, (2,16,32,32)", nn.Conv2d(16, 16, 15, padding=7), (2, 16, 32, 32)),
        ("dense 3D k3 16->16, (1,16,32,32,32)", nn.Conv3d(16, 16, 3, padding=1), (1, 16, 32, 32, 32)),
        ("dense 3D k5 16->16, (1,16,32,32,32)", nn.Conv3d(16, 16, 5, padding=2), (1, 16, 32, 32, 32)),
        ("depthwise 1D k31 (Conformer), (1,768,1500)", dw(1, 768, 31), (1, 768, 1500)),
        ("1D k128 g16 (wav2vec2 pos. conv), (1,768,500)",
         nn.Conv1d(768, 768, 128, padding=64, groups=16), (1, 768, 500)),
    ]


def chain_cases() -> list[tuple[str, nn.Module, tuple[int, ...]]]:
    return [
        ("conv-ReLU-conv-ReLU-conv k15 16ch, (2,16,32,32)", ConvReluStack(16, 15, False, "zeros"), (2, 16, 32, 32)),
        ("conv-ReLU-conv-ReLU-conv k15 16ch, (2,16,64,64)", ConvReluStack(16, 15, False, "zeros"), (2, 16, 64, 64)),
        ("conv-ReLU-conv-ReLU-conv k15 64ch, (2,64,64,64)", ConvReluStack(64, 15, False, "zeros"), (2, 64, 64, 64)),
        ("depthwise k15 stack 64ch, (2,64,64,64)", ConvReluStack(64, 15, True, "zeros"), (2, 64, 64, 64)),
        ("depthwise k31 stack 64ch, (2,64,64,64)", ConvReluStack(64, 31, True, "zeros"), (2, 64, 64, 64)),
    ]


def _fmt(ms: float) -> str:
    return f"{ms:.3g}"


def run_convs(rounds: int) -> list[list[str]]:
    rows = []
    for label, module, shape in conv_cases():
        torch.manual_seed(0)
        module = module.eval()
        x = torch.randn(shape)
        lowered = specfx.optimize(module, (x,), policy="always")
        start = time.perf_counter()
        auto = specfx.optimize(module, (x,))
        optimize_s = time.perf_counter() - start
        decision = auto.specfx_report.decisions[0]
        t = interleaved_medians({"direct": lambda: module(x), "lowered": lambda: lowered(x)}, rounds)
        chose = "FFT" if decision.lowered else "direct"
        ratio = t["lowered" if decision.lowered else "direct"] / min(t.values())
        how = "timed" if decision.cost.measured_direct_ms is not None else "estimate"
        rows.append([label, _fmt(t["direct"]), _fmt(t["lowered"]), f"{chose} ({how})",
                     f"{decision.cost.speedup:.2g}x", f"{ratio:.2f}", f"{optimize_s:.2f}",
                     "PASS" if ratio <= GOAL else "FAIL"])
    return rows


def run_chains(rounds: int) -> list[list[str]]:
    rows = []
    for label, module, shape in chain_cases():
        torch.manual_seed(0)
        module = module.eval()
        x = torch.randn(shape)
        per_conv = specfx.optimize(module, (x,), policy="always", chains=False)
        fused = specfx.optimize(module, (x,), policy="always")
        auto = specfx.optimize(module, (x,))
        chains = auto.specfx_report.chains
        t = interleaved_medians({"per-conv": lambda: per_conv(x), "fused": lambda: fused(x)}, rounds)
        if not chains:
            rows.append([label, _fmt(t["per-conv"]), _fmt(t["fused"]), "no chain (convs kept direct)", "-", "-", "-"])
            continue
        chain = chains[0]
        ratio = t["fused" if chain.fused else "per-conv"] / min(t.values())
        how = "timed" if "measured" in chain.reason else "estimate"
        estimated = chain.cost.per_conv_ms / chain.cost.fused_ms if chain.cost else float("nan")
        rows.append([label, _fmt(t["per-conv"]), _fmt(t["fused"]), f"{'fused' if chain.fused else 'per-conv'} ({how})",
                     f"{estimated:.2f}x", f"{ratio:.2f}", "PASS" if ratio <= GOAL else "FAIL"])
    return rows


class HundredConvs(nn.Module):
    """90 clear calls (dense 3x3, one signature, kept direct by the estimate) and 10
    distinct close calls (depthwise 11x11 convs of 10 channel counts)."""

    def __init__(self):
        super().__init__()
        self.clear = nn.ModuleList(nn.Conv2d(16, 16, 3, padding=1) for _ in range(90))
        self.close = nn.ModuleList(nn.Conv2d(c, c, 11, padding=5, groups=c) for c in range(16, 26))

    def forward(self, x):
        y = x
        for conv in self.clear:
            y = conv(y)
        outs = [y]
        for conv in self.close:
            outs.append(conv(torch.cat([x] * 2, 1)[:, : conv.in_channels]))
        return outs


def run_budget() -> list[list[str]]:
    torch.manual_seed(0)
    model, x = HundredConvs().eval(), torch.randn(2, 16, 64, 64)
    rows = []
    for label, budget in (("estimates only (budget 0)", 0.0), ("empty timing cache", None),
                          ("filled timing cache", None)):
        start = time.perf_counter()
        fast = specfx.optimize(model, (x,), measure_budget_s=budget)
        seconds = time.perf_counter() - start
        notes = "; ".join(n for n in fast.specfx_report.timing_notes if not n.startswith("timing cache:"))
        rows.append([label, f"{seconds:.2f}", notes[:110] or "-"])
    base = float(rows[0][1])
    for row in rows:
        row.insert(2, f"{float(row[1]) - base:+.2f}")
    return rows


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--markdown", help="also write the tables to this file")
    args = parser.parse_args(argv)
    machine = (f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads; no profile, empty timing cache")
    convs = _table(["conv", "direct ms", "lowered ms", "auto chose", "estimate", "auto / faster", "optimize s",
                    f"≤ {GOAL}"], run_convs(args.rounds))
    chains = _table(["chain", "per-conv ms", "fused ms", "auto chose", "estimate", "auto / faster", f"≤ {GOAL}"],
                    run_chains(args.rounds))
    budget = _table(["100 convs, 10 close calls", "optimize s", "extra s", "timing"], run_budget())
    text = (f"`python benchmarks/auto_decisions.py --rounds {args.rounds}` on {machine}\n\n"
            f"{convs}\n\n{chains}\n\n{budget}\n")
    print(text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text)
    return 1 if "FAIL" in convs + chains else 0


if __name__ == "__main__":
    sys.exit(main())
