"""The Triton kernels (specfx/ops/triton) against the ops' torch implementations.

Without CUDA the kernels run on CPU tensors under Triton's interpreter; with CUDA they are
compiled and run on CUDA tensors, compared with the torch implementation on CPU. Every
comparison is at the fp32 tolerance of the other spectral tests (conftest).
"""

from __future__ import annotations

import contextlib
import os
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

import specfx  # noqa: E402,F401  (registers the ops)
from conftest import assert_scaled_close as _assert_real_close  # noqa: E402
from specfx.ops import activation_ops, contraction, fourier, spectral_ops  # noqa: E402

CUDA = torch.cuda.is_available()


# @triton.jit picks compiled or interpreted kernels when their module is imported; the
# variable is set for the import only, so nothing else in the session sees it.
with contextlib.nullcontext() if CUDA else mock.patch.dict(os.environ, TRITON_INTERPRET="1"):
    from specfx.ops.triton import activation as fused  # noqa: E402
    from specfx.ops.triton import mix, register  # noqa: E402

INTERPRETED = isinstance(mix._mix_gemm_kernel, InterpretedFunction)
DEVICES = [
    pytest.param("cpu", marks=pytest.mark.skipif(not INTERPRETED, reason="the kernels are compiled for CUDA in "
                                                 "this session; CPU tensors need TRITON_INTERPRET=1")),
    pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA device")),
]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None) -> None:
    """conftest's scaled check, on CPU copies, complex tensors as (real, imaginary) parts."""
    actual, expected = actual.cpu(), expected.cpu()
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    if expected.is_complex():
        actual, expected = torch.view_as_real(actual), torch.view_as_real(expected)
    _assert_real_close(actual, expected, tol)


def spectrum(batch: tuple[int, ...], fft: list[int], seed: int) -> torch.Tensor:
    """The spectrum of a unit-variance signal plus unit noise on every bin: the noise puts
    anti-Hermitian parts on the self-conjugate bins, which the ops must ignore."""
    g = torch.Generator().manual_seed(seed)
    signal = torch.randn(*batch, *fft, generator=g)
    return fourier.rfftn(signal, fft) + torch.randn(*batch, *fourier.rfft_bins(fft), dtype=torch.complex64,
                                                    generator=g)


def _vector(channels: int, present: bool, seed: int) -> torch.Tensor | None:
    return torch.randn(channels, generator=torch.Generator().manual_seed(seed)) if present else None


# --- spectral_mix --------------------------------------------------------------------------

