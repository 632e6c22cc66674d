"""``specfx.spectral_conv`` against torch's own convolutions: forward and backward.

The reference for padding mode ``'zeros'`` is ``F.conv1d/2d/3d``; for the other modes it
is an ``nn.ConvNd`` with that ``padding_mode``, run with the test's weight and bias through
``torch.func.functional_call`` so that gradients reach them. Configurations are generated
valid (pads torch accepts for the mode, a padded input at least as wide as the dilated
kernel), so nothing is filtered out.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx
from conftest import SCALED_TOLERANCE, assert_scaled_close, term_scales
from specfx.ops import contraction, fourier, spectral_ops

FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
MODULE_CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
PADDING_MODES = ("zeros", "circular", "reflect", "replicate")

# torch's own note that its 'same' reference pads a copy of the input for even kernels.
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")


def reference_conv(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """What torch computes for the same convolution."""
    rank = weight.dim() - 2
    if padding_mode == "zeros":
        return FUNCTIONAL_CONV[rank](x, weight, bias, stride, padding, dilation, groups)
    module = MODULE_CONV[rank](
        weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]), stride=stride,
        padding=padding, dilation=dilation, groups=groups, bias=bias is not None,
        padding_mode=padding_mode, device="meta")
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    return torch.func.functional_call(module, params, (x,))


def check_forward_backward(x, weight, bias, stride, padding, dilation, groups, padding_mode):
    """Output and the input, weight and bias gradients of ``spectral_conv`` equal torch's."""
    leaves = [t.detach().requires_grad_() for t in (x, weight) + ((bias,) if bias is not None else ())]
    xs, ws, bs = leaves[0], leaves[1], leaves[2] if bias is not None else None
    actual = specfx.spectral_conv(xs, ws, bs, stride, padding, dilation, groups, padding_mode)

    ref_leaves = [t.detach().clone().requires_grad_() for t in leaves]
    xr, wr, br = ref_leaves[0], ref_leaves[1], ref_leaves[2] if bias is not None else None
    expected = reference_conv(xr, wr, br, stride, padding, dilation, groups, padding_mode)

    assert actual.dtype == x.dtype
    assert actual.shape == expected.shape
    assert_scaled_close(actual, expected)
    with torch.no_grad():  # spectral_conv's own kernel: with a gradient it runs as its three ops
        assert_scaled_close(specfx.spectral_conv(x, weight, bias, stride, padding, dilation, groups, padding_mode),
                            expected.detach())

    upstream = torch.randn_like(expected)
    grads = torch.autograd.grad(actual, leaves, upstream)
    ref_grads = torch.autograd.grad(expected, ref_leaves, upstream)
    # A weight or bias gradient sums products over the batch and every position, and a
    # gradient of few elements can cancel to far below its terms: its error is measured
    # against the terms' magnitude. The input gradient keeps its own scale.
    _, *scales = term_scales(lambda *t: reference_conv(*t, stride, padding, dilation, groups, padding_mode),
                             ref_leaves + [None] * (3 - len(ref_leaves)), upstream)
    for name, g, ref, scale in zip(("input", "weight", "bias"), grads, ref_grads, [None, *scales]):
        assert g.dtype == ref.dtype, name
        assert g.shape == ref.shape, name
        assert_scaled_close(g, ref, scale=scale)


# --- generated configurations ------------------------------------------------------------

MAX_SIZE = {1: 16, 2: 10, 3: 7}


