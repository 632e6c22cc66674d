"""Operator norms of conv layers: specfx's methods beside the usual anchors, on this CPU.

    python benchmarks/operator_norms.py [--rounds 3] [--threads N] [--quick]

Cases:

1. **Upper bound, 512x512x3x3 conv on 7x7** (a ResNet's last stage), zero padding, float32
   weights. Candidates:
   - ``specfx upper``: the certified bound of the periodic conv that contains the layer
     (its 8x8 grid's 40 half-spectrum blocks, float32 Gram eigenvalues with error margins);
   - ``specfx interval``: ``specfx.operator_norm`` — that bound, Lanczos's lower bound and
     the Lehmann refinement (the window correction skips a layer this wide);
   - ``Gram iteration`` (Delattre, Barthélemy & Allauzen, ICML 2023) on the same blocks,
     with the fewest iterations whose bound is as tight as specfx's (printed);
   - ``batched SVD`` (Sedghi et al.): every block's full SVD (complex64);
   - ``power iteration``: 50 steps of ``AᵀA`` on the real operator — an estimate from
     below, not a bound.
2. **Exact circular singular values, 64x64x3x3 on 56x56**. Candidates: ``specfx``
   (``singular_values(padding="circular")``: rfft's half spectrum, float64) and the
   ``full-spectrum SVD`` anchor (all 56x56 blocks, as the conjugate symmetry is not used).

3. **Clipping**: Sedghi et al.'s one-step clip (per-frequency clip, crop to the kernel)
   against specfx's alternating projections, halving each layer's norm; the true norms
   come from explicit matrices.
4. **Tightness** of the certified interval (``method="bounds"``) against the exact norm
   (the SVD of the explicit float64 matrix), for random and trained-like kernels (a
   low-pass spatial profile carrying a dominant channel direction) at several grid sizes,
   beside the periodic conv's bound alone and the spectral norm of the reshaped weight
   that ``torch.nn.utils.spectral_norm`` normalises.
5. **Wide layers** (64–512 channels on 4x4 and 7x7), too wide for a reference SVD: the
   interval's own width and time.

Timing: :func:`timing.interleaved_medians` (candidates interleaved round by round, the
median kept); ratios are against each anchor.
"""

from __future__ import annotations

import argparse
import math
import statistics
import os
import platform
import sys

import torch

import specfx
from specfx.operator_norms import as_operator
from specfx.operator_norms.bounds import block_upper_values, dominating_grid, lanczos_dtype
from specfx.operator_norms.circular import periodic_blocks
from specfx.operator_norms.clip import clip_layer, sedghi_clip

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from timing import interleaved_medians  # noqa: E402


def gram_iteration(blocks: torch.Tensor, iterations: int) -> float:
    """Delattre et al.'s Gram iteration, per block: ``σ_max(G) ≤ ‖G_t‖_F^{1/2^t}`` for
    ``G_{t+1} = G_tᴴ G_t``, with each iterate rescaled by its Frobenius norm (kept as a log)
    so nothing overflows; the bound is the largest over the blocks."""
    g = blocks
    log_scale = torch.zeros(blocks.shape[:-2], dtype=torch.float64)
    for _ in range(iterations):
        norm = torch.linalg.matrix_norm(g).to(torch.float64)
        g = g / norm[..., None, None].to(g.real.dtype)
        log_scale = 2 * (log_scale + norm.log())
        g = g.mH @ g
    final = torch.linalg.matrix_norm(g).to(torch.float64).log()
    return float(((log_scale + final) / 2 ** iterations).exp().max())


def power_iteration(op, steps: int = 50) -> float:
    """``‖A v‖`` after ``steps`` of ``v ← AᵀA v`` (float32): an estimate from below."""
    work = op.with_weight(op.weight.float())
    v = torch.randn(1, op.in_channels, *op.input_size, generator=torch.Generator().manual_seed(0))
    for _ in range(steps):
        v = work.adjoint(work.apply(v))
        v = v / v.norm()
    return float(work.apply(v).norm())


