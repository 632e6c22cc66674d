"""How well do the circulant and Yi's approximations predict a zero-padded conv's singular values?

Run:  python examples/singular_values.py [--plot sv_error.png]

A zero-padded ("same") conv is not block circulant, so its singular values are only
approximated by the circulant model (Sedghi et al.: the layer's kernel as a periodic conv
on the same grid) or by Yi's spectral-density approximation. Both are compared here with
the exact values (the SVD of the layer's explicit float64 matrix) for random and
trained-like kernels at several grid sizes ``n`` and kernel sizes ``k``. The error is
``‖σ_approx − σ_exact‖ / ‖σ_exact‖`` over all singular values, and the top one's relative
error.
"""

from __future__ import annotations

import argparse
import math

import torch

import specfx

CHANNELS = 4
SIZES = (6, 8, 12, 16, 20)
KERNELS = (3, 5)
SEEDS = range(3)


def random_kernel(k: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(CHANNELS, CHANNELS, k, k, generator=gen, dtype=torch.float64) / math.sqrt(CHANNELS * k * k)


def trained_like_kernel(k: int, gen: torch.Generator) -> torch.Tensor:
    """A low-pass spatial profile carrying a channel mixing, plus weaker unstructured parts:
    the shape trained kernels take."""
    axis = torch.exp(-torch.linspace(-1.2, 1.2, k, dtype=torch.float64) ** 2)
    profile = torch.outer(axis, axis)
    mixing = torch.randn(CHANNELS, CHANNELS, generator=gen, dtype=torch.float64) / math.sqrt(CHANNELS)
    return mixing[:, :, None, None] * profile / profile.sum() + 0.3 * random_kernel(k, gen)


def errors(weight: torch.Tensor, n: int) -> dict[str, tuple[float, float]]:
    padding = weight.shape[-1] // 2
    exact = specfx.singular_values(weight, n, padding=padding)
    result = {}
    for method in ("circular", "asymptotic"):
        approx = specfx.singular_values(weight, n, padding=padding, method=method)
        result[method] = (float((approx - exact).norm() / exact.norm()), float(approx[0] / exact[0] - 1))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", metavar="PATH", help="also draw the errors against n (needs matplotlib)")
    args = parser.parse_args()
    rows = []
    print(f"{CHANNELS}→{CHANNELS} channels, 'same' zero padding; mean over {len(SEEDS)} kernels per row\n")
    print("| kernels | k | n | circulant: error | Yi: error | circulant: top σ | Yi: top σ | better |")
    print("|---|---|---|---|---|---|---|---|")
    for kind, make in (("random", random_kernel), ("trained-like", trained_like_kernel)):
        for k in KERNELS:
            for n in SIZES:
                runs = [errors(make(k, torch.Generator().manual_seed(seed)), n) for seed in SEEDS]
                mean = {m: tuple(sum(r[m][i] for r in runs) / len(runs) for i in range(2))
                        for m in ("circular", "asymptotic")}
                better = "Yi" if mean["asymptotic"][0] < mean["circular"][0] else "circulant"
                rows.append((kind, k, n, mean))
                print(f"| {kind} | {k} | {n} | {mean['circular'][0]:.4f} | {mean['asymptotic'][0]:.4f} | "
                      f"{mean['circular'][1]:+.4f} | {mean['asymptotic'][1]:+.4f} | {better} |")
    wins = sum(r[3]["asymptotic"][0] < r[3]["circular"][0] for r in rows)
    print(f"\nYi's approximation is the more accurate in {wins} of {len(rows)} rows.")
    if args.plot:
        draw(rows, args.plot)
        print(f"wrote {args.plot}")


def draw(rows, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, kind in zip(axes, ("random", "trained-like")):
        for k, style in zip(KERNELS, ("-", "--")):
            selected = [r for r in rows if r[0] == kind and r[1] == k]
            sizes = [r[2] for r in selected]
            ax.plot(sizes, [r[3]["circular"][0] for r in selected], style, color="tab:blue", marker="o",
                    label=f"circulant, k={k}")
            ax.plot(sizes, [r[3]["asymptotic"][0] for r in selected], style, color="tab:orange", marker="s",
                    label=f"Yi, k={k}")
        ax.set_title(f"{kind} kernels")
        ax.set_xlabel("n (input is n x n)")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("relative error of all singular values")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
