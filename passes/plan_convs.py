"""Decide, per convolution, whether it is lowered to spectral ops, and plan its FFT grid.

Analysis only: each conv node gets ``meta["specfx_plan"]`` (a :class:`ConvPlan`) and the
report a decision with its reason and cost figures. The graph itself is unchanged.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch
import torch.fx as fx
from torch.fx.experimental.symbolic_shapes import optimization_hint
from torch.fx.passes.infra.pass_base import PassResult

from specfx import node_meta
from specfx.canonical import ConvSite, find_conv_sites, tensor_info, weight_shape, weight_value
from specfx.chains.plan import ConvPlan
from specfx.cost_model import (SMALL_DENSE_KERNEL, SMALL_DENSE_MARGIN, ConvCost, ConvShape, estimate,
                               estimate_overlap_save)
from specfx.geometry import SpectralGeometry, overlap_save_geometry, plan_geometry, resolve_padding
from specfx.close_calls import conv_band, is_close
from specfx.functional import apply_geometry
from specfx.measure import Progress, direct_conv
from specfx.timing_cache import Timing
from specfx.pipeline import PassContext, at_node
from specfx.report import ConvDecision

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _describe(site: ConvSite, in_shape, w_shape, dtype) -> str:
    kernel = "x".join(map(str, w_shape[2:])) if w_shape is not None else "?"
    # a transposed conv's weight is (C_in, C_out/groups, *k), a forward conv's (C_out, C_in/groups, *k)
    out_channels = (w_shape[1] * site.groups if site.transposed else w_shape[0]) if w_shape is not None else None
    channels = f"{in_shape[-site.rank - 1]}→{out_channels}" if in_shape is not None and w_shape is not None else "?"
    kind = f"Conv{'Transpose' if site.transposed else ''}{site.rank}d"
    groups = "" if site.groups == 1 else (" depthwise" if w_shape is not None and w_shape[1] == 1 else f" groups={site.groups}")
    shape = f"input {tuple(in_shape)} {str(dtype).replace('torch.', '')}" if in_shape is not None else "input shape unknown"
    return f"{kind} {channels} k={kernel}{groups}, padding={site.padding!r} {site.padding_mode}, {shape}"


def _signature(site: ConvSite, in_shape, dtype, w_shape, pads, geometry: SpectralGeometry,
               channels_last: bool) -> str:
    """What the time of a conv depends on: the timing cache's key."""
    blocks = geometry.overlap_save
    return (f"conv{site.rank}d x={tuple(in_shape)} {dtype} w={tuple(w_shape)} stride={tuple(site.stride)} "
            f"pad={tuple(pads)} dilation={tuple(site.dilation)} groups={site.groups} {site.padding_mode}"
            f"{' channels_last' if channels_last else ''} bias={site.bias is not None} "
            f"grid={geometry.fft_size}{f' block={blocks.block}' if blocks else ''}"
            f"{' weight_per_call' if site.weight_per_call else ''}")


def _time(gm: fx.GraphModule, site: ConvSite, ctx: PassContext, in_shape, dtype, w_shape, pads,
          geometry: SpectralGeometry, channels_last: bool, cost: ConvCost,
          unlimited: bool) -> Optional[tuple[Timing, str]]:
    """The direct and lowered times of the conv on its real shapes (timed, or from the
    timing cache), or ``None`` when the timing budget is spent. The weight is the module's
    where it holds one (its spectrum, computed while timing, is then cached for the
    optimized module), else a random one; the input is random (values do not change the
    time), drawn from a generator of its own, not the global one."""
    val = site.input.meta.get("val")
    device = val.device if isinstance(val, torch.Tensor) and val.device.type != "meta" else torch.device("cpu")
    real_weight = weight_value(gm, site)

    def make():
        generator = torch.Generator(device).manual_seed(0)
        # Not inference tensors, even under the caller's inference_mode: the spectrum
        # cache never keeps an inference tensor's spectrum, which would time the lowered
        # conv with its weight transformed on every call.
        with torch.inference_mode(False):
            x = torch.randn(in_shape, dtype=dtype, device=device, generator=generator)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            real = real_weight is not None and real_weight.device == device and real_weight.dtype == dtype
            weight = real_weight.detach() if real else \
                torch.randn(w_shape, dtype=dtype, device=device, generator=generator)
            bias = None if site.bias is None else torch.zeros(w_shape[0], dtype=dtype, device=device)
        if site.weight_per_call:  # a new tensor every call: its spectrum is never cached
            return (lambda: direct_conv(x, weight.clone(), bias, site.stride, pads, site.dilation, site.groups,
                                        site.padding_mode),
                    lambda: apply_geometry(x, weight.clone(), bias, geometry, site.groups))
        return (lambda: direct_conv(x, weight, bias, site.stride, pads, site.dilation, site.groups, site.padding_mode),
                lambda: apply_geometry(x, weight, bias, geometry, site.groups))

    key = _signature(site, in_shape, dtype, w_shape, pads, geometry, channels_last)
    return ctx.measurements.timing(key, site.name, device, make, cost.direct_ms + cost.fft_ms, unlimited)