def upper_bound_case(rounds: int, quick: bool) -> None:
    channels = 128 if quick else 512
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(channels, channels, 3, 3, generator=gen) / math.sqrt(channels * 9)
    op = as_operator(weight, 7, padding=1)
    grid = dominating_grid(op)
    blocks = periodic_blocks(op, grid, torch.float32).matrices
    values, arithmetic = block_upper_values(op, grid)
    ours = float(values[0])
    interval = specfx.operator_norm(op.weight, 7, padding=1, method="bounds")
    exact_blocks = float(torch.linalg.matrix_norm(periodic_blocks(op, grid).matrices[0], ord=2).max())
    gram = {t: gram_iteration(blocks, t) for t in range(1, 13)}
    equal = next((t for t, bound in gram.items() if bound <= ours), max(gram))
    print(f"\n## Upper bound: {channels}x{channels}x3x3 conv on 7x7, zero padding (grid {grid[0]}x{grid[1]}, "
          f"{blocks.shape[1]} blocks)\n")
    print(f"- exact norm of the containing periodic conv (float64 SVD): {exact_blocks:.6f}")
    print(f"- specfx upper bound ({arithmetic}, with its error margins): {ours:.6f} "
          f"(+{100 * (ours / exact_blocks - 1):.3f}%)")
    print(f"- specfx interval: {interval}")
    print("- Gram iteration bound by iterations: " + ", ".join(f"{t}: {b:.5f}" for t, b in gram.items()))
    print(f"- Gram iteration as tight as specfx: {equal} iterations ({gram[equal]:.6f})")
    print(f"- power iteration (50 steps, an estimate from below): {power_iteration(op):.6f}; "
          f"Lanczos iterates in {str(lanczos_dtype(op)).removeprefix('torch.')}")
    candidates = {
        "specfx upper": lambda: block_upper_values(op, grid),
        "specfx interval": lambda: specfx.operator_norm(op.weight, 7, padding=1, method="bounds"),
        f"Gram iteration ({equal} it.)": lambda: gram_iteration(periodic_blocks(op, grid, torch.float32).matrices,
                                                               equal),
        "batched SVD": lambda: torch.linalg.svdvals(periodic_blocks(op, grid, torch.float32).matrices),
        "power iteration (50)": lambda: power_iteration(op),
    }
    report(interleaved_medians(candidates, rounds, warmup=1), ["specfx upper", "specfx interval"])


def circular_case(rounds: int, quick: bool) -> None:
    channels, n = (32, 28) if quick else (64, 56)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(channels, channels, 3, 3, generator=gen) / math.sqrt(channels * 9)
    values = specfx.singular_values(weight, n, padding="circular")

    def full_spectrum() -> torch.Tensor:
        spectrum = torch.fft.fft2(weight.double(), s=(n, n)).permute(2, 3, 0, 1)
        return torch.linalg.svdvals(spectrum).reshape(-1).sort(descending=True).values

    reference = full_spectrum()
    print(f"\n## Exact circular singular values: {channels}x{channels}x3x3 on {n}x{n} ({values.numel()} values)\n")
    difference = float((values - reference).abs().max() / reference[0])
    print(f"- max |specfx − full-spectrum SVD| / σ_max: {difference:.2e}")
    candidates = {"specfx": lambda: specfx.singular_values(weight, n, padding="circular"),
                  "full-spectrum SVD": full_spectrum}
    report(interleaved_medians(candidates, rounds, warmup=1), ["specfx"])


