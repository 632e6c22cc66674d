"""Structured layers on real data: scikit-learn's digits (1797 8x8 images, shipped with
scikit-learn, nothing downloaded), a 64 → 256 → 256 → 256 → 10 MLP with its two 256x256
layers dense, Kronecker or butterfly.

    python examples/structured_digits.py [--seeds 3] [--epochs 40] [--finetune-epochs 10] [--threads N]
                                         [--markdown PATH]

Variants, each trained from scratch with the same data order, optimizer and epochs:
- ``dense``: ``nn.Linear`` everywhere;
- ``kronecker r4`` / ``kronecker r16``: the 256x256 layers as ``KroneckerLinear`` of
  16x16 ⊗ 16x16 factors, rank 4 or 16;
- ``butterfly``: the 256x256 layers as ``ButterflyLinear`` (8 stages);
- ``structure→kronecker r16`` / ``structure→butterfly``: ``specfx.structure`` applied to
  the trained dense model (``max_error=inf``: every 256x256 layer replaced whatever its
  error), its accuracy right after the projection, then after a short fine-tune.

Prints, per variant, test accuracy (mean and range over the seeds), parameters of the whole
model, training time and the time to predict the whole test set (median of 20 calls).
First it shows the report of ``specfx.structure`` with the default ``max_error=0.05`` on
the trained dense model: every layer kept, and by how much each missed.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import specfx
from specfx.nn import ButterflyLinear, KroneckerLinear

HIDDEN = 256


def make_mlp(hidden_layer: Callable[[], nn.Module]) -> nn.Sequential:
    """64 → 256, two hidden 256 → 256 layers of the given kind, 256 → 10."""
    return nn.Sequential(nn.Linear(64, HIDDEN), nn.ReLU(), hidden_layer(), nn.ReLU(), hidden_layer(), nn.ReLU(),
                         nn.Linear(HIDDEN, 10))


VARIANTS: dict[str, Callable[[], nn.Module]] = {
    "dense": lambda: nn.Linear(HIDDEN, HIDDEN),
    "kronecker r4": lambda: KroneckerLinear(HIDDEN, HIDDEN, rank=4),
    "kronecker r16": lambda: KroneckerLinear(HIDDEN, HIDDEN, rank=16),
    "butterfly": lambda: ButterflyLinear(HIDDEN, HIDDEN),
}


def load() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    return x_train, x_test, y_train, y_test


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor, epochs: int, seed: int) -> float:
    """Adam (lr 1e-3), batch 64, cross-entropy; returns the seconds it took."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for batch in order.split(64):
            optimizer.zero_grad()
            F.cross_entropy(model(x[batch]), y[batch]).backward()
            optimizer.step()
    return time.perf_counter() - start


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def predict_ms(model: nn.Module, x: torch.Tensor) -> float:
    model.eval()
    times = []
    with torch.no_grad():
        model(x)
        for _ in range(20):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's own)")
    parser.add_argument("--markdown", help="also write the table here")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    x_train, x_test, y_train, y_test = load()
    print(f"digits: {len(x_train)} train, {len(x_test)} test images; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; {args.seeds} seeds, {args.epochs} epochs "
          f"(+{args.finetune_epochs} fine-tuning after specfx.structure)")
    results: dict[str, dict[str, list[float]]] = {}

    def record(name: str, model: nn.Module, acc: float, train_s: float) -> None:
        row = results.setdefault(name, {"acc": [], "params": [], "train_s": [], "predict_ms": []})
        row["acc"].append(acc)
        row["params"].append(params(model))
        row["train_s"].append(train_s)
        row["predict_ms"].append(predict_ms(model, x_test))

    for seed in range(args.seeds):
        trained = {}
        for name, layer in VARIANTS.items():
            torch.manual_seed(seed)
            model = make_mlp(layer)
            seconds = train(model, x_train, y_train, args.epochs, seed)
            record(name, model, accuracy(model, x_test, y_test), seconds)
            trained[name] = model
        dense = trained["dense"]
        examples = x_train[:256]
        if seed == 0:
            print("\nspecfx.structure(dense, kind='kronecker') with the default max_error=0.05:")
            print(specfx.structure(dense, examples, "kronecker").specfx_report)
        projections = (("kronecker", 16, "structure→kronecker r16"), ("butterfly", None, "structure→butterfly"))
        for kind, rank, label in projections:
            start = time.perf_counter()
            fast = specfx.structure(dense, examples, kind, max_error=float("inf"), rank=rank)
            structure_s = time.perf_counter() - start
            if seed == 0:
                print(f"\nspecfx.structure(dense, kind={kind!r}, max_error=inf{f', rank={rank}' if rank else ''}):")
                print(fast.specfx_report)
            record(f"{label}, no fine-tune", fast, accuracy(fast, x_test, y_test), structure_s)
            seconds = train(fast, x_train, y_train, args.finetune_epochs, seed)
            record(f"{label} + {args.finetune_epochs} epochs", fast, accuracy(fast, x_test, y_test),
                   structure_s + seconds)

    lines = ["| variant | test accuracy (mean, min–max) | params | train s | predict ms (450 images) |",
             "|---|---:|---:|---:|---:|"]
    for name, row in results.items():
        acc = row["acc"]
        lines.append(f"| {name} | {100 * statistics.mean(acc):.2f}% ({100 * min(acc):.2f}–{100 * max(acc):.2f}) | "
                     f"{int(statistics.median(row['params'])):,} | {statistics.median(row['train_s']):.2f} | "
                     f"{statistics.median(row['predict_ms']):.3f} |")
    table = "\n".join(lines)
    print("\n" + table)
    print("\ntrain s: the training loop (for structure→: the structure call plus its fine-tune); medians over seeds")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
