"""Training benchmark: one conv layer's forward + backward + weight update, side by side.

    python benchmarks/training.py              # every case, 5 rounds
    python benchmarks/training.py --quick      # fewer depthwise kernel sizes, 3 rounds
    python benchmarks/training.py --suite replknet_dw31 --no-inductor --no-memory

Each timed call is one training step of one conv layer: ``y = conv(x)`` with an input
that needs its gradient (as inside a network), ``y.backward(dy)`` with a fixed random
``dy``, and an SGD update of the weight and bias. The update matters: it changes the
weights, so specfx recomputes the weight spectrum every step, as it must in training (a
step without it would reuse the cached spectrum and flatter specfx).

Candidates: ``eager`` (the module), ``inductor`` (``torch.compile(module)``),
``fft_conv_pytorch`` (its ``fft_conv``, differentiated by autograd), ``specfx``
(``specfx.optimize(module, policy="always")``: the lowered conv, with the spectral ops'
frequency-domain backward) and ``specfx_compile`` (``torch.compile(module,
backend="specfx")``, the same lowering and backward inside torch.compile).

A candidate whose step takes over 10 s is timed once instead of in the rounds (marked *).

Peak memory: in a fresh process, after two warm-up steps, the peak resident size during
one step minus the resident size before it (inputs, weights and ``dy``), with gradients
freed before the step and specfx's weight-spectrum cache emptied, so that the spectrum a
step computes counts as that step's memory. Prints a table, the goals with PASS/FAIL, and
writes training.json into --out.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from typing import Callable

import torch
import torch.nn as nn

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from suites import SUITES, Case  # noqa: E402
from timing import interleaved_medians, run_peak_script  # noqa: E402

CANDIDATES = ("eager", "inductor", "fft_conv_pytorch", "specfx", "specfx_compile")
COMPILED = ("inductor", "specfx_compile")
LEARNING_RATE = 1e-4
# A candidate whose step takes longer than this is timed once instead of in the rounds
# (Inductor's training step on the dense 512x512 cases takes 30-110 s on 2 cores: its
# backward calls aten.convolution_backward on a path far slower than eager's).
SLOW_MS = 10_000.0


def training_cases(quick: bool) -> list[Case]:
    """The suites' shapes that the training goals name: the RepLKNet depthwise layer, the
    depthwise sweep, dense 2D convs with k = 15 and 31 on fft-conv-pytorch's 2D shape
    (B=2, 8→8 channels, 512x512, 'valid'), and wav2vec2's positional conv."""
    dense = SUITES["fftconv_2d"](True)[0]
    return [*SUITES["replknet_dw31"](quick), *SUITES["depthwise_sweep"](quick),
            *[Case("dense_2d", f"k{k}", k, dense.input_shape, dense.in_channels, dense.out_channels, k)
              for k in (15, 31)],
            *SUITES["wav2vec2_posconv"](quick)]


def find_case(suite: str, label: str) -> Case:
    return next(c for q in (True, False) for c in training_cases(q) if (c.suite, c.label) == (suite, label))


