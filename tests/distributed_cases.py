"""What each rank runs in tests/test_distributed.py: 2 processes, gloo on loopback.

:func:`launch` spawns the ranks and gathers what each saved; the ``case_*`` functions are
the ranks' bodies. A case trains the same small RepLKNet-style net (a 3x3 stem, a
depthwise 15x15 conv, a pointwise conv and a residual add; no BatchNorm, whose batch
statistics would differ between a rank's half batch and the whole batch) on a different
half of each step's batch per rank, and compares against single-process training of the
original model on the whole batch.
"""

from __future__ import annotations

import os
import socket
import tempfile
import time
import traceback
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

WORLD = 2
STEPS = 20
BATCH = 4  # per rank
LR = 0.05


class LargeKernelBlockNet(nn.Module):
    def __init__(self, channels: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.dw = nn.Conv2d(channels, channels, 15, padding=7, groups=channels)
        self.pw = nn.Conv2d(channels, channels, 1)
        self.head = nn.Linear(channels, 4)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = x + self.pw(F.relu(self.dw(x)))
        return self.head(x.mean((2, 3)))


class WideHeadNet(LargeKernelBlockNet):
    """With 4 MiB of linear layers after the convs: DDPOptimizer's buckets hold at least
    1 MiB (DDP's first bucket), so a graph it splits needs that many parameters."""

    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(8, 512), nn.ReLU(), *(m for _ in range(4) for m in (
            nn.Linear(512, 512), nn.ReLU())), nn.Linear(512, 4))


def build(seed: int = 0, wide: bool = False) -> nn.Module:
    torch.manual_seed(seed)
    return WideHeadNet() if wide else LargeKernelBlockNet()


def batches(steps: int = STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """Every step's whole batch: inputs ``(steps, WORLD·BATCH, 3, 32, 32)``, targets ``(steps, WORLD·BATCH, 4)``."""
    generator = torch.Generator().manual_seed(1)
    return (torch.randn(steps, WORLD * BATCH, 3, 32, 32, generator=generator),
            torch.randn(steps, WORLD * BATCH, 4, generator=generator))


def local(t: torch.Tensor, rank: int) -> torch.Tensor:
    return t[:, rank * BATCH:(rank + 1) * BATCH]


def reference_training(steps: int = STEPS) -> list[torch.Tensor]:
    """The original model trained in one process on each step's whole batch."""
    model = build(0)
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    x, t = batches(steps)
    for step in range(steps):
        F.mse_loss(model(x[step]), t[step]).backward()
        opt.step()
        opt.zero_grad()
    return [p.detach().clone() for p in model.parameters()]


def flat_parameters(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()])


def same_on_every_rank(t: torch.Tensor) -> bool:
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t)
    return all(torch.equal(gathered[0], g) for g in gathered)


# --- the cases ------------------------------------------------------------------------------

def case_ddp(rank: int) -> dict[str, Any]:
    """DDP around an optimized module: ranks start from different weights (DDP's
    broadcast at construction overwrites rank 1's in place, after optimize has cached
    their spectra), small buckets, every fourth step accumulated under ``no_sync``."""
    import specfx
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, t = batches()
    xl, tl = local(x, rank), local(t, rank)
    original = build(rank)
    fast = specfx.optimize(original, (xl[0],), policy="always")
    ddp = DDP(fast, bucket_cap_mb=0.001)
    opt = torch.optim.SGD(ddp.parameters(), lr=LR)
    identical = []
    for step in range(STEPS):
        if step % 4 == 3:
            half = BATCH // 2
            with ddp.no_sync():
                (0.5 * F.mse_loss(ddp(xl[step, :half]), tl[step, :half])).backward()
            (0.5 * F.mse_loss(ddp(xl[step, half:]), tl[step, half:])).backward()
        else:
            F.mse_loss(ddp(xl[step]), tl[step]).backward()
        opt.step()
        opt.zero_grad()
        identical.append(same_on_every_rank(flat_parameters(fast)))

    # The buckets gradients arrive in (DDP rebuilds them from the order they arrived in
    # the first backward), against DDP around the original model.
    reference = DDP(build(0), bucket_cap_mb=0.001)
    for step in range(4):
        F.mse_loss(reference(xl[step]), tl[step]).backward()
    return {"identical": identical, "parameters": [p.detach().clone() for p in fast.parameters()],
            "lowered": fast.specfx_report.lowered, "buckets": _buckets(ddp), "reference_buckets": _buckets(reference),
            "names": [n for n, _ in fast.named_parameters()],
            "reference_names": [n for n, _ in reference.module.named_parameters()]}


