"""GPU benchmark: cuDNN, Inductor, fft-conv-pytorch and specfx (torch.fft path, and Triton
kernels) side by side on CUDA.

    python benchmarks/gpu.py [--rounds 20] [--quick] [--out benchmarks/results/gpu.json]

Needs a CUDA device; without one it says so and exits 0.

Candidates (columns):
- ``cudnn``: the eager model, with ``torch.backends.cudnn.benchmark = True``;
- ``inductor``: ``torch.compile`` of the original model;
- ``fft_conv_pytorch``: fft-conv-pytorch's ``fft_conv`` (single convs; the column is
  left out when the package is not installed);
- ``specfx_fft``: ``specfx.optimize(policy="always")`` with the Triton kernels switched
  off (``specfx.ops.triton.triton_kernels(False)``): cuFFT transforms and the torch
  contraction and activation;
- ``specfx_triton``: the same lowered model with the Triton kernels.

Every call of a case is timed with CUDA events, in interleaved rounds after warm-up (a
clock or thermal change hits all candidates alike); the figure is the median. Peak memory
is ``torch.cuda.max_memory_allocated`` during one call over what was allocated before it.
Direct convs estimated above ``--max-direct-gflop`` (1D long convs with kernels as long as
the signal) are not run; specfx lowers those models from a batch-1 example, so that
``optimize``'s own run of the original stays short. The weight-spectrum cache's content
check (a device sync per call) is off: the weights never change here.

Goals: ≥ 3x cuDNN on the RepLKNet depthwise k=31 shape; ≥ 2x the torch.fft path on
conv → ReLU → conv chains (small grids: the fused activation kernel); the Triton
``spectral_mix`` moving data at ≥ 50% of the memory bandwidth a large device-to-device
copy reaches, on the RepLKNet shape.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
from typing import Callable, Optional, Union

import torch
import torch.fx as fx
import torch.nn as nn

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, BENCH_DIR)

from chains import CausalLongConv, ConvReluStack  # noqa: E402
from run import print_table  # noqa: E402

from specfx.verify import scaled_error  # noqa: E402

CANDIDATES = ("cudnn", "inductor", "fft_conv_pytorch", "specfx_fft", "specfx_triton")
DIRECT = ("cudnn", "inductor")


# --- cases -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class GpuCase:
    """One model: a single conv (``layers == 1``), a causal 1D long conv, or a conv → ReLU
    chain of ``layers`` convs. ``shape`` is the input's; channels stay the same."""

    suite: str
    label: str
    shape: tuple[int, ...]
    kernel_size: int
    groups: int
    padding: Union[str, int] = "same"
    layers: int = 1
    causal: bool = False

    def build(self, device: Union[str, torch.device]) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        channels, k = self.shape[1], self.kernel_size
        if self.causal:
            module: nn.Module = CausalLongConv(channels, k, layers=1)
        elif self.layers > 1:
            module = ConvReluStack(channels, k, self.groups == channels, "zeros", self.layers)
        else:
            conv = nn.Conv1d if len(self.shape) == 3 else nn.Conv2d
            module = conv(channels, channels, k, padding=self.padding, groups=self.groups)
        return module.to(device).eval(), torch.randn(self.shape, device=device)

    def direct_gflop(self) -> float:
        """FLOPs of the direct convs (each output sees ``k^rank · C/g`` inputs)."""
        rank = len(self.shape) - 2
        per_output = 2 * self.kernel_size ** rank * self.shape[1] // self.groups
        return self.layers * per_output * math.prod(self.shape) / 1e9

    def conv(self, module: nn.Module) -> Optional[nn.Module]:
        """The single conv fft-conv-pytorch can run in place of the model (None for chains)."""
        if self.layers > 1:
            return None
        return module.convs[0] if self.causal else module


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ",".join(map(str, shape)) + ")"