def build(case: Case) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The case's conv in training mode, an input that needs its gradient, and a fixed
    upstream gradient for its output."""
    torch.manual_seed(0)
    module, x = case.build()
    module.train()
    with torch.no_grad():
        dy = torch.randn_like(module(x))
    return module, x.requires_grad_(), dy


def _fft_conv_pytorch(case: Case, module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    from fft_conv_pytorch import fft_conv

    # fft-conv-pytorch 1.2.0 indexes with a list, which torch warns about on every call.
    warnings.filterwarnings("ignore", message="Using a non-tuple sequence", category=UserWarning)

    return lambda x: fft_conv(x, module.weight, module.bias, padding=case.padding, groups=case.groups)


def make_forward(name: str, case: Case, module: nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """The forward of candidate ``name``; its parameters are ``module``'s (specfx's
    rewritten module holds its own copy, updated through :func:`parameters_of`)."""
    import specfx

    if name == "eager":
        return module
    if name == "inductor":
        return torch.compile(module)
    if name == "fft_conv_pytorch":
        return _fft_conv_pytorch(case, module)
    if name == "specfx":
        return specfx.optimize(module, (x,), policy="always")
    if name == "specfx_compile":
        return torch.compile(module, backend="specfx", options={"policy": "always"})
    raise ValueError(f"unknown candidate {name!r}; expected one of {CANDIDATES}")


def parameters_of(forward: Callable, module: nn.Module) -> list[torch.Tensor]:
    return list(forward.parameters()) if isinstance(forward, torch.fx.GraphModule) else list(module.parameters())


def make_step(forward: Callable, params: list[torch.Tensor], x: torch.Tensor, dy: torch.Tensor) -> Callable[[], None]:
    """One training step: forward, backward from ``dy``, SGD update (which changes the
    weights, so nothing computed from them can be reused by the next step)."""
    def step() -> None:
        with torch.enable_grad():
            for t in (*params, x):
                t.grad = None
            forward(x).backward(dy)
        with torch.no_grad():
            for p in params:
                p.sub_(p.grad, alpha=LEARNING_RATE)
    return step


def run_case(case: Case, candidates: tuple[str, ...], rounds: int) -> dict:
    # Every case's conv runs nn.ConvNd.forward: Dynamo keys its compiled code (and its
    # recompile limit) on that code object, so each case starts afresh.
    torch._dynamo.reset()
    module, x, dy = build(case)
    steps, once = {}, {}
    for name in candidates:
        forward = make_forward(name, case, module, x)
        step = make_step(forward, parameters_of(forward, module), x, dy)
        step()  # compiles, for the compiled candidates
        start = time.perf_counter()
        step()
        elapsed = (time.perf_counter() - start) * 1e3
        if elapsed > SLOW_MS:
            once[name] = elapsed
        else:
            steps[name] = step
    ms = {**interleaved_medians(steps, rounds), **once}
    return {"case": {"suite": case.suite, "label": case.label}, "ms": ms, "timed_once": sorted(once)}


_PEAK_SCRIPT = r"""
import json, sys, torch
sys.path.insert(0, {bench_dir!r})
from training import build, find_case, make_forward, make_step, parameters_of
from specfx.ops import SPECTRUM_CACHE
case = find_case({suite!r}, {label!r})
module, x, dy = build(case)
forward = make_forward({candidate!r}, case, module, x)
params = parameters_of(forward, module)
step = make_step(forward, params, x, dy)
def status_kib(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
step()
step()
for t in (*params, x):
    t.grad = None
SPECTRUM_CACHE.clear()
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak resident size (VmHWM) to the current one
base = status_kib("VmRSS")
step()
peak = status_kib("VmHWM")
print(json.dumps({{"extra_bytes": max(peak - base, 0) * 1024}}))
"""


def peak_step_bytes(case: Case, candidate: str) -> int:
    """Peak memory one training step adds (see the module docstring), in a fresh process."""
    return run_peak_script(_PEAK_SCRIPT.format(bench_dir=BENCH_DIR, suite=case.suite, label=case.label,
                                               candidate=candidate))


def _cell(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def print_table(rows: list[dict], candidates: tuple[str, ...]) -> None:
    header = ["suite", "case", *[f"{c} ms" for c in candidates], "eager/specfx", "fft-conv/specfx",
              "eager MiB", "specfx MiB", "mem ratio"]
    table = [header]
    for r in rows:
        ms, mem = r["ms"], r.get("memory", {})
        ratio = (mem["specfx"] / max(mem["eager"], 1)) if "specfx" in mem and "eager" in mem else None
        times = [_cell(ms.get(c), ".4g") + ("*" if c in r["timed_once"] else "") for c in candidates]
        table.append([r["case"]["suite"], r["case"]["label"], *times,
                      _cell(ms["eager"] / ms["specfx"], ".2f") + "x",
                      _cell(ms["fft_conv_pytorch"] / ms["specfx"], ".2f") + "x",
                      _cell(mem.get("eager", 0) / 2**20 if mem else None, ".1f"),
                      _cell(mem.get("specfx", 0) / 2**20 if mem else None, ".1f"),
                      _cell(ratio, ".2f") + ("x" if ratio is not None else "")])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print("  ".join(cell.rjust(w) for cell, w in zip(row, widths)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    if any(r["timed_once"] for r in rows):
        print(f"* one step, not a median: the step takes over {SLOW_MS / 1e3:.0f} s")


def check_goals(rows: list[dict]) -> int:
    """Print PASS/FAIL per goal with the measured figure; return the number failed."""
    results = []
    for r in rows:
        name, ms, mem = f"{r['case']['suite']} {r['case']['label']}", r["ms"], r.get("memory", {})
        if r["case"]["suite"] == "replknet_dw31":
            speedup = ms["eager"] / ms["specfx"]
            results.append((speedup >= 6, f"{name}: fwd+bwd {speedup:.1f}x faster than eager (goal ≥ 6x)"))
        speedup = ms["fft_conv_pytorch"] / ms["specfx"]
        results.append((speedup >= 2, f"{name}: fwd+bwd {speedup:.1f}x faster than fft-conv-pytorch (goal ≥ 2x)"))
        if "specfx" in mem:
            ratio = mem["specfx"] / max(mem["eager"], 1)
            results.append((ratio <= 3, f"{name}: training-step peak memory {ratio:.2f}x eager's (goal ≤ 3x)"))
    for ok, text in results:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return sum(not ok for ok, _ in results)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="depthwise k7/13/15/31 only, 3 rounds")
    parser.add_argument("--suite", action="append", choices=sorted({c.suite for c in training_cases(False)}),
                        help="run only this suite (repeatable)")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per case (default 5, quick 3)")
    parser.add_argument("--no-inductor", action="store_true", help="skip the torch.compile candidates")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results"))
    args = parser.parse_args(argv)

    rounds = args.rounds or (3 if args.quick else 5)
    candidates = tuple(c for c in CANDIDATES if not (args.no_inductor and c in COMPILED))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds, fp32; "
          f"median ms of one training step (forward + backward + SGD update)")
    rows = []
    for case in training_cases(args.quick):
        if args.suite and case.suite not in args.suite:
            continue
        print(f"  running {case.suite} {case.label} ...", file=sys.stderr, flush=True)
        row = run_case(case, candidates, rounds)
        if not args.no_memory:
            row["memory"] = {c: peak_step_bytes(case, c) for c in ("eager", "fft_conv_pytorch", "specfx")}
        rows.append(row)
    print_table(rows, candidates)
    print()
    failed = check_goals(rows)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "training.json")
    with open(path, "w") as f:
        json.dump({"torch": torch.__version__, "rounds": rounds, "rows": rows}, f, indent=1)
    print(f"\nwrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