def random_kernel(c: int, k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(c, c, k, k, generator=gen, dtype=torch.float64) / math.sqrt(c * k * k)


def trained_like_kernel(c: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """A low-pass spatial profile carrying a dominant channel direction, plus weaker
    unstructured parts (as in tests/test_operator_norms_bounds.py)."""
    axis = torch.exp(-torch.linspace(-1, 1, k, dtype=torch.float64) ** 2)
    profile = torch.outer(axis, axis) / torch.outer(axis, axis).sum()
    u = torch.randn(c, 1, generator=gen, dtype=torch.float64)
    v = torch.randn(1, c, generator=gen, dtype=torch.float64)
    mixing = 2 * (u @ v) / math.sqrt(c) + torch.randn(c, c, generator=gen, dtype=torch.float64) / c
    return mixing[:, :, None, None] * profile + 0.3 * random_kernel(c, k, gen)


def tightness_case(quick: bool) -> None:
    sizes = (4, 7, 10) if quick else (4, 7, 10, 14)
    print("\n## Tightness of the certified interval (method='bounds'), 'same' zero padding, k=3, "
          "mean (worst) over 3 kernels\n")
    print("| kernels | channels | n | upper / true | circulant alone / true | lower / true | upper bound from | "
          "seconds | reshaped weight's σ / true |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kind, make in (("random", random_kernel), ("trained-like", trained_like_kernel)):
        for channels in (4, 8, 32):
            for n in sizes:
                if channels * n * n > 4096:  # the reference SVD would take minutes
                    continue
                uppers, plain, lowers, methods, reshaped, seconds = [], [], [], set(), [], []
                for seed in range(3):
                    weight = make(channels, 3, torch.Generator().manual_seed(seed))
                    op = as_operator(weight, n, padding=1)
                    true = float(torch.linalg.matrix_norm(op.matrix(), ord=2))
                    bounds = specfx.operator_norm(weight, n, padding=1, method="bounds")
                    seconds.append(bounds.seconds)
                    plain.append(specfx.operator_norm(weight, n, padding=1, method="bounds", refine=False).upper / true)
                    uppers.append(bounds.upper / true)
                    # What torch.nn.utils.spectral_norm normalises: the c_out x (c_in·k²) matrix.
                    reshaped.append(float(torch.linalg.matrix_norm(weight.reshape(channels, -1), ord=2)) / true)
                    lowers.append(bounds.lower / true)
                    methods.add(bounds.method.split(" on ")[0].split(" ")[0])
                print(f"| {kind} | {channels} | {n} | {sum(uppers) / 3:.4f} ({max(uppers):.4f}) | "
                      f"{sum(plain) / 3:.4f} ({max(plain):.4f}) | "
                      f"{sum(lowers) / 3:.6f} ({min(lowers):.6f}) | {', '.join(sorted(methods))} | "
                      f"{statistics.median(seconds):.3f} | {min(reshaped):.2f}–{max(reshaped):.2f} |")


def wide_layers_case(quick: bool) -> None:
    """Layers too wide for a reference SVD: the interval's own width (upper / lower; the
    lower bound was within 1e-6 of the norm wherever a reference existed)."""
    layers = [(64, 4), (64, 7)] if quick else [(64, 4), (64, 7), (128, 4), (128, 7), (256, 4), (256, 7),
                                               (512, 4), (512, 7)]
    print("\n## Wide layers, random kernels, k=3 'same' zero padding: the interval's width\n")
    print("| channels | n | upper / lower | circulant alone / lower | upper bound from | seconds |")
    print("|---|---|---|---|---|---|")
    for channels, n in layers:
        weight = random_kernel(channels, 3, torch.Generator().manual_seed(0))
        bounds = specfx.operator_norm(weight, n, padding=1, method="bounds")
        plain = specfx.operator_norm(weight, n, padding=1, method="bounds", refine=False)
        print(f"| {channels} | {n} | {bounds.upper / bounds.lower:.4f} | {plain.upper / bounds.lower:.4f} | "
              f"{bounds.method} | {bounds.seconds:.2f} |")


def clip_case() -> None:
    print("\n## Clipping to half the norm: Sedghi et al.'s one step against alternating projections\n")
    print("| layer | norm | limit | one step: norm | specfx: rounds | specfx: norm (certified) | s |")
    print("|---|---|---|---|---|---|---|")
    for channels, n, mode in ((4, 8, "circular"), (16, 12, "circular"), (4, 8, "zeros"), (16, 12, "zeros")):
        weight = 2 * torch.randn(channels, channels, 3, 3, generator=torch.Generator().manual_seed(0),
                                 dtype=torch.float64)
        op = as_operator(weight, n, padding=1, padding_mode=mode)

        def true(w: torch.Tensor) -> float:
            return float(torch.linalg.matrix_norm(op.with_weight(w).matrix(), ord=2))

        limit = true(weight) / 2
        once = true(sedghi_clip(op, limit, op.input_size))
        clipped, result = clip_layer(op, limit)
        print(f"| {op.describe()} | {2 * limit:.4g} | {limit:.4g} | {once:.4g} | {result.iterations} | "
              f"{true(clipped):.4g} ({result.after.upper:.4g}) | {result.seconds:.2g} |")


def report(medians: dict[str, float], ours: list[str]) -> None:
    anchors = [name for name in medians if name not in ours]
    print("\n| candidate | median s | " + " | ".join(f"vs {a}" for a in anchors) + " |")
    print("|---|---|" + "---|" * len(anchors))
    for name, ms in medians.items():
        ratios = " | ".join(f"{medians[a] / ms:.2f}x faster" if name in ours else "" for a in anchors)
        print(f"| {name} | {ms / 1e3:.3f} | {ratios} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smaller layers, for a smoke run")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads; medians of {args.rounds} interleaved rounds")
    upper_bound_case(args.rounds, args.quick)
    circular_case(args.rounds, args.quick)
    clip_case()
    tightness_case(args.quick)
    wide_layers_case(args.quick)


if __name__ == "__main__":
    main()
