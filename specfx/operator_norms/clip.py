"""Clipping a layer's operator norm, with a certificate that the promise holds.

Sedghi et al.'s clip — clip every per-frequency singular value at ``ρ``, then crop the
kernel back to its ``k×k`` support — is one step of alternating projections between two
convex sets of kernels: those whose periodic conv has norm ``≤ ρ`` on the grid, and those
supported on the taps. One step lands on the second set but generally off the first: for a
random 4→4 3x3 kernel on a periodic 8x8 grid, norm 22.5 clipped to 11.25 came back as 14.3
after the crop (``benchmarks/operator_norms.py``; ``tests/test_operator_norms_clip.py``
keeps such a case). Alternating the two projections converges to a kernel in both (both sets
are convex and share the zero kernel), so :func:`clip_layer` iterates until the grid norm
is within ``tol`` of ``ρ``, then certifies the real operator's norm with
:func:`.bounds.norm_bounds` and scales the kernel by ``min(1, ρ / upper)`` — scaling is exact,
so the stored weight's certified norm ends ``≤ ρ``.

The grid: the layer's own for a periodic conv (exact); for zero padding the periodic conv
that contains the layer (:func:`.bounds.dominating_grid`), whose norm bounds the layer's;
for reflect, replicate and other circular padding the padded grid's valid conv, clipped at
``ρ / √copies`` (:func:`.bounds.pad_copies`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Optional

import torch

from .bounds import NormBounds, dominating_grid, norm_bounds, pad_copies
from .circular import SVD_BLOCK_LIMIT, Blocks, kernel_from_blocks, periodic_blocks
from .layer import ConvOperator, LayerError


@dataclasses.dataclass(frozen=True)
class ClipResult:
    """One layer's clip: its interval before and after, the alternating-projection
    iterations, and the final scale applied (1.0 when none was needed)."""

    name: str
    before: NormBounds
    after: NormBounds
    iterations: int
    scale: float
    seconds: float
    kind: str = "conv"

    @property
    def clipped(self) -> bool:
        return self.iterations > 0 or self.scale != 1.0

    def __str__(self) -> str:
        if not self.clipped:
            return f"{self.name}: norm ≤ {self.before.upper:.6g} already; unchanged"
        how = "singular values clipped" if self.kind == "linear" else \
            f"{self.iterations} rounds of per-frequency clip and crop"
        return (f"{self.name}: norm ≤ {self.before.upper:.6g} → [{self.after.lower:.6g}, {self.after.upper:.6g}] "
                f"({how}, then a scale of {self.scale:.6g}; {self.seconds:.3g} s)")


def clip_blocks(matrices: torch.Tensor, limit: float) -> torch.Tensor:
    """Each matrix with its singular values above ``limit`` set to ``limit`` (the nearest
    matrix of norm ``≤ limit`` in Frobenius norm). Large blocks go through the eigenvectors
    of their smaller Gram matrix: ``M ← M V diag(min(1, limit/σ)) Vᴴ``."""
    rows, cols = matrices.shape[-2:]
    if min(rows, cols) <= SVD_BLOCK_LIMIT:
        u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
        return (u * s.clamp(max=limit).to(u.dtype)[..., None, :]) @ vh
    right = cols <= rows
    gram = matrices.mH @ matrices if right else matrices @ matrices.mH
    eig, vec = torch.linalg.eigh(gram)
    factor = (limit / eig.clamp_min(1e-300).sqrt()).clamp(max=1.0).to(vec.dtype)
    shrink = (vec * factor[..., None, :]) @ vec.mH
    return matrices @ shrink if right else shrink @ matrices


def sedghi_clip(op: ConvOperator, limit: float, grid: Optional[tuple[int, ...]] = None) -> torch.Tensor:
    """One step of Sedghi et al.'s clip: per-frequency clip on ``grid`` (default: the
    layer's input grid), then back to the kernel's taps. The result's norm can exceed
    ``limit``; :func:`clip_layer` iterates."""
    grid = grid or op.input_size
    work = op.with_weight(op.weight.detach().to(torch.float64))
    blocks = periodic_blocks(work, grid, torch.float64, half=False)
    clipped = Blocks(clip_blocks(blocks.matrices, limit), blocks.multiplicity, blocks.grid, blocks.out_grid)
    return kernel_from_blocks(work, clipped).to(op.weight.dtype)


def _clip_target(op: ConvOperator, max_norm: float) -> tuple[ConvOperator, tuple[int, ...], float]:
    """The operator whose periodic conv is clipped, its grid, and the limit there."""
    if op.periodic:
        return op, op.input_size, max_norm
    if op.padding_mode == "zeros":
        return op, dominating_grid(op), max_norm
    valid = dataclasses.replace(op, input_size=op.padded_size, padding=((0, 0),) * op.rank, padding_mode="zeros")
    return valid, dominating_grid(valid), max_norm / math.sqrt(pad_copies(op))


def clip_layer(op: ConvOperator, max_norm: float, tol: float = 0.01, max_iter: int = 100,
               before: Optional[NormBounds] = None, steps: int = 80) -> tuple[torch.Tensor, ClipResult]:
    """A weight for ``op`` whose certified operator norm is ``≤ max_norm`` (see the module
    docstring), in ``op.weight``'s dtype, and the record of how it was reached."""
    if not max_norm > 0:
        raise LayerError(f"{op.name}: max_norm must be positive, got {max_norm}")
    start = time.perf_counter()
    before = before or norm_bounds(op, steps=steps)
    if before.upper <= max_norm:
        return op.weight, ClipResult(op.name, before, before, 0, 1.0, time.perf_counter() - start)
    target, grid, limit = _clip_target(op, max_norm)
    weight = op.weight.detach().to(torch.float64)
    iterations = 0
    for iterations in range(max_iter + 1):
        work = target.with_weight(weight)
        blocks = periodic_blocks(work, grid, torch.float64, half=False)
        top = float(torch.linalg.matrix_norm(blocks.matrices, ord=2).max()) if \
            min(blocks.matrices.shape[-2:]) <= SVD_BLOCK_LIMIT else \
            float(torch.linalg.eigvalsh(blocks.matrices.mH @ blocks.matrices)[..., -1].max().sqrt())
        if top <= limit * (1 + tol) or iterations == max_iter:
            break
        clipped = Blocks(clip_blocks(blocks.matrices, limit), blocks.multiplicity, blocks.grid, blocks.out_grid)
        weight = kernel_from_blocks(work, clipped)
    stored, after, scale = certify(op, weight, max_norm, steps)
    return stored, ClipResult(op.name, before, after, iterations, scale, time.perf_counter() - start)