def _check_mix(device: str, batch: int, groups: int, c_in_g: int, c_out_g: int, fft: list[int], path: str,
               kernel: str | None, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    bins = fourier.rfft_bins(fft)
    x_hat = torch.randn(batch, groups * c_in_g, *bins, dtype=torch.complex64, generator=g)
    w_hat = torch.randn(groups * c_out_g, c_in_g, *bins, dtype=torch.complex64, generator=g)
    laid = contraction.LAYOUTS[path](w_hat, groups)
    expected = contraction.mix(x_hat, laid, groups, len(fft), path)
    actual = mix.spectral_mix(x_hat.to(device), contraction.group_view(laid.to(device), groups, path),
                              groups, len(fft), kernel=kernel)
    assert actual.is_contiguous()
    assert_close(actual, expected)


@st.composite
def mix_configs(draw):
    rank = draw(st.integers(1, 2))
    return dict(batch=draw(st.integers(1, 4)), groups=draw(st.integers(1, 3)), c_in_g=draw(st.integers(1, 20)),
                c_out_g=draw(st.integers(1, 20)), fft=[draw(st.integers(1, 10)) for _ in range(rank)],
                path=draw(st.sampled_from([contraction.ACCUMULATE, contraction.GEMM])),
                kernel=draw(st.sampled_from([None, "gemm", "elementwise"])), seed=draw(st.integers(0, 2**16)))


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12, deadline=None)
@given(cfg=mix_configs())
def test_triton_mix_generated_configurations(device, cfg):
    _check_mix(device, **cfg)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("batch, groups, c_in_g, c_out_g, fft, path, kernel", [
    (3, 6, 1, 1, [9, 7], "accumulate", None),  # depthwise, odd grid
    (2, 4, 1, 3, [13], "accumulate", None),  # depthwise with a channel multiplier, 1D
    (5, 1, 17, 19, [6, 10], "gemm", None),  # dense GEMM, nothing a power of two
    (2, 2, 16, 16, [5, 4], "accumulate", "gemm"),  # grouped GEMM on the accumulate layout
    (1, 1, 33, 2, [12], "gemm", "gemm"),  # K over two dot tiles, N mostly padding
    (4, 3, 5, 7, [3, 3], "gemm", "elementwise"),  # small groups, strided weight view
])
def test_triton_mix_kernel_edge_cases(device, batch, groups, c_in_g, c_out_g, fft, path, kernel):
    _check_mix(device, batch, groups, c_in_g, c_out_g, fft, path, kernel, seed=batch + groups)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_mix_kernel_unbatched_spectrum(device):
    g = torch.Generator().manual_seed(3)
    x_hat = torch.randn(4, 6, 4, dtype=torch.complex64, generator=g)
    laid = contraction.layout_accumulate(torch.randn(4, 2, 6, 4, dtype=torch.complex64, generator=g), 2)
    expected = contraction.mix(x_hat, laid, 2, 2, contraction.ACCUMULATE)
    assert_close(mix.spectral_mix(x_hat.to(device), laid.to(device), 2, 2), expected)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_mix_precision_error_is_reported(device):
    g = torch.Generator().manual_seed(4)
    x_hat = torch.randn(8, 32, 6, 4, dtype=torch.complex64, generator=g).to(device)
    w = torch.randn(1, 24, 32, 24, dtype=torch.complex64, generator=g).to(device)
    assert mix.fast_path_error(x_hat, w, 1, 2, "fp32") == 0.0
    assert_close(mix.spectral_mix(x_hat, w, 1, 2, "fp32", kernel="gemm"),
                 contraction.mix(x_hat.cpu(), w.cpu(), 1, 2, contraction.ACCUMULATE))
    tf32 = mix.fast_path_error(x_hat, w, 1, 2, "tf32")
    assert 0.0 <= tf32 < 1e-2
    if device == "cpu":
        with pytest.raises(ValueError, match="interpreter has no bf16"):
            mix.fast_path_error(x_hat, w, 1, 2, "bf16")
    else:
        assert 0.0 < mix.fast_path_error(x_hat, w, 1, 2, "bf16") < 5e-2


def test_triton_mix_kernel_rejects_bad_arguments():
    x_hat = torch.randn(2, 4, 5, dtype=torch.complex64)
    w = torch.randn(1, 3, 4, 5, dtype=torch.complex64)
    with pytest.raises(ValueError, match="precision must be one of"):
        mix.spectral_mix(x_hat, w, 1, 1, precision="fp8")
    with pytest.raises(TypeError, match="complex64"):
        mix.spectral_mix(x_hat.to(torch.complex128), w, 1, 1)
    with pytest.raises(ValueError, match="does not match"):
        mix.spectral_mix(x_hat, w[..., :4], 1, 1)


# --- the fused activations -----------------------------------------------------------------

@st.composite
def grid_configs(draw):
    rank = draw(st.integers(1, 2))
    fft = [draw(st.integers(1, fused.MAX_FUSED_SIZE)) for _ in range(rank)]
    return dict(fft=fft, size=[draw(st.integers(1, p)) for p in fft], batch=draw(st.integers(1, 2)),
                channels=draw(st.integers(1, 3)), affine=draw(st.booleans()), seed=draw(st.integers(0, 2**16)))


def _activation_case(cfg):
    x_hat = spectrum((cfg["batch"], cfg["channels"]), cfg["fft"], cfg["seed"])
    scale = _vector(cfg["channels"], cfg["affine"], cfg["seed"] + 1)
    shift = _vector(cfg["channels"], cfg["affine"], cfg["seed"] + 2)
    return x_hat, scale, shift


def _check_activation(device, fft, size, x_hat, scale, shift, activation, slope=0.1):
    expected = activation_ops.spectral_activation(x_hat, fft, size, scale, shift, activation, slope)
    to = (lambda v: None if v is None else v.to(device))
    actual = fused.spectral_activation(x_hat.to(device), fft, size, to(scale), to(shift), activation, slope)
    assert_close(actual, expected)


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12, deadline=None)
@given(cfg=grid_configs(), activation=st.sampled_from(activation_ops.ACTIVATIONS))
def test_triton_spectral_activation_generated_configurations(device, cfg, activation):
    x_hat, scale, shift = _activation_case(cfg)
    _check_activation(device, cfg["fft"], cfg["size"], x_hat, scale, shift, activation)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("activation", activation_ops.ACTIVATIONS)
