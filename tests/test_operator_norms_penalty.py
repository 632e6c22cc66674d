"""specfx.spectral_penalty: a differentiable upper bound on a model's operator norms."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import specfx
from specfx.operator_norms import LayerError, as_operator, penalty


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 4, 3, stride=2, padding=1, padding_mode="circular")
        self.c = nn.Conv2d(4, 4, 3, padding=1, padding_mode="replicate")
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = torch.relu(self.bn(self.a(x)))
        x = self.c(torch.relu(self.b(x)))
        return self.fc(x.mean(dim=(-2, -1)))


def true_norm(conv, size):
    return float(torch.linalg.matrix_norm(as_operator(conv, size).matrix(), ord=2))


def test_the_penalty_bounds_every_layer_and_is_their_sum():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        terms = {"a": penalty.conv_norm_bound(as_operator(model.a, 8), model.a.weight),
                 "b": penalty.conv_norm_bound(as_operator(model.b, 8), model.b.weight),
                 "c": penalty.conv_norm_bound(as_operator(model.c, 4), model.c.weight),
                 "fc": torch.linalg.matrix_norm(model.fc.weight, ord=2)}
        total = specfx.spectral_penalty(model, x)
        largest = specfx.spectral_penalty(model, x, reduction="max")
    assert float(terms["a"]) >= true_norm(model.a, 8) * (1 - 1e-6)
    assert float(terms["b"]) == pytest.approx(true_norm(model.b, 8), rel=1e-5)  # periodic: exact
    assert float(terms["c"]) >= true_norm(model.c, 4)
    assert float(total) == pytest.approx(float(sum(terms.values())), rel=1e-6)
    assert float(largest) == pytest.approx(max(float(t) for t in terms.values()), rel=1e-6)


def test_gradients_reach_the_weights_and_descent_lowers_the_penalty():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 2, 8, 8)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    first = None
    for _ in range(5):
        optimizer.zero_grad()
        value = specfx.spectral_penalty(model, x)
        value.backward()
        first = float(value.detach()) if first is None else first
        assert all(m.weight.grad is not None and m.weight.grad.abs().sum() > 0 for m in (model.a, model.b, model.fc))
        optimizer.step()
    assert float(specfx.spectral_penalty(model, x).detach()) < first


def test_the_lipschitz_reduction_bounds_the_network_in_either_mode():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(2, 2, 8, 8)
    model.train()
    training = specfx.spectral_penalty(model, x, reduction="lipschitz")
    training.backward()
    assert model.bn.weight.grad is not None
    model.eval()
    evaluating = specfx.spectral_penalty(model, x, reduction="lipschitz").detach()
    training = training.detach()
    assert float(training) == pytest.approx(float(evaluating), rel=1e-9)
    certified = specfx.spectrum(model, x).lipschitz
    assert float(evaluating) >= certified * (1 - 1e-6)
    log = specfx.spectral_penalty(model, x, reduction="log_lipschitz").detach()
    assert float(log) == pytest.approx(float(evaluating.log()), rel=1e-9)


def test_the_capture_is_kept_and_the_weights_read_anew(monkeypatch):
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 2, 8, 8)
    calls = []
    original = penalty.capture_graph
    monkeypatch.setattr(penalty, "capture_graph", lambda *a, **k: calls.append(1) or original(*a, **k))
    before = float(specfx.spectral_penalty(model, x).detach())
    with torch.no_grad():
        model.a.weight.mul_(2)
    after = float(specfx.spectral_penalty(model, x).detach())
    assert len(calls) == 1
    assert after > before
    specfx.spectral_penalty(model, torch.randn(1, 2, 6, 6))  # another input signature: captured again
    assert len(calls) == 2


def test_errors():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), nn.LayerNorm([2, 5, 5]))
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        specfx.spectral_penalty(model, x, reduction="mean")
    with pytest.raises(LayerError, match="Lipschitz bound is unknown at node _1: no Lipschitz rule for module "
                                         "LayerNorm"):
        specfx.spectral_penalty(model, x, reduction="lipschitz")
    assert float(specfx.spectral_penalty(model, x).detach()) > 0  # the per-layer sum needs no network rule


def test_a_target_counts_only_the_excess():
    torch.manual_seed(0)
    model = Net().eval()
    x = torch.randn(2, 2, 8, 8)
    with torch.no_grad():
        plain = float(specfx.spectral_penalty(model, x))
        assert float(specfx.spectral_penalty(model, x, target=0.0)) == pytest.approx(plain, rel=1e-12)
        assert float(specfx.spectral_penalty(model, x, target=1e6)) == 0.0
        bound = float(specfx.spectral_penalty(model, x, reduction="lipschitz"))
        excess = float(specfx.spectral_penalty(model, x, reduction="log_lipschitz", target=bound / 2))
    assert excess == pytest.approx(math.log(2.0), rel=1e-12)
