"""The tensor math of butterfly layers: the product of ``L = log2 N`` sparse stages, each a
2x2 mix of the pairs of features whose indices differ in one bit (the FFT's structure).

Stage ``l`` pairs index ``g·2s + k`` with ``g·2s + s + k`` (``s = 2^l``, ``0 <= k < s``);
pair ``p = g·s + k`` is mixed by ``twiddle[l, :, :, p]``:
``y[i] = t[0,0]·x[i] + t[0,1]·x[j]``, ``y[j] = t[1,0]·x[i] + t[1,1]·x[j]``. Stage 0 runs
first. A product of such stages has exactly one path from each input to each output, so
``M[o, i] = Π_l twiddle[l, o_l, i_l, p_l]`` with ``p_l`` made of the bits of ``o`` below
``l`` and those of ``i`` above it; :func:`factorize` inverts that.

Rows are processed features-major (``(N, rows)``): every stage then reads and writes whole
rows of the batch with one weight each, a few passes over memory per stage, where the
rows-major layout strides through pairs two elements apart.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

# Rows of the identity a fit uses as probes up to this many input features (the exact
# Frobenius objective); wider layers are fitted on this many fixed Gaussian rows.
EXACT_PROBES = 1024


def padded_size(in_features: int, out_features: int) -> int:
    """``N``: the power of two (at least 2) the stages run at. Inputs are zero-padded to
    ``N`` features and outputs truncated to ``out_features``."""
    return max(2, 1 << math.ceil(math.log2(max(in_features, out_features))))


def _stage(xt: torch.Tensor, weights: torch.Tensor, stride: int) -> torch.Tensor:
    """One stage on features-major ``xt`` (``(N, rows)``), ``weights`` of shape
    ``(2, 2, N/2)``; a new tensor (the input is kept for the backward pass)."""
    size, rows = xt.shape
    groups = size // (2 * stride)
    pairs = xt.view(groups, 2, stride, rows)
    x0, x1 = pairs[:, 0], pairs[:, 1]
    w = weights.reshape(2, 2, groups, stride, 1)
    if torch.compiler.is_compiling():
        # Dynamo refuses out= into a strided view; the compiler fuses this form anyway.
        y0 = torch.addcmul(x0 * w[0, 0], x1, w[0, 1])
        y1 = torch.addcmul(x0 * w[1, 0], x1, w[1, 1])
        return torch.stack((y0, y1), 1).view(size, rows)
    # Eager: each half written in place (two passes each) instead of built and stacked.
    out = torch.empty_like(pairs)
    y0, y1 = out[:, 0], out[:, 1]
    torch.mul(x0, w[0, 0], out=y0)
    y0.addcmul_(x1, w[0, 1])
    torch.mul(x0, w[1, 0], out=y1)
    y1.addcmul_(x1, w[1, 1])
    return out.view(size, rows)


def _stage_weight_grad(grad: torch.Tensor, xt: torch.Tensor, stride: int) -> torch.Tensor:
    """``d loss / d weights`` of one stage, ``(2, 2, N/2)``: for each pair, the products of
    the output gradients and the inputs summed over the rows."""
    size, rows = xt.shape
    groups = size // (2 * stride)
    g = grad.view(groups, 2, 1, stride, rows)
    x = xt.view(groups, 1, 2, stride, rows)
    return (g * x).sum(-1).permute(1, 2, 0, 3).reshape(2, 2, size // 2)


def _forward(x: torch.Tensor, twiddle: torch.Tensor, bias: Optional[torch.Tensor], out_features: int,
             saved: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
    """The stages on rows ``x``; each stage's input is appended to ``saved`` if given."""
    size = 2 * twiddle.shape[-1]
    rows, in_features = x.shape
    xt = x.new_zeros(size, rows)
    xt[:in_features].copy_(x.t())
    for level in range(twiddle.shape[0]):
        if saved is not None:
            saved.append(xt)
        xt = _stage(xt, twiddle[level], 1 << level)
    y = x.new_empty(rows, out_features)
    if bias is None:
        y.copy_(xt[:out_features].t())
    else:
        torch.add(xt[:out_features].t(), bias, out=y)
    return y