@pytest.mark.parametrize("fft, size", [([13], [9]), ([64], [64]), ([9, 15], [9, 15]), ([64, 64], [60, 57]),
                                       ([6, 1], [4, 1]), ([1, 12], [1, 7])])
def test_triton_spectral_activation_kernel_each_activation(device, activation, fft, size):
    cfg = dict(fft=fft, size=size, batch=2, channels=3, affine=True, seed=len(activation) + sum(fft))
    x_hat, scale, shift = _activation_case(cfg)
    _check_activation(device, fft, size, x_hat, scale, shift, activation, slope=0.2)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_spectral_activation_kernel_one_element_affine(device):
    x_hat = spectrum((2, 3), [10, 8], seed=5)
    _check_activation(device, [10, 8], [7, 6], x_hat, torch.tensor([1.5]), torch.tensor([-0.25]), "silu")


@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=12, deadline=None)
@given(cfg=grid_configs(), degree=st.integers(0, 3), mask_input=st.booleans(), shared=st.booleans())
def test_triton_poly_activation_generated_configurations(device, cfg, degree, mask_input, shared):
    x_hat, scale, shift = _activation_case(cfg)
    g = torch.Generator().manual_seed(cfg["seed"] + 3)
    coeffs = torch.randn(1 if shared else cfg["channels"], degree + 1, generator=g)
    fft, size = cfg["fft"], cfg["size"]
    # (a degree-0 reference is the constant's spectrum alone, without the batch dims)
    expected = activation_ops.poly_reference(x_hat, coeffs, fft, size, scale, shift, mask_input).expand(x_hat.shape)
    to = (lambda v: None if v is None else v.to(device))
    actual = fused.poly_activation(x_hat.to(device), coeffs.to(device), fft, size, to(scale), to(shift), mask_input)
    assert_close(actual, expected)


def test_triton_fused_kernel_rejects_large_grids():
    assert fused.not_supported_reasons(torch.zeros(1, 33, dtype=torch.complex64), [65]) == [
        "grid [65]: the fused kernels take at most 64 per axis"]
    assert fused.not_supported_reasons(torch.zeros(1, 3, dtype=torch.complex128), [4]) == [
        "the spectrum is torch.complex128, not complex64"]
    assert fused.not_supported_reasons(torch.zeros(1, 3, dtype=torch.complex64), [4]) == []
    with pytest.raises(ValueError, match="at most 64 per axis"):
        fused.spectral_activation(torch.zeros(1, 33, dtype=torch.complex64), [65], [65], None, None, "relu", 0.0)


# --- registration ----------------------------------------------------------------------------

@pytest.mark.parametrize("op", ["spectral_mix", "spectral_activation", "poly_activation"])
def test_triton_kernels_registered_for_cuda(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"specfx::{op}", "CUDA")
    assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"specfx::{op}", "CPU")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("groups, c_in, c_out, batch", [(1, 20, 24, 3), (8, 8, 8, 2), (2, 4, 6, 1)])
