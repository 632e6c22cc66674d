"""Triton kernels of the spectral ops (GPU), registered as the ops' CUDA implementations.

Importing this package registers them when Triton is installed; without it nothing is
registered and the ops run their torch implementation on every device.

- :mod:`.mix`: the per-frequency channel contraction (GEMM and elementwise kernels);
- :mod:`.activation`: the fused exact and polynomial spectral activations on small grids;
- :mod:`.dft`: the DFT matrices those fused kernels multiply by;
- :mod:`.register`: the registration, and the switch that turns the kernels off.
"""

try:
    import triton  # noqa: F401
except ImportError:
    TRITON_AVAILABLE = False
else:
    TRITON_AVAILABLE = True
    from .register import triton_enabled, triton_kernels  # noqa: F401  (registers the kernels)