def _blocking_fft_sizes(span: int, full: int) -> list[int]:
    """Overlap-save FFT sizes worth trying: ``m·2^j`` (m = 1, 3, 5) from twice the kernel
    span up to the unblocked grid (a window under twice the span computes more overlap than
    output)."""
    sizes = {m << j for m in (1, 3, 5) for j in range(1, 31) if 2 * span <= m << j < full}
    return sorted(sizes)


def _cheapest_blocking(shape: ConvShape, length: int, padding: tuple[int, int], dilation: int,
                       geometry: SpectralGeometry, cost: ConvCost, profile,
                       weight_per_call: bool) -> tuple[SpectralGeometry, ConvCost]:
    """The unblocked plan, or overlap-save blocks where the cost model estimates them
    cheaper (long 1D convs with wide kernels: the weight spectrum shrinks with the FFT
    size, and the blocks fill the per-frequency products' M dimension)."""
    span = dilation * (shape.kernel_size[0] - 1) + 1
    best = (geometry, cost)
    for fft_size in _blocking_fft_sizes(span, geometry.fft_size[0]):
        blocked = overlap_save_geometry(length, shape.kernel_size[0], padding, dilation, fft_size)
        if blocked is None:
            continue
        blocked_cost = estimate_overlap_save(shape, blocked, profile, weight_per_call)
        if blocked_cost.fft_ms < best[1].fft_ms:
            best = (blocked, blocked_cost)
    return best