def test_triton_kernel_spectral_mix_registration_uses_cached_spectrum(device, groups, c_in, c_out, batch):
    """The CUDA implementation (called directly) reads the weight spectrum the op caches,
    on whichever contraction path the op takes."""
    fft, k = [12, 10], 5
    weight = torch.randn(c_out, c_in // groups, k, k)
    x_hat = spectrum((batch, c_in), fft, seed=6)
    args = (fft, [1, 1], [2, 2], groups)
    expected = spectral_ops.spectral_mix(x_hat, weight, *args)
    actual = register.spectral_mix_cuda(x_hat.to(device), weight.to(device), *args)
    assert_close(actual, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_triton_kernel_registrations_fall_back_outside_their_cover(device, monkeypatch):
    """Grids over 64, complex128 spectra, and the switched-off kernels run the op's own
    implementation."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Triton kernel ran outside its cover")

    x_big = spectrum((1, 2), [70], seed=7).to(device)
    x_small = spectrum((1, 2), [16, 16], seed=8).to(device)
    coeffs = torch.randn(2, 3, device=device)
    with monkeypatch.context() as m:
        m.setattr(fused, "spectral_activation", refuse)
        m.setattr(fused, "poly_activation", refuse)
        m.setattr(mix, "spectral_mix", refuse)
        assert_close(register.spectral_activation_cuda(x_big, [70], [60], None, None, "gelu", 0.0),
                     activation_ops.spectral_activation(x_big.cpu(), [70], [60], None, None, "gelu", 0.0))
        assert_close(register.poly_activation_cuda(x_big, coeffs, [70], [60], None, None, False),
                     activation_ops.poly_activation(x_big.cpu(), coeffs.cpu(), [70], [60], None, None, False))
        x64 = x_small.to(torch.complex128)
        assert_close(register.spectral_activation_cuda(x64, [16, 16], [9, 9], None, None, "relu", 0.0),
                     activation_ops.spectral_activation(x64.cpu(), [16, 16], [9, 9], None, None, "relu", 0.0))
        weight = torch.randn(2, 2, 3, 3, device=device)
        with register.triton_kernels(False):
            assert not register.triton_enabled()
            assert_close(register.spectral_mix_cuda(x_small, weight, [16, 16], [1, 1], [1, 1], 1),
                         spectral_ops.spectral_mix(x_small.cpu(), weight.cpu(), [16, 16], [1, 1], [1, 1], 1))
        assert register.triton_enabled()


@pytest.mark.skipif(not CUDA, reason="no CUDA device")
def test_triton_kernels_run_in_an_optimized_cuda_model():
    """conv -> ReLU -> conv on a small grid, lowered and fused: on CUDA the ops dispatch to
    the Triton kernels, and the result is the eager model's."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 9, padding=4), torch.nn.ReLU(),
                                torch.nn.Conv2d(16, 16, 9, padding=4)).cuda().eval()
    x = torch.randn(2, 16, 24, 24, device="cuda")
    fast = specfx.optimize(model, (x,), policy="always")
    assert [c.fused for c in fast.specfx_report.chains] == [True]
    with torch.no_grad():
        assert_close(fast(x), model(x), tol=1e-4)


def test_triton_mix_support_check_gives_reasons():
    x64, x128 = torch.zeros(1, 2, 3, dtype=torch.complex64), torch.zeros(1, 2, 3, dtype=torch.complex128)
    assert register.mix_not_supported_reasons(x64, torch.zeros(2, 2, 3)) == []
    assert register.mix_not_supported_reasons(x128, torch.zeros(2, 2, 3, dtype=torch.float64)) == [
        "the spectrum is torch.complex128, not complex64", "the weight is torch.float64, which computes in float64"]


def test_report_says_which_implementation_each_op_runs():
    """The last pass names each spectral op's implementation for the inputs' device; on
    CUDA the ops with Triton kernels run them unless those are switched off."""
    from specfx.ops import implementations

    model = torch.nn.Sequential(torch.nn.Conv1d(3, 4, 31, padding=15), torch.nn.ReLU())
    report = specfx.optimize(model, (torch.randn(2, 3, 64),), policy="always").specfx_report
    assert report.implementations == {"lowered_conv": "torch (CPU)"}
    assert "implementations: lowered_conv torch (CPU)" in str(report)
    cuda = torch.device("cuda")
    assert implementations(["spectral_mix", "to_spectrum"], cuda) == {"spectral_mix": "triton",
                                                                     "to_spectrum": "torch (CUDA)"}
    with register.triton_kernels(False):
        assert implementations(["spectral_mix"], cuda) == {
            "spectral_mix": "torch (CUDA, triton unavailable: switched off (specfx.ops.triton.triton_kernels(False)))"}


# --- the GPU cost profile --------------------------------------------------------------------

@pytest.mark.parametrize("groups, k, size, lowered", [(64, 31, 32, True), (64, 7, 14, False), (1, 3, 32, False),
                                                      (1, 15, 32, False)])
def test_gpu_cost_profile_lowers_large_depthwise_kernels(groups, k, size, lowered):
    """With the CUDA defaults, cuDNN keeps small and dense kernels (TF32 tensor cores) and
    the FFT takes large depthwise ones."""
    from specfx.cost_model import profile_for_device
    from specfx.gpu_costs import CUDA_PROFILE

    assert profile_for_device("cuda:0") is CUDA_PROFILE and profile_for_device("cpu") is not CUDA_PROFILE
    conv = torch.nn.Conv2d(64, 64, k, padding=k // 2, groups=groups)
    report = specfx.explain(conv, (torch.randn(2, 64, size, size),), profile=CUDA_PROFILE)
    assert bool(report.lowered) == lowered, report.decisions[0].cost.summary()