def certify(op: ConvOperator, weight: torch.Tensor, max_norm: float,
            steps: int = 80) -> tuple[torch.Tensor, NormBounds, float]:
    """``weight`` (cast to ``op``'s dtype) scaled so that its certified norm is ``≤ max_norm``,
    its bounds, and the scale used. The cast weight is what is certified: rounding to
    float32 can move a norm by ~1e-7, so the check is repeated on what is stored."""
    scale = 1.0
    stored = weight.to(op.weight.dtype)
    for _ in range(4):
        bounds = norm_bounds(op.with_weight(stored), steps=steps)
        if bounds.upper <= max_norm:
            return stored, bounds, scale
        factor = max_norm / bounds.upper * (1 - 4 * torch.finfo(op.weight.dtype).eps)
        scale *= factor
        stored = (weight * scale).to(op.weight.dtype)
    raise LayerError(f"{op.name}: could not certify a norm ≤ {max_norm} after rescaling (last upper bound "
                     f"{bounds.upper:.6g})")


def clip_linear(weight: torch.Tensor, max_norm: float, name: str) -> tuple[torch.Tensor, ClipResult]:
    """A linear layer's weight with its singular values clipped at ``max_norm`` (exact: a
    dense matrix is its own operator), certified on the stored dtype."""
    from .report import linear_bounds

    start = time.perf_counter()
    before = linear_bounds(weight, name)
    if before.upper <= max_norm:
        return weight, ClipResult(name, before, before, 0, 1.0, time.perf_counter() - start, "linear")
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float64), full_matrices=False)
    clipped = (u * s.clamp(max=max_norm)) @ vh
    scale, stored = 1.0, clipped.to(weight.dtype)
    after = linear_bounds(stored, name)
    while after.upper > max_norm:  # rounding of the stored copy; at most a few ulps
        scale *= max_norm / after.upper * (1 - 4 * torch.finfo(weight.dtype).eps)
        stored = (clipped * scale).to(weight.dtype)
        after = linear_bounds(stored, name)
    return stored, ClipResult(name, before, after, 1, scale, time.perf_counter() - start, "linear")


