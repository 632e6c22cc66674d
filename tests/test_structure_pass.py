"""``specfx.structure``: which dense layers it replaces and why, what the result computes,
its report, its diff, and that the caller's model is never touched."""

from __future__ import annotations

import copy
import io

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx
from specfx import node_meta
from specfx.diff import diff, diff_passes
from specfx.nn import ButterflyLinear, KroneckerLinear
from specfx.nn.factors import balanced_split
from specfx.structure import structure


def kron_weight(rank: int, a: tuple[int, int], b: tuple[int, int], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    fa, fb = torch.randn(rank, *a, generator=generator), torch.randn(rank, *b, generator=generator)
    return sum(torch.kron(fa[r], fb[r]) for r in range(rank)) / (a[1] * b[1]) ** 0.5


class MLP(nn.Module):
    def __init__(self, width: int = 256, hidden: int = 512, classes: int = 10) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(width, hidden), nn.Linear(hidden, width), nn.Linear(width, classes)

    # No annotations: under ``from __future__ import annotations`` fx records them as strings,
    # and a GraphModule with a string annotation cannot be pickled (torch.save).
    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def structured_mlp(rank: int = 2) -> MLP:
    """fc1 is exactly a sum of ``rank`` Kronecker products of balanced shapes; fc2 is random."""
    torch.manual_seed(0)
    model = MLP()
    with torch.no_grad():
        model.fc1.weight.copy_(kron_weight(rank, (16, 16), (32, 16)))
    return model


def decisions(module) -> dict:
    return {d.layer: d for d in module.specfx_report.structured}


def test_structured_layer_replaced_random_one_kept_and_model_untouched():
    model = structured_mlp(rank=2)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(32, 256)
    fast = structure(model, x)
    found = decisions(fast)
    assert found["fc1"].replaced and found["fc1"].factors == "Kronecker 2 x (16x16 ⊗ 32x16)"
    assert found["fc1"].output_error < 1e-5 and found["fc1"].weight_error < 1e-5
    assert found["fc1"].params_after == 2 * (256 + 512) + 512 < found["fc1"].params_before
    assert found["fc1"].flops_after < found["fc1"].flops_before
    assert not found["fc2"].replaced
    assert "output error" in found["fc2"].reason and "max_error 0.05" in found["fc2"].reason
    assert found["fc2"].output_error > 0.05  # a random matrix is far from Kronecker structure
    assert not found["head"].replaced and "min_features=256" in found["head"].reason
    assert isinstance(fast.fc1, KroneckerLinear) and isinstance(fast.fc2, nn.Linear)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-5)
    # The caller's model is never changed.
    assert isinstance(model.fc1, nn.Linear)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    assert "fc1.a_factors.0" in fast.state_dict() and "fc1.weight" not in fast.state_dict()


def test_report_text_lists_every_layer_with_its_figures():
    fast = structure(structured_mlp(), torch.randn(32, 256))
    text = str(fast.specfx_report)
    assert "[kronecker replaced] fc1: Linear 256→512 as Kronecker 2 x (16x16 ⊗ 32x16)" in text
    assert "[kronecker kept    ] fc2: Linear 512→256" in text
    assert "[kronecker kept    ] head: Linear 256→10" in text
    assert "params 131,584 → 2,048 (64.2x fewer)" in text
    assert "weight error" in text and "output error" in text and "FLOPs" in text
    assert "the model's output error is" in text
    # The report survives a deep copy and a save.
    assert str(copy.deepcopy(fast).specfx_report) == text
    buffer = io.BytesIO()
    torch.save(fast, buffer)
    buffer.seek(0)
    assert str(torch.load(buffer, weights_only=False).specfx_report) == text


def test_rank_search_takes_the_smallest_power_of_two_within_max_error():
    model = structured_mlp(rank=3)
    fast = structure(model, torch.randn(32, 256))
    assert decisions(fast)["fc1"].factors == "Kronecker 4 x (16x16 ⊗ 32x16)"
    fixed = structure(model, torch.randn(32, 256), rank=2)
    assert not decisions(fixed)["fc1"].replaced
    assert decisions(fixed)["fc1"].factors == "Kronecker 2 x (16x16 ⊗ 32x16)"


@settings(max_examples=6, deadline=None)
@given(st.integers(1, 4), st.sampled_from([(256, 256), (256, 512), (512, 256)]), st.integers(0, 2 ** 31 - 1))
def test_any_exact_kronecker_weight_is_replaced(rank, sizes, seed):
    """A weight that is a sum of ``rank`` products of the balanced shapes the pass fits."""
    out_features, in_features = sizes
    a = (balanced_split(out_features)[0], balanced_split(in_features)[0])
    b = (out_features // a[0], in_features // a[1])
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        linear.weight.copy_(kron_weight(rank, a, b, seed))
    model = nn.Sequential(linear, nn.ReLU())
    x = torch.randn(16, in_features)
    fast = structure(model, x)
    decision = decisions(fast)["0"]
    assert decision.replaced and decision.output_error <= 0.05
    assert int(decision.factors.split()[1]) <= 1 << (rank - 1).bit_length()
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-4)


