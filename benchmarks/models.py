"""End to end on real architectures: eager vs ``specfx.optimize`` (policy "auto") vs Inductor.

    python benchmarks/models.py                    # every model
    python benchmarks/models.py --quick            # a few small models, 3 rounds
    python benchmarks/models.py --no-inductor --models wav2vec2_30s conformer_30s

Models are built with random weights (nothing is downloaded) from configs at the sizes a
user would bring, made non-degenerate as in tests/real_models.py so that a wrong conv
shows in the output. Each model is timed with benchmarks/timing.py's interleaved rounds
next to a deep copy of its eager self: that noise-control ratio, which should be 1.00x,
shows how far the machine's load moved this run's figures.

Prints a table and the goals (PASS/FAIL), and writes results.json, table.md and
speedup.png into --out (default benchmarks/results/models).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import os
import sys
import time
from collections.abc import Mapping
from typing import Callable

import torch
from torch import nn

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH_DIR)
sys.path.insert(0, BENCH_DIR)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import specfx  # noqa: E402
from quickstart import LargeKernelNet  # noqa: E402
from real_models import hf_model, make_non_degenerate, monai_model  # noqa: E402
from run import markdown_table, print_table  # noqa: E402
from timing import interleaved_medians  # noqa: E402

SAMPLE_RATE = 16_000
# Speedup goals on whole models: auto must never cost more than noise-level time, and the
# models whose long-kernel convs dominate at 30 s must gain.
AUTO_FLOOR = 0.97
LONG_AUDIO_GOAL = 1.5
LONG_AUDIO_MODELS = ("wav2vec2_30s", "conformer_30s")


@dataclasses.dataclass(frozen=True)
class Model:
    """One benchmark model: ``make`` builds it (eval mode, random weights) for ``input_shape``."""

    name: str
    make: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    config: str

    def build(self) -> tuple[nn.Module, torch.Tensor]:
        torch.manual_seed(0)
        model = self.make()
        x = torch.randn(self.input_shape, generator=torch.Generator().manual_seed(2))
        make_non_degenerate(model, (x,), seed=1)
        return model, x


def _speech(kind: str, seconds: float, layers: int) -> Model:
    """A base-sized speech encoder (hidden 768, the full 7-conv feature extractor, the
    k128 16-group positional conv or the conformer's k31 depthwise convs) with ``layers``
    encoder layers, on ``seconds`` of audio.
    The encoder is cut short only to bound the run time; the convs are all base-sized."""
    config = dict(num_hidden_layers=layers, hidden_dropout=0.0, attention_dropout=0.0,
                  activation_dropout=0.0, feat_proj_dropout=0.0, layerdrop=0.0, mask_time_prob=0.0)
    classes = {"wav2vec2": ("Wav2Vec2Model", "Wav2Vec2Config"), "hubert": ("HubertModel", "HubertConfig"),
               "conformer": ("Wav2Vec2ConformerModel", "Wav2Vec2ConformerConfig")}
    if kind == "conformer":
        config.update(conv_depthwise_kernel_size=31, conformer_conv_dropout=0.0, position_embeddings_type="relative")
    # The conformer's encoder builds the positional conv but its forward never calls it.
    convs = ("k31 depthwise conv modules, relative positions" if kind == "conformer"
             else "pos conv k128 g16")
    return Model(f"{kind}_{seconds:g}s", hf_model(*classes[kind], **config), (1, int(seconds * SAMPLE_RATE)),
                 f"base: hidden 768, 7 feature convs, {convs}, {layers} encoder layers; {seconds:g} s of 16 kHz audio")


def _replknet(channels: int, blocks: int, size: int) -> Model:
    return Model("replknet", lambda: LargeKernelNet(channels=channels, blocks=blocks), (1, 3, size, size),
                 f"examples/quickstart.py's net: {blocks} blocks of 1x1 -> 31x31 depthwise -> 1x1, "
                 f"{channels} channels at {size // 2}x{size // 2}")


def _mednext(filters: int, size: int) -> Model:
    return Model("mednext", monai_model("MedNeXt", spatial_dims=3, init_filters=filters, in_channels=1, out_channels=2,
                                   kernel_size=7, blocks_down=(1, 1, 1, 1), blocks_bottleneck=1,
                                   blocks_up=(1, 1, 1, 1), use_residual_connection=True, global_resp_norm=True),
                 (1, 1, size, size, size), f"k7 depthwise 3D, init filters {filters}, 1 block per stage, GRN; {size}^3")


def _segresnet(filters: int, size: int) -> Model:
    return Model("segresnet", monai_model("SegResNet", spatial_dims=3, init_filters=filters, in_channels=1,
                                     out_channels=2),
                 (1, 1, size, size, size), f"monai defaults (blocks down 1,2,2,4), init filters {filters}; {size}^3")


def models(quick: bool) -> list[Model]:
    """The models of a run, in order; ``quick`` gives a few small ones."""
    if quick:
        return [_speech("wav2vec2", 2, 1), _speech("conformer", 2, 1), _replknet(64, 2, 64), _mednext(8, 32)]
    return [
        _speech("wav2vec2", 10, 2), _speech("wav2vec2", 30, 2),
        _speech("hubert", 10, 2), _speech("hubert", 30, 2),
        _speech("conformer", 10, 2), _speech("conformer", 30, 2),
        _replknet(128, 2, 112),
        _mednext(8, 48),
        _segresnet(8, 64),
        Model("resnet50", hf_model("ResNetModel", "ResNetConfig"), (1, 3, 224, 224),
              "transformers ResNetConfig defaults (ResNet-50: bottleneck, depths 3,4,6,3)"),
        Model("convnext_tiny", hf_model("ConvNextModel", "ConvNextConfig"), (1, 3, 224, 224),
              "transformers ConvNextConfig defaults (tiny: hidden 96..768, depths 3,3,9,3, k7 depthwise)"),
    ]


def _tensors(out: object) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor, a transformers ModelOutput, nested tuples)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in _tensors(v)]
    return []


def relative_error(expected: object, actual: object) -> float:
    """Largest |actual - expected| over the largest |expected|, over every output tensor."""
    pairs = list(zip(_tensors(expected), _tensors(actual), strict=True))
    return max(((a - e).abs().max() / e.abs().max().clamp_min(1e-30)).item() for e, a in pairs)


def run_model(spec: Model, rounds: int, inductor: bool) -> dict:
    """Build, optimize and time one model; the row of results."""
    model, x = spec.build()
    start = time.perf_counter()
    fast = specfx.optimize(model, (x,))
    optimize_s = time.perf_counter() - start
    report = fast.specfx_report
    with torch.no_grad():
        error = relative_error(model(x), fast(x))
    # A deep copy is the same computation on separate memory: its ratio to the original is
    # what this run's noise alone makes of two identical candidates.
    twin = copy.deepcopy(model)
    fns: dict[str, Callable[[], object]] = {"eager": lambda: model(x), "eager_copy": lambda: twin(x),
                                            "specfx": lambda: fast(x)}
    if inductor:
        compiled = torch.compile(model)
        fns["inductor"] = lambda: compiled(x)
    ms = interleaved_medians(fns, rounds)
    return {"name": spec.name, "config": spec.config, "input_shape": list(spec.input_shape), "ms": ms,
            "lowered": report.lowered, "convs": len(report.decisions),
            "kept": report.kept, "frontend": report.frontend, "error": error, "optimize_s": optimize_s}


def _ratio(row: dict, num: str, den: str) -> float | None:
    ms = row["ms"]
    return ms[num] / ms[den] if num in ms and den in ms else None


def _fmt_ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def table_rows(rows: list[dict], inductor: bool) -> list[list[str]]:
    header = ["model", "eager ms", "specfx ms", *(["Inductor ms"] if inductor else []), "eager/specfx",
              *(["eager/Inductor"] if inductor else []), "noise (eager/copy)", "convs lowered", "max rel. error"]
    table = [header]
    for r in rows:
        ms = r["ms"]
        table.append([r["name"], f"{ms['eager']:.4g}", f"{ms['specfx']:.4g}",
                      *([f"{ms['inductor']:.4g}"] if inductor else []), _fmt_ratio(_ratio(r, "eager", "specfx")),
                      *([_fmt_ratio(_ratio(r, "eager", "inductor"))] if inductor else []),
                      _fmt_ratio(_ratio(r, "eager", "eager_copy")), f"{len(r['lowered'])}/{r['convs']}",
                      f"{r['error']:.1e}"])
    return table


def check_goals(rows: list[dict]) -> int:
    """Print one PASS/FAIL line per goal; return how many failed."""
    results = []
    for r in rows:
        speedup = _ratio(r, "eager", "specfx")
        noise = _ratio(r, "eager", "eager_copy")
        results.append((speedup >= AUTO_FLOOR, f"{r['name']}: auto {speedup:.2f}x eager (goal ≥ {AUTO_FLOOR}x; "
                                                f"noise control {noise:.2f}x)"))
        if r["name"] in LONG_AUDIO_MODELS:
            results.append((speedup >= LONG_AUDIO_GOAL,
                            f"{r['name']}: auto {speedup:.2f}x eager (goal ≥ {LONG_AUDIO_GOAL}x)"))
    for ok, text in results:
        print(f"{'PASS' if ok else 'FAIL'}  {text}")
    return sum(not ok for ok, _ in results)


def plot(rows: list[dict], path: str) -> None:
    """Bars of eager/specfx (and eager/Inductor, and the noise control) per model."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    series = [("specfx", "eager / specfx (auto)", "tab:blue"), ("inductor", "eager / Inductor", "tab:orange"),
              ("eager_copy", "noise: eager / its copy", "grey")]
    series = [s for s in series if all(s[0] in r["ms"] for r in rows)]
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(rows) + 2), 4.0))
    for i, (key, label, color) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, [r["ms"]["eager"] / r["ms"][key] for r in rows], width, label=label, color=color)
    ax.axhline(1.0, color="black", lw=0.8)
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylabel("speedup over eager")
    ax.set_title("end to end, whole models (fp32, CPU)", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    all_names = [m.name for m in models(False)]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few small models, 3 rounds")
    parser.add_argument("--models", nargs="+", metavar="NAME", help=f"run only these ({', '.join(all_names)})")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per model (default 5, quick 3)")
    parser.add_argument("--no-inductor", action="store_true", help="skip torch.compile (minutes to compile)")
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "results", "models"))
    args = parser.parse_args(argv)

    specs = models(args.quick)
    if args.models:
        unknown = sorted(set(args.models) - {m.name for m in specs})
        if unknown:
            parser.error(f"unknown model(s) {unknown}; expected some of {[m.name for m in specs]}")
        specs = [m for m in specs if m.name in args.models]
    rounds = args.rounds or (3 if args.quick else 5)
    inductor = not args.no_inductor
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {rounds} rounds, fp32, batch 1; "
          f"medians in ms")
    rows = []
    for spec in specs:
        print(f"  running {spec.name} ({spec.config}) ...", file=sys.stderr, flush=True)
        row = run_model(spec, rounds, inductor)
        print(f"    optimize {row['optimize_s']:.1f} s; lowered: {', '.join(row['lowered']) or 'none'}",
              file=sys.stderr, flush=True)
        rows.append(row)
    table = table_rows(rows, inductor)
    print_table(table)
    print()
    failed = check_goals(rows)

    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"torch": torch.__version__, "threads": torch.get_num_threads(), "rounds": rounds, "rows": rows},
                  f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(markdown_table(table) + "\n")
    plot(rows, os.path.join(args.out, "speedup.png"))
    print(f"\nwrote results.json, table.md and speedup.png into {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