def cases(quick: bool) -> list[GpuCase]:
    out = [GpuCase("replknet_dw31", "RepLKNet dw k=31, (64,384,32,32)", (64, 384, 32, 32), 31, 384)]
    out += [GpuCase("depthwise2d", f"dw k={k}, {_shape(shape)}", shape, k, shape[1])
            for shape, k in (((4, 384, 14, 14), 7), ((4, 384, 14, 14), 14), ((4, 256, 32, 32), 13),
                             ((8, 128, 64, 64), 7))]
    out += [GpuCase("dense2d", f"dense 64->64 k={k}, (8,64,64,64)", (8, 64, 64, 64), k, 1)
            for k in ((9, 31) if quick else (9, 15, 21, 31))]
    out += [GpuCase("long1d", f"causal dw 1D k=L, (64,768,{n})", (64, 768, n), n, 768, padding=n - 1, causal=True)
            for n in ((1024, 4096) if quick else (1024, 2048, 4096, 8192, 16384))]
    out += [GpuCase("chain", f"chain x3 {kind} k={k}, {_shape(shape)}", shape, k, groups, layers=3)
            for kind, shape, k, groups in (("dw", (8, 256, 32, 32), 13, 256), ("dense", (8, 64, 28, 28), 9, 1),
                                           ("dw", (8, 128, 56, 56), 7, 128), ("dense", (8, 64, 32, 32), 15, 1))]
    return out


# --- candidates ------------------------------------------------------------------------------

def _fft_conv_pytorch(case: GpuCase, module: nn.Module, x: torch.Tensor) -> Optional[Callable[[], object]]:
    try:
        from fft_conv_pytorch import fft_conv
    except ImportError:
        return None
    conv = case.conv(module)
    if conv is None:
        return None
    w, b = conv.weight.detach(), conv.bias.detach()
    if case.causal:
        return lambda: fft_conv(x, w, b, padding=case.padding, groups=case.groups)[..., :-(case.kernel_size - 1)]
    return lambda: fft_conv(x, w, b, padding=case.padding, groups=case.groups)


def make_candidates(case: GpuCase, module: nn.Module, x: torch.Tensor, lowered: fx.GraphModule,
                    max_direct_gflop: float) -> tuple[dict[str, Callable[[], object]], list[str]]:
    """The candidates' zero-argument callables, and notes on the ones left out;
    ``lowered`` is specfx's optimized model."""
    from specfx.ops.triton import triton_kernels

    notes: list[str] = []
    fns: dict[str, Callable[[], object]] = {}
    if case.direct_gflop() <= max_direct_gflop:
        fns["cudnn"] = lambda: module(x)
        compiled = torch.compile(module)
        fns["inductor"] = lambda: compiled(x)
    else:
        notes.append(f"direct convs not run ({case.direct_gflop():.0f} GFLOP)")
    fft_conv = _fft_conv_pytorch(case, module, x)
    if fft_conv is not None:
        fns["fft_conv_pytorch"] = fft_conv

    def torch_fft():
        with triton_kernels(False):
            return lowered(x)

    fns["specfx_fft"] = torch_fft
    fns["specfx_triton"] = lambda: lowered(x)
    return fns, notes


# --- measurement -----------------------------------------------------------------------------

def cuda_medians(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 3,
                 budget_ms: float = 3000.0) -> dict[str, float]:
    """Median milliseconds per call (CUDA events), in interleaved rounds; fewer rounds (at
    least 3) where the slowest candidate would take over ``budget_ms`` in all."""
    with torch.no_grad():
        slowest = 0.0
        for fn in fns.values():
            for _ in range(warmup):
                slowest = max(slowest, _time_once(fn))
        rounds = max(3, min(rounds, int(budget_ms / max(slowest, 1e-3))))
        times: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                times[name].append(_time_once(fn))
    return {name: statistics.median(values) for name, values in times.items()}


