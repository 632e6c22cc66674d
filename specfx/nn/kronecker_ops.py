"""The tensor math of Kronecker layers: products that never form the dense weight, and
the nearest sum of Kronecker products to a dense weight.

A weight ``W = Σ_r A_r ⊗ B_r`` (``A_r`` of shape ``(a1, b1)``, ``B_r`` of shape
``(a2, b2)``, possibly with trailing kernel dims on ``B_r``) has entries
``W[i1·a2 + i2, j1·b2 + j2] = Σ_r A_r[i1, j1] B_r[i2, j2]``. Reading an input row as a
``b1 × b2`` matrix ``X``, the output row is ``Σ_r A_r X B_rᵀ``: two small GEMMs instead of
one large one.

Van Loan and Pitsianis' rearrangement ``R(W)[(i1, j1), (i2, j2)] = W[(i1, i2), (j1, j2)]``
turns ``Σ_r A_r ⊗ B_r`` into ``Σ_r vec(A_r) vec(B_r)ᵀ``, a matrix of rank ``r``; it only
permutes entries, so ``‖W − Σ A_r ⊗ B_r‖_F = ‖R(W) − Σ vec(A_r) vec(B_r)ᵀ‖_F`` and the
truncated SVD of ``R(W)`` is the nearest sum of ``r`` Kronecker products (Eckart–Young).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence, Union

import torch
import torch.nn.functional as F

from .factors import Shape2, TermGroup

Padding = Union[str, tuple[int, int]]


def rearrange(weight: torch.Tensor, a: Shape2, b: Shape2) -> torch.Tensor:
    """``R(W)``: the ``(a1·b1) × (a2·b2·k)`` matrix whose rank-``r`` factorizations are the
    ``r``-term Kronecker factorizations of ``weight`` (``(a1·a2, b1·b2, *kernel)``; ``k``
    is the kernel's size, 1 for a linear layer)."""
    (a1, b1), (a2, b2) = a, b
    kernel = tuple(weight.shape[2:])
    blocks = weight.reshape(a1, a2, b1, b2, *kernel).permute(0, 2, 1, 3, *range(4, 4 + len(kernel)))
    return blocks.reshape(a1 * b1, a2 * b2 * math.prod(kernel))


def kronecker_dense(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``Σ_r a[r] ⊗ b[r]`` as a dense tensor: ``a`` is ``(r, a1, b1)``, ``b`` is
    ``(r, a2, b2, *kernel)``; the result ``(a1·a2, b1·b2, *kernel)``. For tests and
    analysis: the layers never form it."""
    r, a1, b1 = a.shape
    a2, b2, *kernel = b.shape[1:]
    dense = torch.einsum("rij,rkl...->ikjl...", a, b)
    return dense.reshape(a1 * a2, b1 * b2, *kernel)


@dataclasses.dataclass(frozen=True)
class KroneckerSVD:
    """The SVD of ``R(W)`` as Kronecker factors: term ``k`` is ``a[k] ⊗ b[k]`` (each factor
    carries ``√σ_k``), largest first. Truncating it to ``r`` terms gives the nearest sum of
    ``r`` Kronecker products of these shapes."""

    a: torch.Tensor
    b: torch.Tensor
    singular_values: torch.Tensor

    def truncate(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.a[:rank], self.b[:rank]

    def relative_error(self, rank: int) -> float:
        """``‖W − W_r‖_F / ‖W‖_F`` of the ``rank``-term truncation, from the singular
        values alone (0.0 for a zero weight)."""
        s2 = self.singular_values.double() ** 2
        total = s2.sum().item()
        return math.sqrt(max(s2[rank:].sum().item(), 0.0) / total) if total > 0 else 0.0


def kronecker_svd(weight: torch.Tensor, a: Shape2, b: Shape2) -> KroneckerSVD:
    """Every Kronecker term of ``weight`` for the shapes ``a`` and ``b``, from the full SVD
    of ``R(weight)`` (computed in float32 at least: half precision has no SVD)."""
    dtype = torch.promote_types(weight.dtype, torch.float32)
    u, s, vh = torch.linalg.svd(rearrange(weight.detach().to(dtype), a, b), full_matrices=False)
    root = s.sqrt()
    kernel = tuple(weight.shape[2:])
    a_terms = (u * root).t().reshape(-1, *a)
    b_terms = (vh * root[:, None]).reshape(-1, *b, *kernel)
    return KroneckerSVD(a_terms, b_terms, s)


def fit_groups(weight: torch.Tensor, groups: Sequence[TermGroup],
               sweeps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Factors of each group such that ``Σ_groups Σ_r A ⊗ B`` approximates ``weight``.

    One group is the closed form (:func:`kronecker_svd`, optimal). Mixed shapes have no
    closed form: each sweep replaces every group by the nearest one to what the other
    groups leave of ``weight`` (block coordinate descent, so the error never grows),
    starting from the first group alone; ``sweeps`` bounds the passes.
    """
    def project(target: torch.Tensor, group: TermGroup) -> tuple[torch.Tensor, torch.Tensor]:
        return kronecker_svd(target, group.a, group.b).truncate(group.rank)

    dtype = torch.promote_types(weight.dtype, torch.float32)
    target = weight.detach().to(dtype)
    if len(groups) == 1:
        return [project(target, groups[0])]
    factors: list = [None] * len(groups)
    parts = [torch.zeros_like(target) for _ in groups]
    for _ in range(max(sweeps, 1)):
        for g, group in enumerate(groups):
            residual = target - sum(p for h, p in enumerate(parts) if h != g)
            factors[g] = project(residual, group)
            parts[g] = kronecker_dense(*factors[g])
    return factors


def kronecker_linear(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``x @ (Σ_r a[r] ⊗ b[r])ᵀ`` for rows ``x`` of shape ``(n, b1·b2)``, as two GEMMs over
    reshaped views; the order of the two contractions is the one with fewer FLOPs."""
    n = x.shape[0]
    r, a1, b1 = a.shape
    _, a2, b2 = b.shape
    if _b_first(a1, b1, a2, b2):
        # t[n, j1, (r, i2)] = Σ_j2 x[n, j1, j2] b[r, i2, j2]: one GEMM over all rows and terms.
        t = x.reshape(n * b1, b2) @ b.permute(2, 0, 1).reshape(b2, r * a2)
        t = t.view(n, b1, a2) if r == 1 else t.view(n, b1, r, a2).transpose(1, 2).reshape(n, r * b1, a2)
        # y[n] = Σ_(r, j1) a[r, i1, j1] t[n, (r, j1), i2]: a batched GEMM whose left operand is
        # the same matrix for every row (stride 0, never copied).
        a_cat = a.transpose(0, 1).reshape(a1, r * b1)
        return torch.bmm(a_cat.expand(n, a1, r * b1), t).view(n, a1 * a2)
    u = torch.bmm(a.reshape(r * a1, b1).expand(n, r * a1, b1), x.reshape(n, b1, b2))
    if r > 1:
        u = u.view(n, r, a1, b2).transpose(1, 2)
    return (u.reshape(n * a1, r * b2) @ b.permute(0, 2, 1).reshape(r * b2, a2)).view(n, a1 * a2)


def _linear_order_costs(a1: int, b1: int, a2: int, b2: int) -> tuple[int, int]:
    """Multiply-adds per row and term of :func:`kronecker_linear`: contracting with ``B``
    first, and with ``A`` first."""
    return b1 * b2 * a2 + a1 * a2 * b1, b1 * b2 * a1 + a1 * a2 * b2


def _b_first(a1: int, b1: int, a2: int, b2: int) -> bool:
    b_first, a_first = _linear_order_costs(a1, b1, a2, b2)
    return b_first <= a_first


def linear_flops(groups: Sequence[TermGroup]) -> int:
    """FLOPs per input row of :func:`kronecker_linear` summed over ``groups`` (multiply and
    add counted apart), in the order it runs, plus the adds that sum the groups."""
    total = sum(2 * g.rank * min(_linear_order_costs(*g.a, *g.b)) for g in groups)
    out_features = groups[0].a[0] * groups[0].b[0]
    return total + (len(groups) - 1) * out_features


def _conv_order_costs(o1: int, i1: int, o2: int, i2: int, kernel: tuple[int, int],
                      stride: tuple[int, int]) -> tuple[int, int]:
    """Multiply-adds per output position and term of :func:`kronecker_conv2d`: the spatial
    factor's conv first, and the channel mix first (which sees the stride² positions a
    strided conv skips)."""
    taps = kernel[0] * kernel[1]
    return (i1 * o2 * i2 * taps + o1 * i1 * o2,
            o1 * i1 * i2 * stride[0] * stride[1] + o1 * o2 * i2 * taps)


def conv_flops(groups: Sequence[TermGroup], kernel: tuple[int, int], stride: tuple[int, int]) -> int:
    """FLOPs per output position of :func:`kronecker_conv2d` summed over ``groups``, in the
    order it runs, plus the adds that sum the groups."""
    total = sum(2 * g.rank * min(_conv_order_costs(*g.a, *g.b, kernel, stride)) for g in groups)
    out_channels = groups[0].a[0] * groups[0].b[0]
    return total + (len(groups) - 1) * out_channels


def kronecker_conv2d(x: torch.Tensor, a: torch.Tensor, s: torch.Tensor, stride: tuple[int, int],
                     padding: Padding, dilation: tuple[int, int]) -> torch.Tensor:
    """The conv of ``x`` (``(n, i1·i2, h, w)``) with the kernel ``Σ_r a[r] ⊗ s[r]``, where
    ``a`` is ``(r, o1, i1)`` (the channel factor) and ``s`` is ``(r, o2, i2, kh, kw)`` (the
    spatial factor): a conv with ``s`` on the ``i2`` channels of each of the ``i1`` channel
    groups and a channel mix with ``a`` (one batched GEMM), in the cheaper order."""
    n, _, h, w = x.shape
    r, o1, i1 = a.shape
    _, o2, i2, kh, kw = s.shape
    spatial, mix = _conv_order_costs(o1, i1, o2, i2, (kh, kw), stride)
    if spatial <= mix:
        t = F.conv2d(x.reshape(n * i1, i2, h, w), s.reshape(r * o2, i2, kh, kw), None, stride, padding, dilation)
        hp, wp = t.shape[-2:]
        size = o2 * hp * wp
        t = t.reshape(n, i1, size) if r == 1 else t.view(n, i1, r, size).transpose(1, 2).reshape(n, r * i1, size)
        a_cat = a.transpose(0, 1).reshape(o1, r * i1)
        return torch.bmm(a_cat.expand(n, o1, r * i1), t).view(n, o1 * o2, hp, wp)
    u = torch.bmm(a.reshape(r * o1, i1).expand(n, r * o1, i1), x.reshape(n, i1, i2 * h * w))
    if r > 1:
        u = u.view(n, r, o1, i2 * h * w).transpose(1, 2)
    y = F.conv2d(u.reshape(n * o1, r * i2, h, w), s.transpose(0, 1).reshape(o2, r * i2, kh, kw), None,
                 stride, padding, dilation)
    return y.view(n, o1 * o2, *y.shape[-2:])
