"""Shared numerics for the tests.

An FFT convolution's rounding error is bounded in norm — about ``eps · log2(N)`` times the
output's scale — not per element: an output that cancels to nearly zero carries an error
of the scale's size, not its own. So results are compared with ``rtol=0`` and an
``atol`` that is a fixed multiple of the expected tensor's largest magnitude. The
multiples below are ~10x the worst error seen over thousands of random configurations
(fp32: 9e-7, fp64: 2e-15), and far below the error of a wrong result (order 1).
Half-precision results are compared with the fp32 computation rounded to that dtype: the
spectral ops compute in fp32, so they differ from it by the final rounding only.
"""

from __future__ import annotations

import os
import tempfile

import torch
from hypothesis import settings

# policy="auto" times close calls (specfx.close_calls) and keeps the timings on disk. The
# suite decides by the estimates alone, so that a test's decisions do not depend on the
# machine's load, and never reads or writes the user's timing cache; the tests of timing
# (tests/test_close_calls.py) set their own budget, timings and cache directory.
os.environ.setdefault("SPECFX_MEASURE_BUDGET_S", "0")
os.environ["SPECFX_CACHE_DIR"] = tempfile.mkdtemp(prefix="specfx-test-cache-")

# CI (which sets CI=true) draws the same examples every run, so a submission passes or
# fails on its own merits; local runs keep exploring new ones.
settings.register_profile("ci", derandomize=True, database=None)
if os.environ.get("CI"):
    settings.load_profile("ci")

def pytest_terminal_summary(terminalreporter) -> None:
    """The versions a run tested (pyproject accepts a range of torch releases), printed
    last, so that ``pytest -q`` shows it too."""
    import platform

    import specfx
    from specfx.ops.library import ROUTE

    terminalreporter.write_line(f"tested specfx {specfx.__version__} on torch {torch.__version__} "
                                f"(Python {platform.python_version()}), op route: {ROUTE}, "
                                f"threads: {torch.get_num_threads()}")


SCALED_TOLERANCE = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 2e-3,
    torch.bfloat16: 1.6e-2,
}


def assert_scaled_close(actual: torch.Tensor, expected: torch.Tensor, tol: float | None = None,
                        scale: float | None = None) -> None:
    """``actual`` equals ``expected`` up to ``tol`` times ``scale``: by default
    ``expected``'s largest magnitude. A sum that can cancel as a whole (a weight or bias
    gradient of one element sums products over the batch and every position) has an error
    of the size of its terms, not of the result: pass the terms' magnitude there."""
    tol = SCALED_TOLERANCE[expected.dtype] if tol is None else tol
    if scale is None:
        scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=tol * max(scale, 1e-30))


def term_scales(reference, inputs, upstream: torch.Tensor) -> list:
    """For each tensor of ``inputs`` (``None`` entries stay ``None``), the largest magnitude
    of the products its gradient through ``reference(*inputs)`` sums: the same gradient at
    the inputs' absolute values for ``|upstream|``, which cannot cancel. The scale to pass
    to :func:`assert_scaled_close` for gradients."""
    magnitudes = [None if t is None else t.detach().abs().requires_grad_() for t in inputs]
    present = [t for t in magnitudes if t is not None]
    grads = iter(torch.autograd.grad(reference(*magnitudes), present, upstream.abs()))
    return [None if t is None else next(grads).abs().max().item() for t in magnitudes]
