"""Optimized modules under torch.distributed (DDP, compiled DDP, FSDP2; 2 spawned ranks,
gloo on loopback: tests/distributed_cases.py), activation checkpointing and autocast.

Every distributed case trains for several steps, each rank on its half of the batch, and
is compared with single-process training of the original model on the whole batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

import distributed_cases as cases
import specfx
from conftest import assert_scaled_close
from specfx.ops import SPECTRUM_CACHE

needs_gloo = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="torch.distributed with the gloo backend is not available in this build")

# 20 SGD steps in fp32, in a different order of summation: the parameters differ from the
# single-process run's by rounding only (measured: a few 1e-8 of their scale).
TRAINED = 1e-5


def _close(actual: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    for a, e in zip(actual, expected):
        assert_scaled_close(a, e, tol=TRAINED)


def _ranks(case: str) -> list[dict]:
    results = cases.launch(case, timeout_s=90)
    for rank, result in enumerate(results):
        assert "error" not in result, f"rank {rank} failed:\n{result['error']}"
    return results


@needs_gloo
def test_ddp_trains_an_optimized_module_as_one_process_trains_the_original():
    ranks = _ranks("ddp")
    assert ranks[0]["lowered"] == ["stem", "dw", "pw"]
    for result in ranks:
        assert all(result["identical"])  # the same parameters on both ranks after every step
    # DDP's broadcast at construction replaced rank 1's weights (its spectra were cached by
    # then), every fourth step ran no_sync: the result is the single-process one.
    _close(ranks[0]["parameters"], cases.reference_training())
    # The parameters in the original's order, and their gradients arriving in the
    # original's order (next test): DDP's buckets, built from the first and rebuilt from
    # the second after the first step, are the original's.
    assert ranks[0]["names"] == ranks[0]["reference_names"]
    assert ranks[0]["buckets"] == ranks[0]["reference_buckets"]
    assert ranks[0]["buckets"]["rebuilt_per_bucket_param_indices"] is not None


@pytest.mark.parametrize("chains", [False, True])
def test_lowered_convs_deliver_gradients_in_the_order_torchs_convs_do(chains):
    """Weight, then bias, layer by layer from the last: the order DDP rebuilds its buckets
    in. (A chain carries its biases as spectral shifts, read before the convs' ops.)"""
    model = cases.build(0)
    x, t = cases.batches(1)
    fast = specfx.optimize(model, (x[0],), policy="always", chains=chains)
    assert [c.fused for c in fast.specfx_report.chains] == ([True] if chains else [])
    orders = []
    for module in (model, fast):
        order: list[str] = []
        hooks = [p.register_post_accumulate_grad_hook(lambda p, n=n: order.append(n))
                 for n, p in module.named_parameters()]
        F.mse_loss(module(x[0]), t[0]).backward()
        for hook in hooks:
            hook.remove()
        orders.append(order)
    assert orders[1] == orders[0]


@needs_gloo
def test_torch_compile_of_ddp_lowers_each_piece_and_trains_as_eager_ddp():
    ranks = _ranks("compiled_ddp")
    result = ranks[0]
    assert result["graphs"] > 1  # DDPOptimizer split the graph at bucket boundaries
    assert sum(result["convs_per_graph"]) == 3
    # Each piece is planned as the whole model would be.
    assert sum(result["lowered_per_graph"]) == result["expected_lowered"] >= 1
    _close(result["compiled"], result["eager"])


@needs_gloo
def test_fsdp2_shards_an_optimized_module_and_trains_as_one_process():
    ranks = _ranks("fsdp2")
    assert ranks[0]["lowered"] == ["stem", "dw", "pw"]
    _close(ranks[0]["parameters"], cases.reference_training())
    _close(ranks[1]["parameters"], cases.reference_training())


def test_activation_checkpointing_recomputes_with_the_cached_spectra():
    """``checkpoint(use_reentrant=False)`` around an optimized module: the same gradients,
    the recomputed forward reads the spectra the first forward cached, and fewer bytes
    are kept for the backward."""
    model = cases.build(0)
    x, t = cases.batches(1)
    x, t = x[0], t[0]
    fast = specfx.optimize(model, (x,), policy="always")

    def saved_bytes_and_grads(run) -> tuple[int, list[torch.Tensor]]:
        saved = []

        def pack(tensor):
            saved.append(tensor.numel() * tensor.element_size())
            return tensor

        fast.zero_grad()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            loss = F.mse_loss(run(x), t)
        loss.backward()
        return sum(saved), [p.grad.clone() for p in fast.parameters()]

    plain_bytes, plain_grads = saved_bytes_and_grads(fast)
    misses = SPECTRUM_CACHE.misses
    checkpointed_bytes, checkpointed_grads = saved_bytes_and_grads(
        lambda inp: checkpoint(fast, inp, use_reentrant=False))
    assert SPECTRUM_CACHE.misses == misses  # the recomputation transformed no weight again
    _close(checkpointed_grads, plain_grads)
    assert checkpointed_bytes < plain_bytes / 2


@pytest.mark.parametrize("chains", [False, True])
def test_autocast_runs_the_lowered_convs_as_it_runs_the_originals(chains):
    """Under CPU autocast to bfloat16, a conv runs in bfloat16 and returns bfloat16; so do
    the lowered convs (their transforms in float32), with the error of the bfloat16 path."""
    torch.manual_seed(0)
    model = cases.build(0).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = specfx.optimize(model, (x,), policy="always", chains=chains)
    assert fast.specfx_report.lowered == ["stem", "dw", "pw"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected, actual = model(x), fast(x)
    assert actual.dtype == expected.dtype == torch.bfloat16
    exact = model(x).detach()
    scale = exact.abs().max().item()
    reference_error = (expected.float() - exact).abs().max().item() / scale
    error = (actual.float() - exact).abs().max().item() / scale
    assert error <= max(2 * reference_error, 1.6e-2)
    # Outside autocast the module computes in float32 again.
    assert_scaled_close(fast(x).detach(), exact)
