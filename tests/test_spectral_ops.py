"""The three spectral ops and ``lowered_conv`` (the three merged): registration (opcheck),
exact gradients (gradcheck), the weight-spectrum cache, the planned-size check and the
depthwise contraction path."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

import specfx
from conftest import assert_scaled_close
from specfx.functional import conv_geometry
from specfx.sample_selection import select_read_samples, selection_args, unread_mask
from specfx.ops import SPECTRUM_CACHE, contraction

OPS = torch.ops.specfx
FUNCTIONAL_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


# --- opcheck -----------------------------------------------------------------------------

# name: (input shape, weight shape, bias, stride, padding, dilation, groups, padding_mode, dtype)
OP_CASES = {
    "dense_2d_bias_fp32": ((2, 3, 6, 5), (4, 3, 3, 3), True, 1, 1, 1, 1, "zeros", torch.float32),
    "dense_2d_one_image_fp32": ((1, 3, 8, 8), (4, 3, 3, 3), False, 1, 1, 1, 1, "zeros", torch.float32),
    "grouped_2d_fp64": ((2, 4, 6, 6), (6, 2, 3, 2), False, 1, (1, 0), 1, 2, "zeros", torch.float64),
    "depthwise_2d_multiplier_bias_fp32": ((2, 3, 7, 7), (6, 1, 3, 3), True, 1, "same", 1, 3, "zeros",
                                          torch.float32),
    "strided_dilated_1d_bias_fp64": ((3, 2, 12), (2, 2, 3), True, 2, 2, 2, 1, "zeros", torch.float64),
    "circular_wide_pad_strided_2d_fp32": ((2, 2, 5, 6), (3, 2, 1, 2), True, 2, (3, 4), 1, 1, "circular",
                                          torch.float32),
    "unbatched_1d_same_even_fp64": ((3, 9), (3, 3, 4), False, 1, "same", 1, 1, "zeros", torch.float64),
    "depthwise_3d_bf16": ((1, 2, 4, 4, 4), (2, 1, 2, 2, 2), True, 1, 1, 1, 2, "zeros", torch.bfloat16),
}


def op_arguments(case):
    """Arguments for each of the three ops, as ``lowered_conv`` would pass them, with
    ``requires_grad`` leaves so that the autograd registration is exercised."""
    x_shape, w_shape, has_bias, stride, padding, dilation, groups, mode, dtype = case
    torch.manual_seed(0)
    x = torch.randn(x_shape).to(dtype)
    weight = torch.randn(w_shape).to(dtype).requires_grad_()
    bias = torch.randn(w_shape[0]).to(dtype).requires_grad_() if has_bias else None
    g = conv_geometry(x, weight, stride, padding, dilation, mode)
    assert g.pre_pad is None
    if g.selection is not None:  # the ops see only the samples the conv reads
        x = select_read_samples(x, *selection_args(g, unread_mask(g)))
    fft, in_size = list(g.fft_size), list(g.in_size)
    x_hat = OPS.to_spectrum(x, in_size, fft)
    y_hat = OPS.spectral_mix(x_hat, weight.detach(), fft, list(g.dilation), list(g.shift), groups)
    return {
        "to_spectrum": (x.requires_grad_(), in_size, fft),
        "spectral_mix": (x_hat.requires_grad_(), weight, fft, list(g.dilation), list(g.shift), groups),
        "from_spectrum": (y_hat.requires_grad_(), fft, list(g.out_size), list(g.stride), bias, dtype),
        "lowered_conv": (x, weight, bias, in_size, fft, list(g.dilation), list(g.shift), groups,
                          list(g.out_size), list(g.stride), dtype),
    }


@pytest.mark.parametrize("op_name", ["to_spectrum", "spectral_mix", "from_spectrum", "lowered_conv"])
@pytest.mark.parametrize("case", sorted(OP_CASES))
def test_opcheck_passes(op_name, case):
    args = op_arguments(OP_CASES[case])[op_name]
    torch.library.opcheck(getattr(OPS, op_name), args)


@pytest.mark.parametrize("memory_format,rank", [(torch.channels_last, 2), (torch.channels_last_3d, 3)])
def test_opcheck_to_spectrum_channels_last(memory_format, rank):
    x = torch.randn(2, 3, *[5] * rank).to(memory_format=memory_format).requires_grad_()
    torch.library.opcheck(OPS.to_spectrum, (x, [5] * rank, [7] * rank))


def test_spectral_mix_output_is_contiguous_like_its_fake():
    """One image through one group: the GEMM result is a permuted view unless the op
    makes it contiguous, which is what its fake impl (and every traced graph) assumes."""
    x_hat = OPS.to_spectrum(torch.randn(1, 3, 8, 8), [8, 8], [10, 10])
    y_hat = OPS.spectral_mix(x_hat, torch.randn(4, 3, 3, 3), [10, 10], [1, 1], [1, 1], 1)
    assert y_hat.is_contiguous()


# --- gradcheck ---------------------------------------------------------------------------

# name: (input shape, weight shape, stride, padding, dilation, groups, padding_mode)
GRADCHECK_CASES = {
    "dense_2d": ((2, 2, 5, 4), (3, 2, 3, 2), 1, 1, 1, 1, "zeros"),
    "depthwise_2d": ((1, 2, 5, 5), (4, 1, 3, 3), 1, "same", 1, 2, "zeros"),
    "strided_dilated_2d": ((1, 2, 7, 6), (2, 2, 2, 3), (2, 3), (1, 2), (2, 1), 1, "zeros"),
    "circular_2d": ((1, 2, 4, 5), (2, 2, 3, 2), (1, 2), (2, 1), 1, 1, "circular"),
    "reflect_2d": ((1, 2, 5, 4), (2, 2, 3, 3), 1, "same", 1, 1, "reflect"),
    "replicate_1d_unbatched": ((2, 7), (3, 2, 4), 2, 2, 1, 1, "replicate"),
    "valid_1d": ((2, 3, 9), (2, 3, 4), 1, "valid", 2, 1, "zeros"),
    "grouped_3d": ((1, 2, 4, 3, 4), (2, 1, 2, 2, 3), 1, 1, 1, 2, "zeros"),
}


@pytest.mark.parametrize("case", sorted(GRADCHECK_CASES))
def test_gradcheck_spectral_conv_fp64(case):
    x_shape, w_shape, stride, padding, dilation, groups, mode = GRADCHECK_CASES[case]
    torch.manual_seed(0)
    x = torch.randn(x_shape, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(w_shape, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(w_shape[0], dtype=torch.float64, requires_grad=True)

    def conv(x, weight, bias):
        return specfx.spectral_conv(x, weight, bias, stride, padding, dilation, groups, mode)

    assert torch.autograd.gradcheck(conv, (x, weight, bias))


def test_gradcheck_ops_on_arbitrary_complex_spectra():
    """The hand-written adjoints hold for any complex spectrum, not only the Hermitian ones
    a real input produces (a fused chain may feed the ops other spectra)."""
    torch.manual_seed(0)
    fft = [6, 5]
    bins = [6, 3]
    y_hat = torch.randn(2, 3, *bins, dtype=torch.complex128, requires_grad=True)
    bias = torch.randn(3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda y, b: OPS.from_spectrum(y, fft, [3, 5], [2, 1], b, torch.float64), (y_hat, bias))

    for groups, c_in, c_out in [(1, 3, 2), (2, 4, 2), (3, 3, 6)]:
        x_hat = torch.randn(2, c_in, *bins, dtype=torch.complex128, requires_grad=True)
        weight = torch.randn(c_out, c_in // groups, 3, 2, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda x, w: OPS.spectral_mix(x, w, fft, [1, 2], [1, 1], groups), (x_hat, weight))

    x = torch.randn(2, 3, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: OPS.to_spectrum(x, [5, 4], fft), (x,))


# --- the weight-spectrum cache -----------------------------------------------------------

class CacheCounter:
    """Hits and misses of the global cache since construction."""

    def __init__(self):
        self.hits0, self.misses0 = SPECTRUM_CACHE.hits, SPECTRUM_CACHE.misses

    @property
    def hits(self):
        return SPECTRUM_CACHE.hits - self.hits0

    @property
    def misses(self):
        return SPECTRUM_CACHE.misses - self.misses0


def spectral_and_reference(x, weight, padding=1):
    return specfx.spectral_conv(x, weight, None, 1, padding), F.conv2d(x, weight, None, 1, padding)


def assert_conv_correct(x, weight):
    actual, expected = spectral_and_reference(x, weight)
    assert_scaled_close(actual, expected)


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 3, 8, 8)


@pytest.fixture
def param():
    torch.manual_seed(1)
    return torch.nn.Parameter(torch.randn(4, 3, 3, 3))


@pytest.fixture(params=[True, False], ids=["verify_contents", "versions_only"])
def cache_mode(request, monkeypatch):
    """The cache with its value check (the default) and without it, where only the
    version, storage, offset, shape and strides tell a changed weight."""
    monkeypatch.setattr(SPECTRUM_CACHE, "verify_contents", request.param)
    return request.param


def test_repeated_calls_with_same_weight_hit_cache(x, param, cache_mode):
    counter = CacheCounter()
    with torch.no_grad():
        results = [spectral_and_reference(x, param) for _ in range(3)]
    assert counter.misses == 1
    assert counter.hits == 2
    for actual, expected in results:
        assert_scaled_close(actual, expected)


def test_same_weight_at_two_input_sizes_is_cached_per_geometry(param):
    counter = CacheCounter()
    small, large = torch.randn(1, 3, 6, 6), torch.randn(1, 3, 9, 7)
    with torch.no_grad():
        for inp in (small, large, small, large):
            assert_conv_correct(inp, param)
    assert counter.misses == 2
    assert counter.hits == 2


def test_inplace_update_under_no_grad_gives_fresh_result(x, param, cache_mode):
    counter = CacheCounter()
    with torch.no_grad():
        before, _ = spectral_and_reference(x, param)
        param.add_(1)
        after, expected = spectral_and_reference(x, param)
    assert counter.misses == 2
    assert_scaled_close(after, expected)
    assert not torch.allclose(before, after)


def test_copy_into_weight_gives_fresh_result(x, param, cache_mode):
    with torch.no_grad():
        assert_conv_correct(x, param)
        param.copy_(torch.randn_like(param))
        assert_conv_correct(x, param)


def test_assigning_param_data_gives_fresh_result(x, param, cache_mode):
    assert_conv_correct(x, param)
    param.data = torch.randn(4, 3, 3, 3)
    assert_conv_correct(x, param)


def test_swapping_param_data_twice_between_calls_is_not_fooled_by_reused_address(x, param, cache_mode):
    """The second swap can place the new storage at the freed address the cached
    spectrum was computed from; the version does not change either."""
    assert_conv_correct(x, param)
    for _ in range(6):
        param.data = torch.randn(4, 3, 3, 3)
        param.data = torch.randn(4, 3, 3, 3)
        assert_conv_correct(x, param)


def test_param_data_swapped_to_a_view_of_the_same_storage_gives_fresh_result(cache_mode):
    """Same storage, same address, same version: only the strides differ."""
    torch.manual_seed(2)
    inp = torch.randn(1, 4, 7, 7)
    param = torch.nn.Parameter(torch.randn(4, 4, 3, 3))
    assert_conv_correct(inp, param)
    param.data = param.data.transpose(0, 1)
    assert_conv_correct(inp, param)


def test_param_data_swapped_to_another_dtype_gives_fresh_result(x, param, cache_mode):
    assert_conv_correct(x, param)
    param.data = param.data.double()
    actual, expected = spectral_and_reference(x.double(), param)
    assert actual.dtype == torch.float64
    assert_scaled_close(actual, expected)


@pytest.mark.parametrize("write", ["mul_", "copy_", "normal_"])
def test_writes_through_param_data_give_fresh_result(x, param, write):
    """``param.data`` is a tensor with its own version counter: writes through it leave
    ``param._version`` alone (torch.autograd.gradcheck perturbs its inputs this way)."""
    assert_conv_correct(x, param)
    version = param._version
    if write == "mul_":
        param.data.mul_(2)
    elif write == "copy_":
        param.data.copy_(torch.randn_like(param))
    else:
        param.data.normal_()
    assert param._version == version
    assert_conv_correct(x, param)


def test_optimizer_steps_between_calls_give_fresh_results(x, param, cache_mode):
    opt = torch.optim.SGD([param], lr=0.5)
    for _ in range(3):
        actual, expected = spectral_and_reference(x, param)
        assert_scaled_close(actual, expected.detach())
        opt.zero_grad()
        actual.square().sum().backward()
        opt.step()


def test_weight_computed_per_call_is_correct_and_gets_gradient(x):
    torch.manual_seed(3)
    base = torch.randn(4, 3, 3, 3, requires_grad=True)
    for scale in (1.0, -2.0, 0.5):
        weight = base * scale  # a new tensor every call
        actual, expected = spectral_and_reference(x, weight)
        assert_scaled_close(actual, expected)
        upstream = torch.randn_like(expected)
        (g,) = torch.autograd.grad(actual, base, upstream, retain_graph=True)
        (g_ref,) = torch.autograd.grad(expected, base, upstream)
        assert_scaled_close(g, g_ref)


def test_cache_does_not_keep_weight_alive(x):
    weight = torch.randn(4, 3, 3, 3)
    assert_conv_correct(x, weight)
    ref = weakref.ref(weight)
    del weight
    gc.collect()
    assert ref() is None


def test_inference_tensor_weights_are_correct_and_not_cached(x):
    counter = CacheCounter()
    with torch.inference_mode():
        weight = torch.randn(4, 3, 3, 3)
        inp = x.clone()
        assert weight.is_inference()
        assert_conv_correct(inp, weight)
        weight.mul_(-3)  # no version to see; only not caching keeps this correct
        assert_conv_correct(inp, weight)
    assert counter.hits == 0 and counter.misses == 0


def test_parameter_used_under_inference_mode_is_cached_and_fresh(x, param):
    counter = CacheCounter()
    with torch.inference_mode():
        assert_conv_correct(x, param)
        assert_conv_correct(x, param)
    assert counter.misses == 1 and counter.hits == 1
    with torch.no_grad():
        param.sub_(1)
    with torch.inference_mode():
        assert_conv_correct(x, param)
    assert counter.misses == 2


# --- planned size ------------------------------------------------------------------------

@pytest.mark.parametrize("shape,in_size,fft_size", [
    ((2, 3, 8, 8), [8, 9], [10, 10]),
    ((3, 12), [11], [16]),
    ((1, 2, 4, 4, 5), [4, 4, 4], [6, 6, 6]),
])
def test_to_spectrum_rejects_spatial_size_other_than_planned(shape, in_size, fft_size):
    x = torch.randn(shape)
    actual = list(shape[-len(fft_size):])
    with pytest.raises(ValueError, match="planned for spatial size") as info:
        OPS.to_spectrum(x, in_size, fft_size)
    assert str(in_size) in str(info.value) and str(actual) in str(info.value)


# --- the depthwise contraction -----------------------------------------------------------

class CallRecorder(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.called = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.called.add(getattr(func, "__name__", str(func)))
        return func(*args, **(kwargs or {}))


def reference_mix(x_hat, w_hat, groups):
    """``Y[n, o, f] = Σ_c X[n, group(o)·C_in/g + c, f] · W[o, c, f]``, written directly."""
    c_out, c_in_g = w_hat.shape[:2]
    outputs = []
    for o in range(c_out):
        first = (o // (c_out // groups)) * c_in_g
        outputs.append((x_hat[:, first:first + c_in_g] * w_hat[o]).sum(dim=1))
    return torch.stack(outputs, dim=1)


@pytest.mark.parametrize("c_in,c_out,groups,batch,path", [
    (3, 6, 3, 2, "accumulate"),   # depthwise, channel multiplier 2
    (4, 4, 4, 8, "accumulate"),   # depthwise, multiplier 1: elementwise at any batch
    (4, 6, 2, 2, "accumulate"),   # grouped, few channels per group
    (3, 5, 1, 2, "accumulate"),   # dense, few input channels
    (24, 6, 1, 2, "gemm"),        # dense, many input channels
    (48, 8, 2, 4, "gemm"),        # grouped, many input channels per group
])
def test_contraction_paths(c_in, c_out, groups, batch, path):
    """Depthwise convs are one elementwise product (no GEMM); wide contractions are one
    batched GEMM; both equal the contraction written out directly."""
    torch.manual_seed(0)
    bins = (5, 3)
    assert contraction.choose_path(c_in // groups, batch) == path
    x_hat = torch.randn(batch, c_in, *bins, dtype=torch.complex64)
    w_hat = torch.randn(c_out, c_in // groups, *bins, dtype=torch.complex64)
    laid = contraction.LAYOUTS[path](w_hat, groups)

    with CallRecorder() as recorder:
        y = contraction.mix(x_hat, laid, groups, len(bins), path)
    assert ("bmm" in recorder.called) == (path == "gemm")
    if c_in == groups:
        assert recorder.called.isdisjoint({"bmm", "matmul", "addcmul_"})
    assert_scaled_close(torch.view_as_real(y), torch.view_as_real(reference_mix(x_hat, w_hat, groups)))