def _buckets(ddp: nn.Module) -> Any:
    data = ddp._get_ddp_logging_data()
    return {key: data.get(key) for key in ("bucket_sizes", "rebuilt_bucket_sizes", "rebuilt_per_bucket_param_indices")}


def case_compiled_ddp(rank: int) -> dict[str, Any]:
    """``torch.compile(DDP(model), backend="specfx")`` against eager DDP of the same model:
    DDPOptimizer splits the graph at bucket boundaries, and each piece goes to the backend."""
    import torch._dynamo

    import specfx
    from specfx.backend import clear_compiled_reports, compiled_reports
    from torch.nn.parallel import DistributedDataParallel as DDP

    x, t = batches(8)
    xl, tl = local(x, rank), local(t, rank)
    torch._dynamo.reset()
    clear_compiled_reports()
    eager, compiled_model = build(0, wide=True), build(0, wide=True)
    eager_ddp = DDP(eager, bucket_cap_mb=1)
    compiled = torch.compile(DDP(compiled_model, bucket_cap_mb=1), backend="specfx")
    opts = [torch.optim.SGD(m.parameters(), lr=LR) for m in (eager_ddp, compiled)]
    for step in range(8):
        for model, opt in zip((eager_ddp, compiled), opts):
            F.mse_loss(model(xl[step]), tl[step]).backward()
            opt.step()
            opt.zero_grad()
    reports = compiled_reports()
    expected = specfx.explain(build(0, wide=True), (xl[0],)).lowered
    return {"eager": [p.detach().clone() for p in eager.parameters()],
            "compiled": [p.detach().clone() for p in compiled_model.parameters()],
            "graphs": len(reports), "lowered_per_graph": [len(r.lowered) for r in reports],
            "convs_per_graph": [len(r.decisions) for r in reports], "expected_lowered": len(expected)}


def case_fsdp2(rank: int) -> dict[str, Any]:
    """``fully_shard`` on an optimized module: parameters become DTensors, gathered for
    each forward and backward."""
    import specfx
    from torch.distributed.fsdp import fully_shard

    x, t = batches()
    xl, tl = local(x, rank), local(t, rank)
    fast = specfx.optimize(build(0), (xl[0],), policy="always")
    fully_shard(fast)
    opt = torch.optim.SGD(fast.parameters(), lr=LR)
    for step in range(STEPS):
        F.mse_loss(fast(xl[step]), tl[step]).backward()
        opt.step()
        opt.zero_grad()
    return {"parameters": [p.full_tensor().detach().clone() for p in fast.parameters()],
            "lowered": fast.specfx_report.lowered}


CASES: dict[str, Callable[[int], dict[str, Any]]] = {
    "ddp": case_ddp, "compiled_ddp": case_compiled_ddp, "fsdp2": case_fsdp2}


# --- launching -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, port: int, case: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks on a small machine: one core each
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        result: dict[str, Any] = CASES[case](rank)
    except Exception:
        result = {"error": traceback.format_exc()}
    finally:
        dist.destroy_process_group()
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))


def launch(case: str, timeout_s: float = 60.0) -> list[dict[str, Any]]:
    """Run ``case`` on :data:`WORLD` spawned ranks; each rank's result (or its traceback,
    under ``"error"``). Raises ``TimeoutError`` past ``timeout_s``, the ranks killed."""
    out = tempfile.mkdtemp(prefix=f"specfx-{case}-")
    context = mp.start_processes(_entry, args=(_free_port(), case, out), nprocs=WORLD, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            raise TimeoutError(f"case {case!r} ran past {timeout_s:g} s")
    return [torch.load(os.path.join(out, f"rank{rank}.pt"), weights_only=False) for rank in range(WORLD)]