@st.composite
def conv_configs(draw, rank: int):
    """A convolution torch accepts, with every argument ``spectral_conv`` takes."""
    groups = draw(st.integers(1, 3))
    depthwise = draw(st.booleans())
    in_per_group = 1 if depthwise else draw(st.integers(1, 6 // groups))
    out_per_group = draw(st.integers(1, 6 // groups))  # the channel multiplier when depthwise
    max_k = 4 if rank < 3 else 3
    kernel = draw(st.lists(st.integers(1, max_k), min_size=rank, max_size=rank))
    dilation = draw(st.lists(st.integers(1, 2), min_size=rank, max_size=rank))
    padding_mode = draw(st.sampled_from(PADDING_MODES))
    padding_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))

    if padding_kind == "same":
        stride = [1] * rank
        padding = "same"
        totals = [d * (k - 1) for k, d in zip(kernel, dilation)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        stride = draw(st.lists(st.integers(1, 3), min_size=rank, max_size=rank))
        if padding_kind == "valid":
            padding, pad_values = "valid", [0] * rank
        elif padding_kind == "int":
            padding = draw(st.integers(0, 3))
            pad_values = [padding] * rank
        else:
            pad_values = draw(st.lists(st.integers(0, 3), min_size=rank, max_size=rank))
            padding = tuple(pad_values)
        pads = [(p, p) for p in pad_values]

    size = []
    for k, d, s, (left, right) in zip(kernel, dilation, stride, pads):
        smallest = max(1, d * (k - 1) + 1 - left - right)
        if padding_mode == "reflect":
            smallest = max(smallest, left + 1, right + 1)
        elif padding_mode == "circular":
            smallest = max(smallest, left, right)
        else:
            while not reads_input(smallest, k, s, d, left, right):
                smallest += 1
        size.append(draw(st.integers(smallest, max(smallest, MAX_SIZE[rank]))))

    if not isinstance(stride, str) and draw(st.booleans()):
        stride = stride[0] if len(set(stride)) == 1 else tuple(stride)  # ints as well as tuples
    batch = draw(st.sampled_from([None, 1, 2, 3]))
    return dict(
        in_channels=groups * in_per_group, out_channels=groups * out_per_group, groups=groups,
        kernel=kernel, stride=stride, padding=padding, dilation=tuple(dilation), size=size,
        padding_mode=padding_mode, bias=draw(st.booleans()), batch=batch,
        dtype=draw(st.sampled_from([torch.float32, torch.float64])))


def reads_input(n, k, s, d, left, right):
    """Whether some output of a zero-padded axis reads an input sample. Where none does,
    the output is exactly the bias and the input gradient exactly zero: a comparison
    scaled to those results has no scale, so that case has its own test below."""
    out = (n + left + right - d * (k - 1) - 1) // s + 1
    return any(0 <= t * s + m * d - left < n for t in range(out) for m in range(k))


def run_config(cfg):
    dtype = cfg["dtype"]
    batch = () if cfg["batch"] is None else (cfg["batch"],)
    x = torch.randn(*batch, cfg["in_channels"], *cfg["size"], dtype=dtype)
    weight = torch.randn(cfg["out_channels"], cfg["in_channels"] // cfg["groups"], *cfg["kernel"],
                         dtype=dtype)
    bias = torch.randn(cfg["out_channels"], dtype=dtype) if cfg["bias"] else None
    check_forward_backward(x, weight, bias, cfg["stride"], cfg["padding"], cfg["dilation"],
                           cfg["groups"], cfg["padding_mode"])


@settings(max_examples=150, deadline=None)
@given(cfg=conv_configs(rank=1))
def test_conv1d_generated_configs_match_torch_forward_and_backward(cfg):
    run_config(cfg)


@settings(max_examples=150, deadline=None)
@given(cfg=conv_configs(rank=2))
def test_conv2d_generated_configs_match_torch_forward_and_backward(cfg):
    run_config(cfg)


@settings(max_examples=100, deadline=None)
@given(cfg=conv_configs(rank=3))
def test_conv3d_generated_configs_match_torch_forward_and_backward(cfg):
    run_config(cfg)


@settings(max_examples=100, deadline=None)
@given(cfg=conv_configs(rank=2), block_bytes=st.sampled_from([64, 1024]))
def test_output_spectrum_in_channel_blocks_matches_torch(cfg, block_bytes):
    """``spectral_conv`` makes a large output spectrum a block of channels at a time
    (specfx/ops/spectral_ops.py): with the thresholds lowered, every generated conv runs
    that way, in blocks of whole groups or of channels within a group."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spectral_ops, "WHOLE_SPECTRUM_BYTES", 0)
        patch.setattr(fourier, "BLOCK_BYTES", block_bytes)
        run_config(cfg)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("groups, block_bytes", [(1, 64), (2, 64), (2, 1 << 20)])
def test_gemm_path_in_channel_blocks_matches_torch(groups, block_bytes, dtype):
    """The GEMM contraction (20 input channels per group) in blocks of output channels:
    slices of one group (small blocks) and whole groups (large ones)."""
    x = torch.randn(3, 20 * groups, 9, 8, dtype=dtype)
    weight = torch.randn(6 * groups, 20, 3, 2, dtype=dtype)
    bias = torch.randn(6 * groups, dtype=dtype)
    assert contraction.choose_path(20, 3) == contraction.GEMM
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(spectral_ops, "WHOLE_SPECTRUM_BYTES", 0)
        patch.setattr(fourier, "BLOCK_BYTES", block_bytes)
        check_forward_backward(x, weight, bias, (1, 2), 1, 1, groups, "zeros")


# --- every padding form with every padding mode, deterministically ------------------------

PADDING_FORMS = {
    "same_odd_kernel": ("same", (3, 5), 1, (1, 2)),
    "same_even_kernel": ("same", (2, 4), 1, (1, 1)),
    "same_even_kernel_dilated": ("same", (4, 2), 1, (2, 3)),
    "valid": ("valid", (3, 2), (2, 1), (1, 2)),
    "int": (2, (3, 3), 2, 1),
    "tuple": ((1, 3), (2, 4), (1, 2), (2, 1)),
}


@pytest.mark.parametrize("padding_mode", PADDING_MODES)
@pytest.mark.parametrize("form", sorted(PADDING_FORMS))
def test_each_padding_form_and_mode_matches_torch_2d(form, padding_mode):
    padding, kernel, stride, dilation = PADDING_FORMS[form]
    torch.manual_seed(0)
    x = torch.randn(2, 4, 9, 8)
    weight = torch.randn(6, 2, *kernel)
    bias = torch.randn(6)
    check_forward_backward(x, weight, bias, stride, padding, dilation, 2, padding_mode)


@pytest.mark.parametrize("rank", [1, 2, 3])
@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_with_channel_multiplier_matches_torch(rank, multiplier):
    torch.manual_seed(1)
    x = torch.randn(2, 3, *[7] * rank)
    weight = torch.randn(3 * multiplier, 1, *[3] * rank)
    check_forward_backward(x, weight, torch.randn(3 * multiplier), 1, "same", 1, 3, "zeros")


def test_circular_padding_wider_than_kernel_wraps_output_positions():
    """Circular pads larger than the kernel radius put outputs past the end of the grid,
    so the crop must wrap around it."""
    torch.manual_seed(2)
    x = torch.randn(2, 3, 5, 6)
    weight = torch.randn(4, 3, 1, 2)
    check_forward_backward(x, weight, torch.randn(4), (1, 2), (4, 5), 1, 1, "circular")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_reading_only_zero_padding_is_the_bias_and_has_no_input_gradient(dtype):
    """Every output row reads only padding (height 1, pad 1, stride 2, 1x1 kernel). torch
    gives exactly the bias and exactly zero input and weight gradients; the FFT gives
    rounding noise there, which is measured against the scale of the products it rounds
    (upstream gradient times weight, or times input), with the usual per-dtype multiple."""
    torch.manual_seed(10)
    x = torch.randn(2, 1, 7, dtype=dtype, requires_grad=True)
    weight = torch.randn(3, 2, 1, 1, dtype=dtype, requires_grad=True)
    bias = torch.randn(3, dtype=dtype, requires_grad=True)
    actual = specfx.spectral_conv(x, weight, bias, (2, 1), 1)
    expected = F.conv2d(x, weight, bias, (2, 1), 1)
    assert_scaled_close(actual, expected)

    upstream = torch.randn_like(expected)
    gx, gw, gb = torch.autograd.grad(actual, (x, weight, bias), upstream)
    ref_gx, ref_gw, ref_gb = torch.autograd.grad(expected, (x, weight, bias), upstream)
    assert not ref_gx.any() and not ref_gw.any()
    tol = SCALED_TOLERANCE[dtype]
    g_max = upstream.abs().max().item()
    torch.testing.assert_close(gx, ref_gx, rtol=0, atol=tol * g_max * weight.abs().sum().item())
    torch.testing.assert_close(gw, ref_gw, rtol=0, atol=tol * g_max * x.abs().sum().item())
    assert_scaled_close(gb, ref_gb)


def test_kernel_as_wide_as_padded_input_gives_single_output():
    torch.manual_seed(3)
    x = torch.randn(1, 2, 6)
    weight = torch.randn(3, 2, 4)
    check_forward_backward(x, weight, None, 1, 1, 2, 1, "zeros")  # span 7, padded size 8


# --- half precision ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rank,padding_mode,groups", [
    (1, "zeros", 1), (2, "zeros", 2), (2, "circular", 1), (2, "reflect", 4), (3, "replicate", 1)])
def test_half_precision_matches_fp32_conv_rounded_to_dtype(dtype, rank, padding_mode, groups):
    torch.manual_seed(4)
    x = torch.randn(2, 4, *[6] * rank).to(dtype)
    weight = torch.randn(4, 4 // groups, *[3] * rank).to(dtype)
    bias = torch.randn(4).to(dtype)
    xs, ws, bs = (t.detach().requires_grad_() for t in (x, weight, bias))
    actual = specfx.spectral_conv(xs, ws, bs, 1, 1, 1, groups, padding_mode)

    xr, wr, br = (t.detach().float().requires_grad_() for t in (x, weight, bias))
    reference = reference_conv(xr, wr, br, 1, 1, 1, groups, padding_mode)
    assert actual.dtype == dtype
    assert_scaled_close(actual, reference.detach().to(dtype))

    upstream = torch.randn(reference.shape).to(dtype)
    grads = torch.autograd.grad(actual, (xs, ws, bs), upstream)
    ref_grads = torch.autograd.grad(reference, (xr, wr, br), upstream.float())
    for g, ref in zip(grads, ref_grads):
        assert g.dtype == dtype
        assert_scaled_close(g, ref.to(dtype))


# --- memory formats ----------------------------------------------------------------------

@pytest.mark.parametrize("rank,memory_format", [
    (2, torch.channels_last), (3, torch.channels_last_3d)])
@pytest.mark.parametrize("padding_mode", ["zeros", "circular", "reflect"])
def test_channels_last_input_matches_contiguous(rank, memory_format, padding_mode):
    torch.manual_seed(5)
    x = torch.randn(2, 4, *[6] * rank)
    x_cl = x.to(memory_format=memory_format)
    assert not x_cl.is_contiguous()
    weight = torch.randn(6, 2, *[3] * rank)
    bias = torch.randn(6)
    args = (weight, bias, 2, 1, 1, 2, padding_mode)

    x_leaf, x_cl_leaf = x.clone().requires_grad_(), x_cl.clone().requires_grad_()
    y = specfx.spectral_conv(x_leaf, *args)
    y_cl = specfx.spectral_conv(x_cl_leaf, *args)
    assert_scaled_close(y_cl, y)
    assert_scaled_close(y_cl, reference_conv(x, *args))

    upstream = torch.randn_like(y)
    (g,) = torch.autograd.grad(y, x_leaf, upstream)
    (g_cl,) = torch.autograd.grad(y_cl, x_cl_leaf, upstream)
    assert_scaled_close(g_cl, g)


def test_channels_last_weight_matches_contiguous():
    torch.manual_seed(6)
    x = torch.randn(2, 3, 7, 7)
    weight = torch.randn(4, 3, 3, 3)
    y = specfx.spectral_conv(x, weight.to(memory_format=torch.channels_last), None, 1, 1)
    assert_scaled_close(y, F.conv2d(x, weight, None, 1, 1))


def test_fp64_stays_fp64_where_fp32_rounding_would_show():
    """An fp64 conv computed in fp32 anywhere would be off by ~1e-7 of the scale, far
    beyond the fp64 tolerance."""
    torch.manual_seed(7)
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    weight = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64)
    y = specfx.spectral_conv(x, weight, bias, 1, "same")
    assert y.dtype == torch.float64
    assert_scaled_close(y, F.conv2d(x, weight, bias, 1, "same"))


@pytest.mark.parametrize("rank", [1, 2, 3])
def test_batched_and_unbatched_inputs_agree(rank):
    torch.manual_seed(8)
    x = torch.randn(3, *[5] * rank)
    weight = torch.randn(2, 3, *[2] * rank)
    unbatched = specfx.spectral_conv(x, weight, None, 1, "same", 1, 1, "reflect")
    batched = specfx.spectral_conv(x.unsqueeze(0), weight, None, 1, "same", 1, 1, "reflect")
    assert unbatched.shape == batched.shape[1:]
    assert_scaled_close(unbatched, batched[0])


@pytest.mark.parametrize("stride,dilation", list(itertools.product([1, 3], [1, 2])))
def test_long_1d_kernel_matches_torch(stride, dilation):
    """The workload specfx exists for: a kernel much longer than the usual 3."""
    torch.manual_seed(9)
    x = torch.randn(2, 2, 16)
    weight = torch.randn(2, 1, 7)
    check_forward_backward(x, weight, torch.randn(2), stride, 3, dilation, 2, "zeros")
