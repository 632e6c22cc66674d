"""The chain ops (specfx/ops/activation_ops.py): registration (opcheck), values against
spatial references, exact adjoints (gradcheck), and the polynomial fit."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import specfx  # noqa: F401  (registers the ops)
from conftest import assert_scaled_close as _assert_real_close
from specfx.chains import poly as chains
from specfx.ops import activation_ops as A
from specfx.ops import fourier

OPS = torch.ops.specfx

# name: (fft_size, size, channels)
GRIDS = {"2d_odd_last": ([6, 5], [4, 3], 3), "2d_even_last": ([7, 8], [5, 8], 2), "1d": ([9], [6], 2)}


def assert_scaled_close(actual, expected, tol=None):
    """conftest's check, on complex tensors as their (real, imaginary) parts."""
    if expected.is_complex():
        actual, expected = torch.view_as_real(actual.resolve_conj()), torch.view_as_real(expected.resolve_conj())
    _assert_real_close(actual, expected, tol)


def spectrum(fft, channels, dtype=torch.complex128, batch=2, seed=0):
    """An arbitrary complex one-sided spectrum (not only the Hermitian ones real signals give)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, *fourier.rfft_bins(fft), dtype=dtype, generator=g)


def vectors(channels, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(channels, dtype=dtype, generator=g), torch.randn(channels, dtype=dtype, generator=g)


def spatial_activation(x_hat, fft, size, scale, shift, activation, slope=0.1):
    rank = len(fft)
    x = fourier.irfftn(x_hat, fft)
    for axis, n in enumerate(size):
        x = x.narrow(x.dim() - rank + axis, 0, n)
    view = (-1,) + (1,) * rank
    u = x * scale.reshape(view) + shift.reshape(view)
    a = chains.activation_fn(activation, slope)(u)
    return fourier.rfftn(a, fft)


# --- opcheck -------------------------------------------------------------------------------

def _opcheck_cases():
    fft, size, c = [6, 5], [4, 4], 3
    x = spectrum(fft, c, torch.complex64).requires_grad_()
    s, b = (v.float().requires_grad_() for v in vectors(c))
    coeffs = torch.randn(c, 3)
    return {
        "activation_gelu": (OPS.spectral_activation, (x, fft, size, s, b, "gelu", 0.0)),
        "activation_relu_no_affine": (OPS.spectral_activation, (x, fft, size, None, None, "relu", 0.0)),
        "affine": (OPS.spectral_affine, (x, fft, size, s, b)),
        "affine_shift_only": (OPS.spectral_affine, (x, fft, size, None, b)),
        "add": (OPS.spectral_add, (x, x.detach().clone().requires_grad_())),
        "poly_masked": (OPS.poly_activation, (x, coeffs, fft, size, s, b, True)),
        "poly_plain": (OPS.poly_activation, (x, coeffs, fft, size, None, None, False)),
    }


@pytest.mark.parametrize("case", sorted(_opcheck_cases()))
def test_opcheck(case):
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# --- values --------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_full_spectrum_is_the_spectrum_irfftn_reads(grid):
    fft, _, c = GRIDS[grid]
    x_hat = spectrum(fft, c)
    full = A.full_spectrum(x_hat, fft)
    expected = torch.fft.fftn(fourier.irfftn(x_hat, fft), dim=fourier.spatial_dims(len(fft)))
    assert_scaled_close(full, expected.reshape(full.shape).to(full.dtype))


def test_circular_convolve_is_the_product_theorem():
    """(1/N)·A ⊛ B = F{a·b}."""
    fft = [5, 6]
    a, b = (torch.randn(2, 3, *fft, dtype=torch.float64) for _ in range(2))
    a_full = torch.fft.fftn(a, dim=(-2, -1)).reshape(2, 3, -1)
    b_full = torch.fft.fftn(b, dim=(-2, -1)).reshape(2, 3, -1)
    got = A.circular_convolve(a_full, b_full, fft, one_sided=True) / 30
    assert_scaled_close(got.reshape(2, 3, 5, 4), torch.fft.rfftn(a * b, dim=(-2, -1)))


@pytest.mark.parametrize("activation", A.ACTIVATIONS)
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_spectral_activation_matches_spatial(grid, activation):
    fft, size, c = GRIDS[grid]
    x_hat = spectrum(fft, c)
    s, b = vectors(c)
    got = OPS.spectral_activation(x_hat, fft, size, s, b, activation, 0.1)
    assert_scaled_close(got, spatial_activation(x_hat, fft, size, s, b, activation))


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_spectral_activation_identity_is_the_mask(dtype):
    fft, size = [8, 6], [5, 4]
    x_hat = spectrum(fft, 2, dtype)
    x = fourier.irfftn(x_hat, fft)
    mask = torch.zeros_like(x)
    mask[..., :5, :4] = 1
    got = OPS.spectral_activation(x_hat, fft, size, None, None, "identity", 0.0)
    assert got.dtype == dtype
    assert_scaled_close(got, fourier.rfftn(x * mask, fft))


@pytest.mark.parametrize("mask_input", [False, True])
@pytest.mark.parametrize("degree", [1, 2, 3])
@pytest.mark.parametrize("grid", sorted(GRIDS))
def test_poly_activation_matches_spatial_polynomial(grid, degree, mask_input):
    fft, size, c = GRIDS[grid]
    x_hat = spectrum(fft, c)
    s, b = vectors(c)
    coeffs = torch.randn(c, degree + 1, dtype=torch.float64)
    got = OPS.poly_activation(x_hat, coeffs, fft, size, s, b, mask_input)
    assert_scaled_close(got, A.poly_reference(x_hat, coeffs, fft, size, s, b, mask_input))


def test_poly_activation_of_clean_input_is_the_fourier_domain_formula():
    """a·F{m} + b·X + (c/N)·X ⊛ X, and the square of a masked signal, masked."""
    fft, size = [6, 6], [4, 5]
    x = torch.zeros(1, 2, *fft, dtype=torch.float64)
    x[..., :4, :5] = torch.randn(1, 2, 4, 5, dtype=torch.float64)
    x_hat = fourier.rfftn(x, fft)
    coeffs = torch.tensor([[0.5, -1.0, 2.0], [0.0, 0.0, 1.0]], dtype=torch.float64)
    got = OPS.poly_activation(x_hat, coeffs, fft, size, None, None, False)
    m = torch.zeros(fft, dtype=torch.float64)
    m[:4, :5] = 1
    view = (1, 2, 1, 1)
    expected = fourier.rfftn(coeffs[:, 0].reshape(view) * m + coeffs[:, 1].reshape(view) * x
                             + coeffs[:, 2].reshape(view) * x * x, fft)
    assert_scaled_close(got, expected)


def test_spectral_affine_and_add():
    fft, size, c = [6, 5], [4, 3], 3
    x_hat, y_hat = spectrum(fft, c), spectrum(fft, c, seed=5)
    s, b = vectors(c)
    m = torch.zeros(fft, dtype=torch.float64)
    m[:4, :3] = 1
    expected = x_hat * s.reshape(-1, 1, 1) + b.reshape(-1, 1, 1) * fourier.rfftn(m, fft)
    assert_scaled_close(OPS.spectral_affine(x_hat, fft, size, s, b), expected)
    assert_scaled_close(OPS.spectral_add(x_hat, y_hat), x_hat + y_hat)


def test_ops_accept_parameters_on_another_device_or_dtype():
    """Scale and shift are cast to the spectrum's real dtype (a float32 BatchNorm in an
    fp64 chain, or a per-channel constant kept as a buffer)."""
    fft, size = [6, 5], [4, 3]
    x_hat = spectrum(fft, 2)
    s, b = vectors(2, torch.float32)
    got = OPS.spectral_activation(x_hat, fft, size, s, b, "silu", 0.0)
    assert got.dtype == torch.complex128
    assert_scaled_close(got, spatial_activation(x_hat, fft, size, s.double(), b.double(), "silu"), tol=1e-6)


def test_unknown_activation_raises():
    with pytest.raises(ValueError, match="unknown activation 'tanh'"):
        OPS.spectral_activation(spectrum([6, 5], 1), [6, 5], [4, 3], None, None, "tanh", 0.0)


# --- gradients -----------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "silu", "square", "identity", "relu", "leaky_relu"])
def test_gradcheck_spectral_activation(activation):
    fft, size, c = [5, 4], [4, 3], 2
    x_hat = spectrum(fft, c, batch=1).requires_grad_()
    s, b = (v.requires_grad_() for v in vectors(c))
    # ReLU's kink: gradcheck's finite differences are fine away from 0, which random data is
    assert torch.autograd.gradcheck(
        lambda x, s, b: OPS.spectral_activation(x, fft, size, s, b, activation, 0.1), (x_hat, s, b))


@pytest.mark.parametrize("mask_input", [False, True])
@pytest.mark.parametrize("fft,size,c", [([4, 4], [3, 2], 2), ([9], [6], 2)])
def test_gradcheck_poly_activation(fft, size, c, mask_input):
    x_hat = spectrum(fft, c, batch=1).requires_grad_()
    s, b = (v.requires_grad_() for v in vectors(c))
    coeffs = torch.randn(c, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda x, s, b: OPS.poly_activation(x, coeffs, fft, size, s, b, mask_input), (x_hat, s, b))


def test_gradcheck_affine_and_add():
    fft, size, c = [5, 6], [3, 4], 2
    x_hat, y_hat = spectrum(fft, c, batch=1).requires_grad_(), spectrum(fft, c, batch=1, seed=3).requires_grad_()
    s, b = (v.requires_grad_() for v in vectors(c))
    assert torch.autograd.gradcheck(lambda x, s, b: OPS.spectral_affine(x, fft, size, s, b), (x_hat, s, b))
    assert torch.autograd.gradcheck(lambda x, y: OPS.spectral_add(x, y), (x_hat, y_hat))


def test_gradgradcheck_spectral_activation():
    fft, size = [6], [4]
    x_hat = spectrum(fft, 2, batch=1).requires_grad_()
    assert torch.autograd.gradgradcheck(
        lambda x: OPS.spectral_activation(x, fft, size, None, None, "gelu", 0.0), (x_hat,))


# --- polynomial fit ------------------------------------------------------------------------

def test_fit_poly_is_exact_on_the_square_and_reports_the_true_error():
    u = torch.randn(4, 3, 10, 10, dtype=torch.float64) * 2 + 0.5
    coeffs, error = chains.fit_poly(u, "square", 0.0, 2, rank=2)
    assert error == 0.0 and coeffs.tolist() == [[0.0, 0.0, 1.0]] * 3
    coeffs, error = chains.fit_poly(u, "relu", 0.0, 2, rank=2)
    assert coeffs.shape == (3, 3)
    fitted = sum(coeffs[:, i].reshape(1, 3, 1, 1) * u ** i for i in range(3))
    measured = (fitted - F.relu(u)).abs().max() / F.relu(u).abs().max()
    assert error == pytest.approx(measured.item(), rel=1e-9)
    assert 0.02 < error < 0.5  # a quadratic is a rough ReLU
    # a polynomial of degree ≤ the fit's is recovered
    coeffs, error = chains.fit_poly(u, "identity", 0.0, 3, rank=2)
    assert error < 1e-10


@pytest.mark.parametrize("activation", ["relu", "gelu", "silu"])
def test_spectral_activation_in_row_blocks(monkeypatch, activation):
    """Large tensors run in blocks of rows (per-channel scale and shift repeated per row)."""
    fft, size = [8, 8], [6, 7]
    x_hat = spectrum(fft, 4, batch=3)
    s, b = vectors(4)
    whole = OPS.spectral_activation(x_hat, fft, size, s, b[:1], activation, 0.0)
    monkeypatch.setattr(fourier, "BLOCK_BYTES", 2000)
    assert len(fourier.row_blocks(12, fft, 8)) > 1
    assert_scaled_close(OPS.spectral_activation(x_hat, fft, size, s, b[:1], activation, 0.0), whole)
    assert_scaled_close(whole, spatial_activation(x_hat, fft, size, s, b[:1].expand(4), activation))
