"""Default cost-model rates for convolutions on CUDA GPUs.

The CPU rates of :class:`specfx.rates.CostProfile` were measured; these are defaults, not
measurements: round figures for an H100-class GPU (HBM3 at ~3.3 TB/s peak), vendor peaks
derated to what such kernels typically sustain. Measure on the target GPU
(``benchmarks/gpu.py``) before relying on a close decision.

- Direct convs run on cuDNN. Dense ones use TF32 tensor cores (PyTorch's default for
  convolutions, ``torch.backends.cudnn.allow_tf32``). Depthwise ones are memory-bound up
  to k = 7 and fall to generic, far slower kernels above it: the gap that large-kernel
  depthwise networks (RepLKNet) wrote their own kernels for.
- Transforms are cuFFT, memory-bound at these sizes (~0.3·log2 N flops per byte).
- The channel contraction is the Triton GEMM of :mod:`specfx.ops.triton.mix` in IEEE fp32,
  on CUDA cores (no tensor cores).
- Launches cost microseconds, not the CPU's tens of them; the CUDA caching allocator
  reuses device memory, so fresh allocations cost no page faults.

``specfx.optimize``, ``explain`` and the torch.compile backend use it when the example
inputs are on a CUDA device and no ``profile=`` is given
(:func:`specfx.cost_model.profile_for_device`).
"""

from __future__ import annotations

from .rates import CostProfile

CUDA_PROFILE = CostProfile(
    dense_direct_gflops=150_000.0,
    depthwise_fast_gflops=4_000.0,
    depthwise_fast_max_kernel=7,
    depthwise_slow_gflops=1_500.0,
    depthwise_channels_last_gflops=4_000.0,
    fft_gflops=8_000.0,
    inverse_fft_gflops=8_000.0,
    complex_gemm_gflops=20_000.0,
    memory_gbps=2_500.0,
    per_op_overhead_ms=0.015,
    conv_overhead_ms=0.045,
    fresh_page_ms_per_mib=0.0,
)
