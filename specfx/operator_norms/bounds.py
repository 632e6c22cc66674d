"""Certified intervals for the operator norm ``‖A‖₂`` of a conv layer at its real padding.

**Lower bound.** Lanczos on ``AᵀA`` (the conv and its adjoint, ``conv_transpose``) gives a
unit vector ``v``; ``‖Av‖`` is a lower bound whatever the iteration's accuracy, and is
evaluated once more in float64.

**Upper bound, periodic layers.** Exact: the largest singular value of the per-frequency
blocks (:mod:`.circular`).

**Upper bound, zero padding.** The zero-padded conv on ``n`` samples is a submatrix of the
periodic conv on a grid ``N`` large enough that no tap it reads wraps onto the input:
``N ≥ n + left`` (taps left of the input land in the grid's zero tail) and ``N`` past the
last sample any output reads, rounded up to a multiple of the stride. So ``A = R C E``
with ``E`` embedding the input into the grid and ``R`` selecting output rows, and
``‖A‖ ≤ ‖C‖``: the largest block singular value on that grid. That bound is at most the
symbol's supremum ``sup_ω ‖F(ω)‖`` and approaches ‖A‖ as ``n`` grows; its excess is the
finite-size (boundary) effect, about 1/n.

**Refinement (Lehmann's bounds).** Also ``AᵀA = Eᵀ C* RᵀR C E ⪯ Eᵀ C*C E``, a compression of
``C*C``, so by Cauchy interlacing ``λ_{j+1}(AᵀA) ≤ β := σ_{j+1}(C)²``. Given ``j`` Lanczos
vectors ``V`` whose Ritz values exceed ``β``, the Lehmann–Maehly bound holds:
``λ₁(AᵀA) ≤ β + τ_max`` with ``τ_max`` the largest eigenvalue of the pencil
``(Vᵀ(B−β)²V, Vᵀ(B−β)V)``, ``B = AᵀA``. (Rayleigh–Ritz for ``(B−β)⁻¹`` on the space ``(B−β)V``;
for ``j = 1`` it is Temple's inequality ``λ₁ ≤ ρ + ε²/(ρ−β)``.) It is nearly exact when the
circulant's spectrum has a gap under the operator's top eigenvalues — kernels with a
dominant direction, as trained (smooth, low-pass) kernels have — and does not apply to
spectra without one (random kernels).

**Window correction.** Where the interval is still wider than :data:`WINDOW_TARGET`, the
circulant bound is corrected for the input and output windows (:mod:`.windowed`): the
finite-size excess, certified without a spectral gap.

**Other padding modes.** Reflect, replicate and non-periodic circular padding copy input
samples: ``A = V P`` with ``V`` the valid conv on the padded grid and ``PᵀP`` diagonal (how
often each sample is copied), so ``‖A‖ ≤ ‖P‖ ‖V‖ = √(max copies) ‖V‖``.

Rounding: float64 results carry a relative margin far above their rounding error
(:data:`F64_MARGIN`); blocks too large for float64 in time go through float32 Gram
matrices with the standard worst-case bounds of each step added (see :func:`block_upper_values`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import torch
import torch.nn.functional as F

from .circular import SVD_BLOCK_LIMIT, expand_values, periodic_blocks
from .layer import ConvOperator, LayerError, F_PAD_MODE
from .windowed import F64_MARGIN, windowed_upper

U32 = 2.0 ** -24
# Lanczos iterates with the explicit float64 matrix up to this many rows and columns, and
# with float32 convs beyond (its vectors are certified in float64 afterwards): torch's
# float64 convs take a slow path, 12 ms per application of AᵀA for a 512x512x3x3 conv on
# 7x7 against 2 ms in float32, and on a busy 2-core machine 24 ms for a 4x4x3x3 conv on
# 6x6 (its two threads waiting on each other) against 0.01 ms.
DENSE_LANCZOS_DIM = 2048
# Dense SVD when method="auto" and the matrix has at most this many rows and columns.
AUTO_DENSE_DIM = 1024
LEHMANN_MAX_VECTORS = 8
# The window correction (:mod:`.windowed`) runs where the interval is wider than this.
WINDOW_TARGET = 0.01


@dataclasses.dataclass(frozen=True)
class NormBounds:
    """A certified interval ``lower ≤ ‖A‖₂ ≤ upper`` for one layer's operator norm.

    ``method`` says how ``upper`` was obtained; ``exact`` is True when the interval is the
    computed norm itself (dense SVD, or a periodic conv's blocks) up to rounding.
    ``iterations`` counts the Lanczos steps behind ``lower``.
    """

    lower: float
    upper: float
    method: str
    exact: bool = False
    layer: str = ""
    iterations: int = 0
    seconds: float = 0.0

    @property
    def gap(self) -> float:
        """``upper / lower − 1``: how far apart the bounds are (0 for exact results)."""
        if self.upper == 0:
            return 0.0
        return self.upper / self.lower - 1.0 if self.lower > 0 else math.inf

    def __str__(self) -> str:
        if self.exact:
            return f"{self.upper:.6g} (exact, {self.method})"
        return f"[{self.lower:.6g}, {self.upper:.6g}] (+{100 * self.gap:.2g}%, {self.method})"


# --- rounding-aware block values --------------------------------------------------------------

def _frobenius(matrices: torch.Tensor) -> torch.Tensor:
    """Per matrix of a complex batch, the Frobenius norm (in float64)."""
    return torch.view_as_real(matrices).to(torch.float64).square().sum((-3, -2, -1)).sqrt()


def _gamma(n: int, u: float) -> float:
    """``γ_n = n·u / (1 − n·u)``: the relative error bound of a sum of ``n`` products."""
    return n * u / (1 - n * u)


def block_upper_values(op: ConvOperator, grid: tuple[int, ...]) -> tuple[torch.Tensor, str]:
    """Upper bounds on every singular value of ``op``'s periodic conv on ``grid``, descending
    with multiplicity (in float64), and a word on the arithmetic used.

    Blocks up to :data:`.circular.SVD_BLOCK_LIMIT` rows or columns are decomposed in
    float64. Larger ones in float32, each step's standard worst-case error added:

    - the spectrum, a direct DFT over the ``T`` taps: ``|ΔK̂ᵢⱼ| ≤ √2 γ_{T+2} Σ_m |K_m,ij|``,
      so ``‖ΔK̂‖₂ ≤ √2 γ_{T+2} ‖Σ_m |K_m|‖_F`` (the same for every frequency; kernels of
      more than 64 taps are transformed in float64 and rounded: ``≤ u ‖K̂‖_F``);
    - the Gram matrix, a product with inner dimension ``c``: ``‖ΔH‖₂ ≤ γ_c ‖K̂‖_F²``;
    - its eigenvalues, backward error taken as ``c·u·‖H‖₂`` (LAPACK's ``p(c)·ε·‖H‖``, ``p(c) = c``).

    Each eigenvalue is raised by the last two and each singular value by the first; for a
    random 512x512x3x3 layer that is 0.2%, nearly all of it the Gram matrix's term.
    """
    taps = math.prod(op.kernel_size)
    rows, cols = op.out_channels // op.groups, op.weight.shape[1] * math.prod(op.stride)
    if min(rows, cols) <= SVD_BLOCK_LIMIT:
        blocks = periodic_blocks(op, grid, torch.float64)
        values = torch.linalg.svdvals(blocks.matrices)
        margin = (rows + cols + taps) * 2.0 ** -53 * _frobenius(blocks.matrices)
        values = values + margin[..., None] + values * F64_MARGIN
        return expand_values(values, blocks.multiplicity), "float64"
    from .circular import DIRECT_DFT_TAPS

    if taps <= DIRECT_DFT_TAPS:
        blocks = periodic_blocks(op, grid, torch.float32)
        per_tap = op.weight.detach().to(torch.float64).abs().sum(tuple(range(2, 2 + op.rank)))
        groups = per_tap.reshape(op.groups, -1).square().sum(-1).sqrt().max()
        spectrum_error = math.sqrt(2) * _gamma(taps + 2, U32) * float(groups)
        small = blocks.matrices
        frobenius = _frobenius(small) * (1 + 1e-6)
    else:
        blocks = periodic_blocks(op, grid, torch.float64)
        frobenius = _frobenius(blocks.matrices)
        small = blocks.matrices.to(torch.complex64)
        spectrum_error = U32 * frobenius
        frobenius = frobenius * (1 + U32)
    multiplicity = blocks.multiplicity
    del blocks
    gram = small @ small.mH if rows <= cols else small.mH @ small
    eig = torch.linalg.eigvalsh(gram).to(torch.float64).flip(-1)
    eig_margin = _gamma(max(rows, cols), U32) * frobenius ** 2 + min(rows, cols) * U32 * eig[..., 0].abs()
    values = (eig.clamp_min(0) + eig_margin[..., None]).sqrt()
    values = values + (spectrum_error[..., None] if isinstance(spectrum_error, torch.Tensor) else spectrum_error)
    return expand_values(values, multiplicity), "float32 Gram"


def dominating_grid(op: ConvOperator) -> tuple[int, ...]:
    """The smallest periodic grid (a multiple of the stride per axis) whose conv contains the
    zero-padded ``op`` as a submatrix: see the module docstring."""
    grid = []
    for n, (left, _), s, m, span in zip(op.input_size, op.padding, op.stride, op.out_size, op.span):
        size = max(n + left, s * (m - 1) + span - left, s * m)
        grid.append(-(-size // s) * s)
    return tuple(grid)


def pad_copies(op: ConvOperator) -> int:
    """The most times the padding copies one input sample (``‖P‖₂²``; 1 for zeros)."""
    if op.padding_mode == "zeros":
        return 1
    most = 1
    for n, (left, right) in zip(op.input_size, op.padding):
        index = torch.arange(n, dtype=torch.float64).view(1, 1, n)
        padded = F.pad(index, (left, right), mode=F_PAD_MODE[op.padding_mode]).long().view(-1)
        most *= int(torch.bincount(padded, minlength=n).max())
    return most


# --- Lanczos on AᵀA ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Ritz:
    """Ritz pairs of ``AᵀA`` from Lanczos: ``values`` descending, ``vectors`` as columns
    (``in_dim × k``), and the number of steps taken."""

    values: torch.Tensor
    vectors: torch.Tensor
    steps: int


def _normal_matvec(op: ConvOperator, dtype: torch.dtype):
    """``v ↦ AᵀA v`` on the columns of ``v`` (``in_dim × k``)."""
    if dtype == torch.float64 and max(op.in_dim, op.out_dim) <= DENSE_LANCZOS_DIM:
        matrix = op.matrix(None)
        return lambda v: matrix.T @ (matrix @ v)
    work = op.with_weight(op.weight.detach().to(dtype))
    shape = (-1, op.in_channels, *op.input_size)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        batch = v.T.reshape(shape)
        return work.adjoint(work.apply(batch)).reshape(v.shape[1], -1).T

    return matvec


def lanczos_dtype(op: ConvOperator) -> torch.dtype:
    return torch.float64 if max(op.in_dim, op.out_dim) <= DENSE_LANCZOS_DIM else torch.float32


def lanczos(op: ConvOperator, steps: int = 80, tol: float = 1e-10, seed: int = 0,
            dtype: Optional[torch.dtype] = None, settle: float = 1e-8) -> Ritz:
    """Lanczos with full reorthogonalisation on ``AᵀA`` from a seeded random start, stopped
    when the top Ritz pair's residual is below ``tol`` times its value, when the top Ritz
    value has grown by less than ``settle`` (relative) over the last 8 steps, or when the
    Krylov space is exhausted. (A dense top spectrum, as random kernels have, keeps the
    residual large long after the value — all the lower bound needs — has settled.)"""
    dtype = dtype or lanczos_dtype(op)
    if dtype == torch.float32:  # Ritz values wander by ~1e-7 in float32
        tol, settle = max(tol, 1e-6), max(settle, 1e-6)
    matvec = _normal_matvec(op, dtype)
    dim = op.in_dim
    steps = max(1, min(steps, dim))
    gen = torch.Generator().manual_seed(seed)
    basis = torch.zeros(dim, steps + 1, dtype=dtype)
    start = torch.randn(dim, generator=gen, dtype=torch.float64).to(dtype)
    basis[:, 0] = start / start.norm()
    alpha = torch.zeros(steps, dtype=torch.float64)
    beta = torch.zeros(steps, dtype=torch.float64)
    taken = steps
    history: list[float] = []
    for j in range(steps):
        w = matvec(basis[:, j:j + 1])[:, 0]
        alpha[j] = float(basis[:, j] @ w)
        for _ in range(2):  # twice is enough (Kahan–Parlett)
            w = w - basis[:, :j + 1] @ (basis[:, :j + 1].T @ w)
        beta[j] = float(w.norm())
        tri = torch.diag(alpha[:j + 1]) + torch.diag(beta[:j], 1) + torch.diag(beta[:j], -1)
        values, vectors = torch.linalg.eigh(tri)
        top = float(values[-1])
        history.append(top)
        settled = j >= 8 and history[-1] - history[-9] <= settle * top
        if (beta[j] <= 1e-12 * max(top, 1e-300) or settled
                or beta[j] * abs(float(vectors[-1, -1])) <= tol * max(top, 1e-300)):
            taken = j + 1
            break
        basis[:, j + 1] = w / beta[j]
    tri = torch.diag(alpha[:taken]) + torch.diag(beta[:taken - 1], 1) + torch.diag(beta[:taken - 1], -1)
    values, vectors = torch.linalg.eigh(tri)
    ritz = basis[:, :taken].to(torch.float64) @ vectors.flip(-1)
    return Ritz(values.flip(-1).clamp_min(0), ritz, taken)


def certified_lower(op: ConvOperator, vector: torch.Tensor) -> float:
    """``‖A v‖ / ‖v‖`` in float64, less its rounding margin: a lower bound on ``‖A‖``."""
    work = op.with_weight(op.weight.detach().to(torch.float64))
    v = vector.to(torch.float64)
    image = work.apply(v.reshape(1, op.in_channels, *op.input_size))
    return float(image.norm() / v.norm()) * (1 - F64_MARGIN)


def lehmann_upper(op: ConvOperator, vectors: torch.Tensor, beta: float) -> Optional[float]:
    """Lehmann's upper bound on ``λ₁(AᵀA)`` from the columns of ``vectors`` and ``β ≥ λ_{j+1}``,
    or ``None`` where it does not apply (a Ritz value not above ``β``)."""
    matvec = _normal_matvec(op, torch.float64)
    v = vectors.to(torch.float64)
    bv = matvec(v)
    shifted = bv - beta * v
    a0 = v.T @ shifted
    a0 = (a0 + a0.T) / 2
    a1 = shifted.T @ shifted
    chol, info = torch.linalg.cholesky_ex(a0)
    if int(info) != 0:
        return None
    inv = torch.linalg.solve_triangular(chol, torch.eye(len(a0), dtype=torch.float64), upper=False)
    pencil = inv @ a1 @ inv.T
    tau = float(torch.linalg.eigvalsh((pencil + pencil.T) / 2)[-1])
    if not math.isfinite(tau):
        return None
    return (beta + tau) * (1 + F64_MARGIN)


# --- the interval -------------------------------------------------------------------------------

def exact_dense(op: ConvOperator, max_dim: Optional[int]) -> NormBounds:
    """The norm from the SVD of the explicit matrix."""
    sigma = float(torch.linalg.matrix_norm(op.matrix(max_dim), ord=2))
    return NormBounds(sigma * (1 - F64_MARGIN), sigma * (1 + F64_MARGIN), "dense SVD", True, op.describe())


def pointwise_norm(op: ConvOperator) -> Optional[NormBounds]:
    """The exact norm of a 1x1 conv whose padding adds no samples of its own (none, or
    zeros): each output position reads one input position, distinct outputs distinct
    inputs, so ``A = S ⊗ W`` per group with ``S`` a selection (orthonormal rows) and
    ``‖A‖ = max_g ‖W_g‖`` — or 0 when every output reads padding. ``None`` for other layers."""
    if any(k != 1 for k in op.kernel_size):
        return None
    if op.padding_mode != "zeros" and any(p != (0, 0) for p in op.padding):
        return None
    first = [-(-left // s) for s, (left, _) in zip(op.stride, op.padding)]  # the first output on an input
    reads = all(j < m and j * s - left < n
                for j, n, m, s, (left, _) in zip(first, op.input_size, op.out_size, op.stride, op.padding))
    weight = op.weight.detach().to(torch.float64).reshape(op.groups, op.out_channels // op.groups, -1)
    gram = weight @ weight.mT if weight.shape[1] <= weight.shape[2] else weight.mT @ weight
    top = float(torch.linalg.eigvalsh(gram)[:, -1].clamp_min(0).max().sqrt()) if reads else 0.0
    return NormBounds(top * (1 - F64_MARGIN), top * (1 + F64_MARGIN), "1x1: the weight matrix", True,
                      op.describe())


def norm_bounds(op: ConvOperator, method: str = "auto", steps: int = 80, seed: int = 0,
                refine: bool = True, max_dim: Optional[int] = 4096) -> NormBounds:
    """The certified interval for ``op`` (see the module docstring). Periodic layers are
    computed exactly from their blocks, and 1x1 convs from their weight (:func:`pointwise_norm`),
    whatever the method; otherwise ``method`` is
    ``"auto"`` (dense SVD up to :data:`AUTO_DENSE_DIM` rows and columns, bounds beyond),
    ``"exact"`` (dense SVD; refused past ``max_dim``) or ``"bounds"``."""
    if method not in ("auto", "exact", "bounds"):
        raise LayerError(f"{op.name}: method must be 'auto', 'exact' or 'bounds', got {method!r}")
    start = time.perf_counter()
    if not bool(torch.isfinite(op.weight.detach()).all()):
        raise LayerError(f"{op.name}: the weight has NaN or Inf entries, so the layer has no finite operator norm")
    if op.periodic:
        values, arithmetic = block_upper_values(op, op.input_size)
        sigma = float(values[0])
        result = NormBounds(sigma * (1 - 2 * F64_MARGIN) if arithmetic == "float64" else 0.0, sigma,
                            f"periodic blocks {_grid(op.input_size)}", arithmetic == "float64", op.describe())
        if not result.exact:  # float32 blocks: the lower bound comes from Lanczos
            ritz = lanczos(op, steps, seed=seed)
            result = dataclasses.replace(result, lower=certified_lower(op, ritz.vectors[:, 0]),
                                         iterations=ritz.steps)
        return dataclasses.replace(result, seconds=time.perf_counter() - start)
    pointwise = pointwise_norm(op)
    if pointwise is not None:
        return dataclasses.replace(pointwise, seconds=time.perf_counter() - start)
    if method == "exact" or (method == "auto" and max(op.in_dim, op.out_dim) <= AUTO_DENSE_DIM):
        return dataclasses.replace(exact_dense(op, max_dim), seconds=time.perf_counter() - start)
    ritz = lanczos(op, steps, seed=seed)
    lower = certified_lower(op, ritz.vectors[:, 0])
    if op.padding_mode == "zeros":
        grid = dominating_grid(op)
        values, arithmetic = block_upper_values(op, grid)
        upper, how = float(values[0]), f"circulant {_grid(grid)}"
        if refine:
            lehmann = _lehmann(op, ritz, values)
            if lehmann is not None and lehmann[0] < upper:
                upper, how = lehmann[0], f"Lehmann j={lehmann[1]} on circulant {_grid(grid)}"
            if upper > lower * (1 + WINDOW_TARGET):
                windowed = windowed_upper(op, grid, lower * (1 + WINDOW_TARGET))
                if windowed is not None and windowed[0] < upper:
                    upper, how = windowed[0], f"window-corrected circulant {_grid(grid)}, r={windowed[1]}"
    else:
        valid = dataclasses.replace(op, input_size=op.padded_size, padding=((0, 0),) * op.rank,
                                    padding_mode="zeros")
        grid = dominating_grid(valid)
        values, arithmetic = block_upper_values(valid, grid)
        copies = pad_copies(op)
        upper = float(values[0]) * math.sqrt(copies)
        how = f"circulant {_grid(grid)} of the padded grid x √{copies} ({op.padding_mode} copies)"
    if arithmetic != "float64":
        how += f", {arithmetic}"
    upper = max(upper, lower)  # rounding can only have lowered the certified upper this far
    return NormBounds(lower, upper, how, False, op.describe(), ritz.steps, time.perf_counter() - start)


def _lehmann(op: ConvOperator, ritz: Ritz, circulant: torch.Tensor) -> Optional[tuple[float, int]]:
    """The best Lehmann bound (as a norm) over ``j = 1 … LEHMANN_MAX_VECTORS`` and its ``j``."""
    best: Optional[tuple[float, int]] = None
    for j in range(1, min(LEHMANN_MAX_VECTORS, ritz.values.numel(), circulant.numel() - 1) + 1):
        beta = float(circulant[j]) ** 2
        if float(ritz.values[j - 1]) <= beta * (1 + 1e-6):
            continue
        bound = lehmann_upper(op, ritz.vectors[:, :j], beta)
        if bound is not None and (best is None or math.sqrt(bound) < best[0]):
            best = (math.sqrt(bound), j)
    return best


def _grid(grid: tuple[int, ...]) -> str:
    return "x".join(map(str, grid))