class _Butterfly(torch.autograd.Function):
    """All stages of a butterfly layer on rows ``x`` (``(n, in)``), with their backward:
    the stage inputs are the only saved tensors, and each stage's gradient is the same 2x2
    mix with the transposed weights."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, twiddle: torch.Tensor, bias: Optional[torch.Tensor],
                out_features: int) -> torch.Tensor:
        saved: list[torch.Tensor] = []
        y = _forward(x, twiddle, bias, out_features, saved)
        ctx.in_features = x.shape[1]
        ctx.save_for_backward(twiddle, *saved)
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y: torch.Tensor):
        twiddle, *saved = ctx.saved_tensors
        size = 2 * twiddle.shape[-1]
        rows, out_features = grad_y.shape
        grad = grad_y.new_zeros(size, rows)
        grad[:out_features].copy_(grad_y.t())
        grad_twiddle = torch.empty_like(twiddle) if ctx.needs_input_grad[1] else None
        for level in reversed(range(twiddle.shape[0])):
            stride = 1 << level
            if grad_twiddle is not None:
                grad_twiddle[level] = _stage_weight_grad(grad, saved[level], stride)
            grad = _stage(grad, twiddle[level].transpose(0, 1), stride)
        grad_x = grad[:ctx.in_features].t().contiguous() if ctx.needs_input_grad[0] else None
        grad_bias = grad_y.sum(0) if ctx.needs_input_grad[2] else None
        return grad_x, grad_twiddle, grad_bias, None


def butterfly_linear(x: torch.Tensor, twiddle: torch.Tensor, bias: Optional[torch.Tensor],
                     out_features: int) -> torch.Tensor:
    """The butterfly layer on rows ``x`` (``(n, in)``): zero-pad to ``N`` features, run the
    stages of ``twiddle`` (``(L, 2, 2, N/2)``), keep the first ``out_features``, add ``bias``."""
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, twiddle, bias))
    if not needs_grad:
        # Inference keeps no stage inputs: each is freed as soon as the next stage is done.
        return _forward(x, twiddle, bias, out_features)
    return _Butterfly.apply(x, twiddle, bias, out_features)


def butterfly_dense(twiddle: torch.Tensor, in_features: int, out_features: int,
                    chunk: int = 1024) -> torch.Tensor:
    """The ``(out_features, in_features)`` matrix the stages apply, by running them on the
    identity's rows ``chunk`` at a time. For analysis and fitting: layers never form it."""
    eye = torch.eye(in_features, dtype=twiddle.dtype, device=twiddle.device)
    columns = [butterfly_linear(eye[start:start + chunk], twiddle, None, out_features)
               for start in range(0, in_features, chunk)]
    return torch.cat(columns).t()


def factorize(matrix: torch.Tensor) -> torch.Tensor:
    """Twiddles whose butterfly is nearest ``matrix`` (``(N, N)``, ``N`` a power of two),
    peeling the last stage off at each level.

    With the top stage's bit split off, ``M[(o_t, o_low), (i_t, i_low)] = w(o_low; o_t,
    i_t) · M'_{i_t}[o_low, i_low]``: for each ``(o_low, i_t)`` the 2 x (N/2) block over
    ``(o_t, i_low)`` is rank one. Its best rank-one approximation gives the stage's
    weights (a unit vector) and the rows of two half-size problems, solved the same way.
    Exact (to rounding) when ``matrix`` is a butterfly; a greedy approximation otherwise.
    Computed in ``matrix``'s dtype (float32 at least).
    """
    size = matrix.shape[0]
    levels = int(math.log2(size))
    work = matrix.to(torch.promote_types(matrix.dtype, torch.float32)).reshape(1, size, size)
    twiddle = work.new_empty(levels, 2, 2, size // 2)
    for depth in range(levels):
        level, count, half = levels - 1 - depth, 1 << depth, size >> (depth + 1)
        # blocks[k, o_low, i_t, o_t, i_low] of subproblem k.
        blocks = work.view(count, 2, half, 2, half).permute(0, 2, 3, 1, 4)
        if half == 1:
            # The first stage takes what is left, scale included.
            twiddle[level] = blocks[:, 0, :, :, 0].permute(2, 1, 0)
            break
        gram = blocks @ blocks.transpose(-1, -2)
        top = torch.linalg.eigh(gram).eigenvectors[..., -1]  # unit vector over o_t, largest eigenvalue
        rows = (top.unsqueeze(-1) * blocks).sum(-2)          # [k, o_low, i_t, i_low]
        twiddle[level] = top.permute(3, 2, 0, 1).reshape(2, 2, count * half)
        work = rows.permute(0, 2, 1, 3).reshape(2 * count, half, half)
    return twiddle


def fit(weight: torch.Tensor, twiddle: torch.Tensor, steps: int, seed: int = 0) -> torch.Tensor:
    """Twiddles refined from ``twiddle`` so the butterfly's ``(out, in)`` block approaches
    ``weight``: at most ``steps`` L-BFGS iterations in float64 on the squared error over
    probe rows (the identity's up to :data:`EXACT_PROBES` input features, else that many
    fixed Gaussian rows, drawn from a generator of their own)."""
    out_features, in_features = weight.shape
    target_weight = weight.detach().to(torch.float64)
    if in_features <= EXACT_PROBES:
        probes = torch.eye(in_features, dtype=torch.float64, device=weight.device)
    else:
        generator = torch.Generator(device=weight.device).manual_seed(seed)
        probes = torch.randn(EXACT_PROBES, in_features, dtype=torch.float64, device=weight.device,
                             generator=generator) / math.sqrt(EXACT_PROBES)
    target = probes @ target_weight.t()
    scale = target.square().sum().clamp_min(torch.finfo(torch.float64).tiny)
    params = twiddle.detach().to(torch.float64).clone().requires_grad_()
    optimizer = torch.optim.LBFGS([params], lr=1, max_iter=steps, history_size=20, tolerance_grad=1e-14,
                                  tolerance_change=1e-16, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = (butterfly_linear(probes, params, None, out_features) - target).square().sum() / scale
        loss.backward()
        return loss

    if steps > 0:
        with torch.enable_grad():
            optimizer.step(closure)
    return params.detach()
