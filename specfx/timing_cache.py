"""Timings of close calls kept on disk, per machine, so that a model is timed once.

``policy="auto"`` times the convs and chains whose estimated speed-up is too close to
call (:mod:`specfx.close_calls`). What it measures holds for this machine only: the file
is named after a hash of :func:`machine_signature` (CPU model, logical cores, torch's
thread count, torch and specfx versions, the GPU's name for CUDA work), so another
machine, another torch or another specfx release reads another file and measures afresh.
Entries are keyed by what decides the time: the op's shapes, dtype, arguments and FFT
plan (never the weights' values).

The directory is ``$SPECFX_CACHE_DIR``, else ``~/.cache/specfx``. Writes go to a
temporary file renamed over the old one, after merging what other processes wrote
meanwhile; an unwritable directory leaves the timings in memory for this process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import threading
from pathlib import Path
from typing import Optional, Union

import torch

FORMAT = 1


def default_directory() -> Path:
    """``$SPECFX_CACHE_DIR``, else ``~/.cache/specfx``."""
    env = os.environ.get("SPECFX_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "specfx"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_signature(device: Union[str, torch.device] = "cpu") -> dict[str, str]:
    """What a timing depends on besides the op itself: the processor, how many threads
    torch runs, and the software that runs the op."""
    from . import __version__

    device = torch.device(device)
    signature = {"cpu": _cpu_model(), "logical_cores": str(os.cpu_count()), "threads": str(torch.get_num_threads()),
                 "torch": torch.__version__, "specfx": __version__, "device": device.type}
    if device.type == "cuda":
        signature["gpu"] = torch.cuda.get_device_name(device)
    return signature


@dataclasses.dataclass(frozen=True)
class Timing:
    """Median milliseconds of the two ways to run one op (``baseline``: the direct conv or
    per-conv lowering; ``candidate``: the lowered conv or the fused chain)."""

    baseline_ms: float
    candidate_ms: float

    @property
    def speedup(self) -> float:
        """How many times faster the candidate ran."""
        return self.baseline_ms / self.candidate_ms if self.candidate_ms > 0 else float("inf")


class TimingCache:
    """The timings of one machine signature, in the file :meth:`path_for` names.

    ``directory=None`` keeps them in memory only. Thread-safe; safe against other
    processes writing the same file (the last writer keeps the union of both)."""

    def __init__(self, directory: Optional[Union[str, Path]], signature: dict[str, str]) -> None:
        self.signature = dict(signature)
        self.path = None if directory is None else self.path_for(Path(directory), signature)
        self._lock = threading.Lock()
        self._entries: dict[str, Timing] = self._read()
        self.write_error: Optional[str] = None

    @staticmethod
    def path_for(directory: Path, signature: dict[str, str]) -> Path:
        digest = hashlib.sha256(json.dumps(signature, sort_keys=True).encode()).hexdigest()[:16]
        return directory / f"timings-{digest}.json"

    def get(self, key: str) -> Optional[Timing]:
        with self._lock:
            return self._entries.get(key)

    def put(self, key: str, timing: Timing) -> None:
        """Record ``timing`` and write the file (merged with what is on disk now)."""
        with self._lock:
            self._entries = {**self._read(), **self._entries, key: timing}
            self._write()

    def __len__(self) -> int:
        return len(self._entries)

    def _read(self) -> dict[str, Timing]:
        if self.path is None or not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # a file cut short by a crash is rebuilt, not trusted
        if data.get("format") != FORMAT or data.get("signature") != self.signature:
            return {}  # a hash collision, or another format: measure afresh
        return {key: Timing(*value) for key, value in data.get("entries", {}).items()}

    def _write(self) -> None:
        if self.path is None:
            return
        data = {"format": FORMAT, "signature": self.signature,
                "entries": {key: [t.baseline_ms, t.candidate_ms] for key, t in sorted(self._entries.items())}}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            handle, scratch = tempfile.mkstemp(dir=self.path.parent, prefix=".timings-", suffix=".tmp")
            with os.fdopen(handle, "w") as f:
                json.dump(data, f, indent=0)
            os.replace(scratch, self.path)
        except OSError as err:
            self.write_error = f"could not write {self.path}: {err}"