def _plan(gm: fx.GraphModule, site: ConvSite, ctx: PassContext) -> tuple[ConvDecision, ConvPlan]:
    info = tensor_info(site.input)
    w_shape = weight_shape(gm, site)
    in_shape, dtype = info if info is not None else (None, None)
    description = _describe(site, in_shape, w_shape, dtype)

    def keep(reason: str, cost=None) -> tuple[ConvDecision, ConvPlan]:
        return (ConvDecision(site.name, site.node.name, description, False, reason, cost),
                ConvPlan(site.name, False, None, None))

    if site.not_lowerable:
        return keep(site.not_lowerable)
    if in_shape is None or w_shape is None:
        return keep("no shape information for the input or weight")
    if dtype not in SUPPORTED_DTYPES:
        return keep(f"dtype {dtype} is not supported by the spectral ops")
    if len(in_shape) not in (site.rank + 1, site.rank + 2):
        return keep(f"input has {len(in_shape)} dims; a {site.rank}d conv takes {site.rank + 1} or {site.rank + 2}")
    if not all(isinstance(d, int) for d in (*in_shape[-site.rank - 1:], *w_shape)):
        # Dynamo graphs under dynamic shapes carry SymInts; a grid planned from them would
        # guard on (or mis-size) the sizes. A symbolic batch size is fine (costed by its hint).
        return keep("dynamic spatial size: the FFT grid needs concrete channel and spatial sizes "
                    "(compile with dynamic=False to lower each shape)")
    kernel = list(w_shape[2:])
    try:
        pads = resolve_padding(site.padding, kernel, site.dilation, site.stride)
        geometry = plan_geometry(list(in_shape[-site.rank:]), kernel, site.stride, pads,
                                 site.dilation, site.padding_mode)
    except ValueError as err:
        return keep(f"not lowerable: {err}")

    batch = math.prod(optimization_hint(d) for d in in_shape[: len(in_shape) - site.rank - 1])
    # The plan serves every batch size (the grid depends on the spatial size alone), so an
    # empty example batch is costed as a batch of one rather than decided on zero work.
    batch = max(batch, 1)
    val = site.input.meta.get("val")
    channels_last = isinstance(val, torch.Tensor) and val.dim() == 4 and not val.is_contiguous() \
        and val.is_contiguous(memory_format=torch.channels_last)
    shape = ConvShape(batch=batch, in_channels=in_shape[-site.rank - 1], out_channels=w_shape[0],
                      groups=site.groups, kernel_size=tuple(kernel), out_size=geometry.out_size,
                      element_bytes=dtype.itemsize, channels_last=channels_last)
    cost = estimate(shape, geometry, ctx.settings.profile, site.weight_per_call)
    if site.rank == 1 and site.padding_mode == "zeros" and site.stride == [1] and geometry.selection is None:
        geometry, cost = _cheapest_blocking(shape, in_shape[-1], pads[0], site.dilation[0], geometry, cost,
                                            ctx.settings.profile, site.weight_per_call)
    policy = ctx.settings.policy
    if policy == "never":
        return keep("policy='never'", cost)
    timed_shape = (batch, *in_shape[-site.rank - 1:])
    if policy == "measure":
        timing, source = _time(gm, site, ctx, timed_shape, dtype, w_shape, pads, geometry, channels_last, cost, True)
        cost = dataclasses.replace(cost, measured_direct_ms=timing.baseline_ms, measured_fft_ms=timing.candidate_ms)
        if timing.speedup <= 1:
            return keep(f"direct conv measured faster ({_times(timing, source)})", cost)
        reason = f"FFT measured {timing.speedup:.1f}x faster ({_times(timing, source)})"
    elif policy == "auto":
        if geometry.skips_phases:
            return keep("the kernel is shorter than its stride (after their common factor with the dilation): "
                        "the conv never reads whole phases of its input, which its transform would carry as "
                        "zeros; a direct conv computes it with fewer operations than the transform alone", cost)
        close = is_close(cost.speedup, conv_band(shape))
        timed = _time(gm, site, ctx, timed_shape, dtype, w_shape, pads, geometry, channels_last, cost, False) \
            if close else None
        if timed is not None:
            timing, source = timed
            cost = dataclasses.replace(cost, measured_direct_ms=timing.baseline_ms,
                                       measured_fft_ms=timing.candidate_ms)
            estimate_note = f"estimated {cost.speedup:.2g}x, a close call"
            if timing.speedup <= 1:
                return keep(f"direct conv measured faster ({_times(timing, source)}; {estimate_note})", cost)
            reason = f"FFT measured {timing.speedup:.1f}x faster ({_times(timing, source)}; {estimate_note})"
        else:
            untimed = "; a close call left to the estimate (timing budget spent)" if close else ""
            if not shape.depthwise and max(kernel) <= SMALL_DENSE_KERNEL and cost.speedup < SMALL_DENSE_MARGIN:
                return keep(f"dense kernel ≤ {SMALL_DENSE_KERNEL}: direct conv libraries are faster there "
                            f"(the FFT would need to be estimated ≥ {SMALL_DENSE_MARGIN:g}x faster){untimed}", cost)
            if cost.fft_ms >= cost.direct_ms:
                return keep(f"direct conv estimated faster ({cost.fft_ms / cost.direct_ms:.2f}x the FFT's time)"
                            f"{untimed}", cost)
            reason = f"FFT estimated {cost.speedup:.1f}x faster{untimed}"
    else:
        reason = "policy='always'"
    decision = ConvDecision(site.name, site.node.name, description, True, reason, cost)
    out_info = tensor_info(site.node)  # the output dtype differs from the input's under autocast
    return decision, ConvPlan(site.name, True, geometry, out_info[1] if out_info is not None else dtype)


def _times(timing: Timing, source: str) -> str:
    return f"{timing.candidate_ms:.3g} ms lowered vs {timing.baseline_ms:.3g} ms direct, {source}"


def plan_convs(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    sites = find_conv_sites(gm)
    # Shown only once planning takes over a second, which only timing makes it take.
    progress = Progress(len(sites), "specfx: timing close calls")
    for done, site in enumerate(sites, 1):
        with at_node(site.node):
            decision, plan = _plan(gm, site, ctx)
        site.node.meta[node_meta.PLAN] = plan
        ctx.report.decisions.append(decision)
        progress.update(done, site.name)
    progress.close()
    return PassResult(gm, False)