def test_max_error_inf_replaces_every_eligible_layer_and_the_result_fine_tunes():
    torch.manual_seed(0)
    model = MLP()
    x, target = torch.randn(64, 256), torch.randint(0, 10, (64,))
    fast = structure(model, x, max_error=float("inf"))
    assert [d.layer for d in fast.specfx_report.structured if d.replaced] == ["fc1", "fc2"]
    optimizer = torch.optim.Adam(fast.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(fast(x), target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert fast.fc1.a_factors[0].grad is not None


def test_butterfly_kind_replaces_a_hadamard_layer_and_keeps_a_random_one():
    torch.manual_seed(0)
    h = torch.ones(1, 1)
    while h.shape[0] < 64:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64))
    with torch.no_grad():
        model[0].weight.copy_(h / 8)
    x = torch.randn(16, 64)
    fast = structure(model, x, "butterfly", min_features=64, steps=10)
    found = decisions(fast)
    assert found["0"].replaced and found["0"].output_error < 1e-5
    assert found["0"].factors == "butterfly, 6 stages at 64"
    assert found["0"].params_after == 2 * 64 * 6 + 64
    assert not found["2"].replaced and found["2"].output_error > 0.5
    assert isinstance(fast.get_submodule("0"), ButterflyLinear)
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-5)


def test_export_front_end_replaces_the_layer_module_whole():
    model = structured_mlp()
    x = torch.randn(32, 256)
    fast = structure(model, x, frontend="export")
    assert fast.specfx_report.frontend == "export"
    assert decisions(fast)["fc1"].replaced
    assert isinstance(fast.fc1, KroneckerLinear)
    assert "fc1.weight" not in fast.state_dict()
    assert "torch.ops.aten.linear.default" in fast.code  # fc2 and head stay dense
    torch.testing.assert_close(fast(x), model(x), rtol=0, atol=1e-5)


def test_tied_and_shared_layers():
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encode, self.decode, self.shared = nn.Linear(256, 256), nn.Linear(256, 256), nn.Linear(256, 256)
            self.decode.weight = self.encode.weight

        def forward(self, x):
            return self.shared(self.shared(self.decode(self.encode(x))))

    model = Tied()
    x = torch.randn(8, 256)
    fast = structure(model, x, max_error=float("inf"))
    found = decisions(fast)
    assert not found["encode"].replaced and "tied" in found["encode"].reason
    assert not found["decode"].replaced and "tied" in found["decode"].reason
    assert found["shared"].replaced
    calls = [n for n in fast.graph.nodes if n.op == "call_module" and n.target == "shared"]
    assert len(calls) == 2 and all(node_meta.REPLACES in n.meta for n in calls)


def test_diff_shows_each_replacement():
    model = structured_mlp()
    x = torch.randn(32, 256)
    fast = structure(model, x)
    graph_diff = diff(model, fast)
    assert graph_diff.removed == ["fc1"]
    assert graph_diff.added == ["fc1_kronecker"]
    row = next(r for r in graph_diff.rows if r.name == "fc1_kronecker")
    assert row.lowered_from == "fc1" and "KroneckerLinear" in row.module
    assert "+        fc1_kronecker" in graph_diff.unified()
    per_pass = {p.name: p for p in diff_passes(fast)}
    assert not per_pass["plan_structure"].modified and per_pass["plan_structure"].diff == ""
    assert per_pass["structure_layers"].modified and "fc1_kronecker" in per_pass["structure_layers"].diff


def test_a_second_run_changes_nothing():
    x = torch.randn(32, 256)
    fast = structure(structured_mlp(), x)
    again = structure(fast, x)
    assert not any(d.replaced for d in again.specfx_report.structured)
    assert [d.layer for d in again.specfx_report.structured] == ["fc2", "head"]
    assert not any(p.modified for p in again.specfx_report.passes)
    torch.testing.assert_close(again(x), fast(x), rtol=0, atol=0)


def test_options_are_checked_before_any_work():
    model, x = MLP(), torch.randn(2, 256)
    with pytest.raises(ValueError, match="kind must be one of"):
        structure(model, x, "lowrank")
    with pytest.raises(ValueError, match="max_error must be a number >= 0"):
        structure(model, x, max_error=-1)
    with pytest.raises(ValueError, match="rank applies to kind='kronecker' only"):
        structure(model, x, "butterfly", rank=2)
    with pytest.raises(ValueError, match="min_features must be an int >= 0"):
        structure(model, x, min_features=1.5)
    with pytest.raises(specfx.ExampleInputError):
        structure(model, torch.randn(2, 100))


def test_a_rank_too_large_keeps_the_layer_with_the_reason():
    fast = structure(structured_mlp(), torch.randn(8, 256), rank=1000)
    assert "rank 1000 exceeds 256" in decisions(fast)["fc1"].reason


def test_meta_inputs_keep_every_layer():
    model = MLP().to("meta")
    fast = structure(model, torch.randn(8, 256, device="meta"))
    assert not any(d.replaced for d in fast.specfx_report.structured)
    assert "meta device" in decisions(fast)["fc1"].reason