@dataclasses.dataclass
class ClipReport:
    """What :func:`clip_operator_norm_` did: one :class:`ClipResult` per layer it could
    write, and the layers it had to leave (with why)."""

    max_norm: float
    results: list[ClipResult]
    skipped: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        changed = sum(r.clipped for r in self.results)
        lines = [f"specfx clip to operator norm ≤ {self.max_norm:g}: {changed} of {len(self.results)} layers changed"]
        lines += [f"  {r}" for r in self.results]
        lines += [f"  {name}: left as it is: {why}" for name, why in self.skipped.items()]
        return "\n".join(lines)


def clip_operator_norm_(model: torch.nn.Module, example_inputs, max_norm: float = 1.0, *, tol: float = 0.01,
                        max_iter: int = 100, linear: bool = True, frontend: str = "auto") -> ClipReport:
    """Project the weights of ``model``'s conv (and, with ``linear``, linear) layers in place
    so that every layer's certified operator norm, at the sizes ``example_inputs`` give it
    and with its own padding, stride, dilation and groups, is ``≤ max_norm``. Layers whose
    weight is computed (a parametrization) are reported as skipped. A weight shared by
    several calls is checked at each of them at the end and scaled down where one exceeds."""
    from .graph import capture_graph, find_layers
    from .report import linear_bounds

    gm, _ = capture_graph(model, example_inputs, frontend)
    results: list[ClipResult] = []
    skipped: dict[str, str] = {}
    written = []
    for layer in find_layers(gm):
        if layer.kind == "linear" and not linear:
            continue
        if layer.problem is not None:
            skipped[layer.name] = layer.problem
            continue
        if layer.parameter is None:
            skipped[layer.name] = "its weight is not a parameter the model holds (a parametrization computes it)"
            continue
        param = layer.parameter
        if layer.kind == "linear":
            new, result = clip_linear(param, max_norm, layer.name)
        else:
            new, result = clip_layer(layer.op.with_weight(param.detach()), max_norm, tol, max_iter)
        with torch.no_grad():
            param.copy_(new)
        results.append(result)
        written.append((layer, param))
    # Scaling a weight down lowers its norm at every call, so one pass settles shared weights.
    for index, (layer, param) in enumerate(written):
        if layer.kind == "linear":
            bounds = linear_bounds(param, layer.name)
        else:
            bounds = norm_bounds(layer.op.with_weight(param.detach()))
        if bounds.upper > max_norm:
            if layer.kind == "linear":
                stored, again = clip_linear(param.detach(), max_norm, layer.name)
                bounds = again.after
            else:
                stored, bounds, _ = certify(layer.op.with_weight(param.detach()), param.detach(), max_norm)
            with torch.no_grad():
                param.copy_(stored)
        results[index] = dataclasses.replace(results[index], after=bounds)
    return ClipReport(max_norm, results, skipped)