def _time_once(fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def peak_extra_bytes(fn: Callable[[], object]) -> int:
    """Peak allocation during one call over what was allocated before it."""
    with torch.no_grad():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        out = fn()
        torch.cuda.synchronize()
        del out
    return torch.cuda.max_memory_allocated() - base


def copy_bandwidth_gbps(nbytes: int = 1 << 30, rounds: int = 10) -> float:
    """Device-to-device copy bandwidth (bytes read + written per second), in GB/s."""
    src = torch.empty(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_medians({"copy": lambda: dst.copy_(src)}, rounds)["copy"]
    return 2 * nbytes / ms / 1e6


def mix_calls(gm: fx.GraphModule, x: torch.Tensor) -> list[tuple]:
    """The arguments of every ``spectral_mix`` the lowered model runs on ``x``, the ones
    inside a merged ``lowered_conv`` included."""
    ops = torch.ops.specfx
    calls: list[tuple] = []

    class Recorder(fx.Interpreter):
        def call_function(self, fn, args, kwargs):
            if fn is ops.spectral_mix.default:
                calls.append(args)
            elif fn is ops.lowered_conv.default:
                x, weight, _, in_size, fft_size, dilation, shift, groups = args[:8]
                calls.append((ops.to_spectrum(x, in_size, fft_size), weight, fft_size, dilation, shift, groups))
            return super().call_function(fn, args, kwargs)

    with torch.no_grad():
        Recorder(gm).run(x)
    return calls


def mix_bandwidth_gbps(lowered: fx.GraphModule, x: torch.Tensor, rounds: int) -> float:
    """Achieved bandwidth of the Triton contraction of the lowered model's first conv:
    input spectrum, weight spectrum and output spectrum bytes over its median time."""
    from specfx.ops import contraction
    from specfx.ops.triton import mix
    from specfx.ops.weight_spectrum import SPECTRUM_CACHE

    x_hat, weight, fft_size, dilation, shift, groups = mix_calls(lowered, x)[0]
    rank = len(fft_size)
    path = contraction.choose_path(weight.shape[1], x_hat.shape[: x_hat.dim() - rank - 1].numel())
    laid = SPECTRUM_CACHE.get(weight, fft_size, dilation, shift, groups, path)
    w = contraction.group_view(laid, groups, path)
    ms = cuda_medians({"mix": lambda: mix.spectral_mix(x_hat, w, groups, rank)}, rounds)["mix"]
    out_numel = x_hat.numel() // x_hat.shape[-rank - 1] * weight.shape[0]
    moved = (x_hat.numel() + laid.numel() + out_numel) * x_hat.element_size()
    return moved / ms / 1e6


def run_case(case: GpuCase, rounds: int, max_direct_gflop: float) -> dict:
    import specfx

    module, x = case.build("cuda")
    # From a batch-1 example: optimize runs the original once, and long direct convs are slow.
    lowered = specfx.optimize(module, (x[:1],), policy="always", verify=False)
    fns, notes = make_candidates(case, module, x, lowered, max_direct_gflop)
    ms = cuda_medians(fns, rounds)
    with torch.no_grad():
        outputs = {name: fn() for name, fn in fns.items()}
    reference = "cudnn" if "cudnn" in outputs else "specfx_fft"
    errors = {name: scaled_error(out, outputs[reference]) for name, out in outputs.items() if name != reference}
    del outputs
    peaks = {name: peak_extra_bytes(fn) for name, fn in fns.items()}
    row = {"case": dataclasses.asdict(case), "ms": ms, "peak_bytes": peaks, "errors": errors,
           "error_reference": reference, "notes": notes}
    if case.layers == 1:
        row["mix_gbps"] = mix_bandwidth_gbps(lowered, x, rounds)
    return row


# --- report ----------------------------------------------------------------------------------

def _ratio(ms: dict, baseline: str, candidate: str = "specfx_triton") -> str:
    return f"{ms[baseline] / ms[candidate]:.2f}x" if baseline in ms and candidate in ms else "-"


def table_rows(rows: list[dict]) -> list[list[str]]:
    """Medians, speedups of specfx_triton over the others, peak memory and mix bandwidth."""
    header = ["case", *[f"{c} ms" for c in CANDIDATES], "vs cudnn", "vs inductor", "vs fft-conv", "vs torch.fft",
              "peak MiB cudnn/triton", "mix GB/s", "notes"]
    table = [header]
    for r in rows:
        ms, peaks = r["ms"], r["peak_bytes"]
        peak = "/".join(f"{peaks[c] / 2**20:.0f}" if c in peaks else "-" for c in ("cudnn", "specfx_triton"))
        table.append([r["case"]["label"], *[f"{ms[c]:.3g}" if c in ms else "-" for c in CANDIDATES],
                      _ratio(ms, "cudnn"), _ratio(ms, "inductor"), _ratio(ms, "fft_conv_pytorch"),
                      _ratio(ms, "specfx_fft"), peak, f"{r['mix_gbps']:.0f}" if "mix_gbps" in r else "-",
                      "; ".join(r["notes"])])
    return table


def check_goals(rows: list[dict], copy_gbps: float) -> list[tuple[bool, str]]:
    """``(passed, description)`` per goal whose cases were run."""
    results = []
    for r in rows:
        suite, ms, label = r["case"]["suite"], r["ms"], r["case"]["label"]
        if suite == "replknet_dw31" and "cudnn" in ms:
            speedup = ms["cudnn"] / ms["specfx_triton"]
            results.append((speedup >= 3, f"{label}: specfx_triton {speedup:.2f}x cuDNN (goal ≥ 3x)"))
        if suite == "replknet_dw31" and "mix_gbps" in r:
            share = r["mix_gbps"] / copy_gbps
            results.append((share >= 0.5, f"{label}: spectral_mix at {r['mix_gbps']:.0f} GB/s, {share:.0%} of the "
                                          f"{copy_gbps:.0f} GB/s copy bandwidth (goal ≥ 50%)"))
        if suite == "chain":
            speedup = ms["specfx_fft"] / ms["specfx_triton"]
            results.append((speedup >= 2, f"{label}: specfx_triton {speedup:.2f}x the torch.fft path (goal ≥ 2x)"))
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="fewer dense and 1D cases")
    parser.add_argument("--max-direct-gflop", type=float, default=2000.0,
                        help="skip cuDNN/Inductor on cases whose direct convs exceed this many GFLOP")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "gpu.json"))
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks/gpu.py needs a CUDA device; none is available, nothing to run.")
        return 0
    from specfx.ops import TRITON_AVAILABLE
    from specfx.ops.weight_spectrum import SPECTRUM_CACHE

    if not TRITON_AVAILABLE:
        print("benchmarks/gpu.py needs Triton (pip install -e '.[gpu]'); it is not installed.")
        return 0
    torch.backends.cudnn.benchmark = True
    SPECTRUM_CACHE.verify_contents = False
    copy_gbps = copy_bandwidth_gbps()
    print(f"{torch.cuda.get_device_name()}: device-to-device copy {copy_gbps:.0f} GB/s; torch {torch.__version__}")
    rows = []
    for case in cases(args.quick):
        row = run_case(case, args.rounds, args.max_direct_gflop)
        rows.append(row)
        print(f"{case.label}: " + ", ".join(f"{k} {v:.3g} ms" for k, v in row["ms"].items())
              + " | errors vs " + row["error_reference"] + ": "
              + ", ".join(f"{k} {v:.1e}" for k, v in row["errors"].items()), flush=True)
        torch._dynamo.reset()  # compiled graphs hold their models' weights
        torch.cuda.empty_cache()
    print()
    print_table(table_rows(rows))
    print()
    goals = check_goals(rows, copy_gbps)
    for passed, text in goals:
        print(f"{'PASS' if passed else 'FAIL'}  {text}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "copy_gbps": copy_gbps,
                   "rows": rows, "goals": [{"passed": p, "goal": t} for p, t in goals]}, f, indent=1)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
