"""The rates planning reads, and the rules measured from them: no kernels.

- :class:`CostProfile`: sustained rates of the kernels each path runs on, saved and loaded
  as JSON (``python -m specfx.calibrate`` measures them; :mod:`specfx.gpu_costs` holds the
  CUDA defaults);
- :func:`choose_path`: which channel contraction a spectral conv runs (measured crossover);
- :data:`MMAP_CEILING_BYTES`: where fresh allocations start costing page faults.

Both the planner (:mod:`specfx.cost_model`) and the kernels (:mod:`specfx.ops`) read these,
so this module imports neither: planning a model registers no operator.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Union

# 3D direct rates, in the scale of the 2D defaults below (one 2-core x86 CPU): MedNeXt's
# depthwise 7x7x7 conv on (1, 16, 32, 32, 32) ran at 118 GF/s there. On a second 2-core
# x86 CPU, timed side by side, a dense 16->16 5x5x5 conv ran at the rate of a dense 2D 5x5
# conv (1.0x) and the depthwise 7x7x7 at 1.85x the 2D depthwise 7x7 rate; a dense 3x3x3
# conv fell to 6 GF/s there (a slow path): close calls are timed (specfx.close_calls).
DENSE_3D_GFLOPS = 160.0
DEPTHWISE_3D_GFLOPS = 120.0


@dataclasses.dataclass(frozen=True)
class CostProfile:
    """Sustained rates of the kernels each path runs on, in GFLOP/s or GB/s.

    Depthwise direct convs run on a fast kernel up to ``depthwise_fast_max_kernel`` and on
    a slow path above it (oneDNN's cliff: k ≤ 9 here, k ≤ 13 on other CPUs); channels-last
    inputs keep a fast kernel at every size. Dense direct kernels compute
    ``direct_channel_block`` output channels at a time (two AVX2 registers of 8 floats in
    oneDNN), so a group with fewer output channels leaves part of each block idle: 8→8
    convs ran at 62–72 GF/s here against 140–180 for 16 or more output channels. 3D direct
    convs have rates of their own (``dense_direct_3d_gflops``, ``depthwise_3d_gflops``):
    oneDNN's 3D depthwise kernel has no cliff in the sizes networks use and ran MedNeXt's
    7x7x7 four times faster than the 2D fast rate here. Which convs those rates decide
    alone, and which are timed, is :mod:`specfx.close_calls`' business.
    ``fresh_page_ms_per_mib`` is the cost of first touching newly mapped memory (see
    :func:`fresh_pages_ms`). ``per_op_overhead_ms`` is the fixed cost of one spectral op
    call (a chain's ops), ``conv_overhead_ms`` that of one lowered conv outside a chain
    (one ``lowered_conv`` call running three ops' worth of Python: 0.16–0.20 ms here on a
    tiny input, against 0.035–0.04 ms for one ``to_spectrum``).
    """

    dense_direct_gflops: float = 160.0
    direct_channel_block: int = 16
    depthwise_fast_gflops: float = 70.0
    depthwise_fast_max_kernel: int = 9
    depthwise_slow_gflops: float = 4.7
    depthwise_channels_last_gflops: float = 60.0
    dense_direct_3d_gflops: float = DENSE_3D_GFLOPS
    depthwise_3d_gflops: float = DEPTHWISE_3D_GFLOPS
    fft_gflops: float = 27.0
    inverse_fft_gflops: float = 20.0
    complex_gemm_gflops: float = 64.0
    memory_gbps: float = 34.0
    per_op_overhead_ms: float = 0.06
    conv_overhead_ms: float = 0.18
    fresh_page_ms_per_mib: float = 0.45

    def save(self, path: Union[str, Path, None] = None) -> Path:
        """Write the profile as JSON (to :func:`default_profile_path` by default)."""
        target = Path(path) if path is not None else default_profile_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return target

    @classmethod
    def load(cls, path: Union[str, Path, None] = None) -> "CostProfile":
        """The profile saved at ``path`` (or the default path); the built-in defaults when
        no file is there. Unknown keys in the file are an error, not silently dropped."""
        source = Path(path) if path is not None else default_profile_path()
        if not source.is_file():
            if path is not None:
                raise FileNotFoundError(f"no cost profile at {source}")
            return cls()
        values = json.loads(source.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"cost profile {source} has unknown keys {sorted(unknown)}")
        return cls(**values)


def default_profile_path() -> Path:
    """``$SPECFX_PROFILE``, else ``~/.cache/specfx/profile.json``."""
    env = os.environ.get("SPECFX_PROFILE")
    return Path(env) if env else Path.home() / ".cache" / "specfx" / "profile.json"


DEFAULT_PROFILE = CostProfile()


# glibc maps allocations above its mmap threshold afresh on every call (page faults on
# first touch) and the threshold never rises above 32 MiB; smaller temporaries are reused
# from the heap once a model runs (see specfx.measure.settle_allocator).
MMAP_CEILING_BYTES = 32 << 20


ACCUMULATE, GEMM = "accumulate", "gemm"


def choose_path(in_channels_per_group: int, batch: int) -> str:
    """The contraction path of a spectral conv (:mod:`specfx.ops.contraction`):
    accumulate for small contractions (measured on a 2-core x86 CPU: it wins up to 8
    input channels per group, and up to 16 at batch ≤ 2), GEMM otherwise."""
    small = in_channels_per_group <= 8 or (in_channels_per_group <= 16 and batch <= 2)
    return ACCUMULATE if small else GEMM
