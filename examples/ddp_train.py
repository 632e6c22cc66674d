"""Data-parallel training of a large-kernel CNN through specfx, next to eager DDP.

Run on the CPU with two processes (gloo, loopback):

    torchrun --nproc-per-node 2 examples/ddp_train.py [--steps 5] [--rounds 5]

Both models start from the same weights; each rank trains on its own batches. Steps are
timed in interleaved rounds (a round runs ``--steps`` steps of each model in turn), and
rank 0 prints the median steps per second of each and their ratio.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import specfx  # noqa: E402
from quickstart import LargeKernelNet  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5, help="steps of each model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8, help="per rank")
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    # Each rank gets its share of the cores: oversubscribed threads slow both models.
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    torch.manual_seed(0)
    model = LargeKernelNet(channels=32, blocks=2)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(args.steps, args.batch, 3, 64, 64, generator=generator)
    y = torch.randint(0, 10, (args.steps, args.batch), generator=generator)

    fast = specfx.optimize(model, (x[0],))  # policy="auto"
    runs = {"eager DDP": DDP(copy.deepcopy(model)), "specfx DDP": DDP(fast)}
    optimizers = {name: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for name, m in runs.items()}
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, float] = {}
    for _ in range(args.rounds + 1):  # the first round warms up
        for name, ddp in runs.items():
            dist.barrier()
            start = time.perf_counter()
            for step in range(args.steps):
                loss = F.cross_entropy(ddp(x[step]), y[step])
                loss.backward()
                optimizers[name].step()
                optimizers[name].zero_grad()
            seconds[name].append(time.perf_counter() - start)
            losses[name] = loss.item()
    if rank == 0:
        rates = {name: args.steps / statistics.median(times[1:]) for name, times in seconds.items()}
        print(f"{world} ranks x {torch.get_num_threads()} threads, batch {args.batch} per rank, 64x64 inputs, "
              f"LargeKernelNet(32 channels, 2 blocks of 31x31 depthwise convs)")
        print(f"lowered by specfx (auto): {', '.join(fast.specfx_report.lowered) or 'none'}")
        for name, rate in rates.items():
            print(f"  {name:11s} {rate:6.2f} steps/s   last loss {losses[name]:.4f}")
        print(f"  specfx DDP / eager DDP: {rates['specfx DDP'] / rates['eager DDP']:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
