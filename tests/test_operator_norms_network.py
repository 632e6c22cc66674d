"""The network Lipschitz bound composed through the fx graph (specfx.spectrum).

Rules are checked one at a time on small models whose bound is known in closed form
from the layers' own norms; every bound is checked against the largest ratio
‖f(x) − f(y)‖ / ‖x − y‖ a gradient-ascent search finds (it must stay above it); and
anything without a rule makes the bound unknown, naming the node.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import specfx
from specfx.operator_norms import empirical_lipschitz
from specfx.operator_norms.network import GELU, HARDSWISH, MISH, SILU


def upper(report, name):
    return report.layer(name).bounds.upper


def test_sequential_layers_multiply():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 3, 3, stride=2, padding=1)).eval()
    report = specfx.spectrum(model, torch.randn(1, 2, 8, 8))
    assert report.lipschitz == pytest.approx(upper(report, "0") * upper(report, "2"), rel=1e-12)


def test_residual_adds_sum_and_batchnorm_in_eval_is_a_diagonal_scale():
    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1, bias=False)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return x + self.bn(self.conv(x))

    torch.manual_seed(0)
    model = Residual().eval()
    with torch.no_grad():
        model.bn.running_var.copy_(torch.tensor([0.5, 2.0, 4.0]))
        model.bn.weight.copy_(torch.tensor([1.0, -3.0, 0.5]))
    report = specfx.spectrum(model, torch.randn(2, 3, 6, 6))
    scale = max(abs(w) / math.sqrt(v + 1e-5) for w, v in [(1.0, 0.5), (-3.0, 2.0), (0.5, 4.0)])
    assert report.lipschitz == pytest.approx(1 + scale * upper(report, "conv"), rel=1e-9)


@pytest.mark.parametrize("activation,constant", [
    (nn.ReLU(), 1.0), (nn.LeakyReLU(2.5), 2.5), (nn.LeakyReLU(0.1), 1.0), (nn.GELU(), GELU), (nn.SiLU(), SILU),
    (nn.Tanh(), 1.0), (nn.Sigmoid(), 0.25), (nn.Mish(), MISH), (nn.Hardswish(), HARDSWISH), (nn.ELU(1.7), 1.7)])
def test_activations_scale_by_their_lipschitz_constants(activation, constant):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), activation, nn.Linear(6, 2)).eval()
    report = specfx.spectrum(model, torch.randn(3, 5))
    assert report.lipschitz == pytest.approx(upper(report, "0") * constant * upper(report, "2"), rel=1e-12)
    # The constant is at least the largest slope (measured on a fine grid).
    x = torch.linspace(-8, 8, 20001, dtype=torch.float64, requires_grad=True)
    (slope,) = torch.autograd.grad(activation.double()(x).sum(), x)
    assert float(slope.abs().max()) <= constant <= float(slope.abs().max()) + 1e-5


@pytest.mark.parametrize("pool,factor", [
    (nn.MaxPool2d(2), 1.0), (nn.MaxPool2d(3, stride=1, padding=1), 3.0), (nn.AvgPool2d(2), 0.5),
    (nn.AvgPool2d(3, stride=1, padding=1), 1.0), (nn.AdaptiveAvgPool2d(1), 1 / 8), (nn.AdaptiveMaxPool2d(2), 1.0)])
def test_pooling_by_its_own_norm(pool, factor):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1), pool).eval()
    report = specfx.spectrum(model, torch.randn(1, 2, 8, 8))
    assert report.lipschitz == pytest.approx(upper(report, "0") * factor, rel=1e-12)


def test_means_reshapes_and_concatenation():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(2, 3, 3, padding=1)
            self.b = nn.Conv1d(2, 3, 5, padding=2)

        def forward(self, x):
            y = torch.cat([self.a(x), self.b(x)], dim=1)
            return y.flatten(1).view(x.shape[0], 6, 16).mean(dim=-1) * 2.0

    torch.manual_seed(0)
    report = specfx.spectrum(Model().eval(), torch.randn(2, 2, 16))
    cat = math.sqrt(upper(report, "a") ** 2 + upper(report, "b") ** 2)
    assert report.lipschitz == pytest.approx(cat / 4 * 2.0, rel=1e-12)


@pytest.mark.parametrize("forward,node,reason", [
    (lambda m, x: m.conv(x) * m.conv(x), "mul", "product of two input-dependent values"),
    (lambda m, x: m.norm(m.conv(x)), "norm", "no Lipschitz rule for module LayerNorm"),
    (lambda m, x: m.conv(x)[:, [0, 0]], "getitem", "indexing with a tensor or list"),
    (lambda m, x: torch.exp(m.conv(x)), "exp", "no Lipschitz rule for torch.exp"),
])
def test_anything_without_a_rule_makes_the_bound_unknown_naming_the_node(forward, node, reason):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.norm = nn.LayerNorm([2, 6, 6])

        def forward(self, x):
            return forward(self, x)

    report = specfx.spectrum(Model().eval(), torch.randn(1, 2, 6, 6))
    assert report.lipschitz is None
    assert report.unknown.node == node and reason in report.unknown.reason
    assert f"network Lipschitz upper bound: unknown (node {node}:" in str(report)


def test_training_mode_batchnorm_and_dropout_are_unknown():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.BatchNorm2d(2), nn.Dropout(0.5))
    report = specfx.spectrum(model.train(), torch.randn(2, 2, 6, 6))
    assert report.unknown.node == "_1" and "training mode" in report.unknown.reason
    assert specfx.spectrum(model.eval(), torch.randn(2, 2, 6, 6)).lipschitz is not None


def test_branches_no_input_reaches_are_constants():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.register_buffer("offset", torch.randn(1, 2, 1, 1))

        def forward(self, x):
            return self.conv(x) + torch.exp(self.offset) * 3  # exp has no rule, but sees no input

    report = specfx.spectrum(Model().eval(), torch.randn(1, 2, 5, 5))
    assert report.lipschitz == pytest.approx(upper(report, "conv"), rel=1e-12)


class ResNetish(nn.Module):
    def __init__(self, mode="zeros", activation=nn.ReLU):
        super().__init__()
        self.stem = nn.Conv2d(1, 6, 3, padding=1, padding_mode=mode)
        self.c1 = nn.Conv2d(6, 6, 3, padding=1, bias=False, padding_mode=mode)
        self.bn = nn.BatchNorm2d(6)
        self.c2 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=2, padding_mode=mode)
        self.down = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.act = activation()
        self.fc = nn.Linear(8 * 4 * 4, 5)

    def forward(self, x):
        x = self.act(self.stem(x))
        x = x + self.c2(self.act(self.bn(self.c1(x))))
        x = F.max_pool2d(self.act(self.down(x)), 1)
        return self.fc(torch.flatten(x, 1))


@pytest.mark.parametrize("mode,activation", [("zeros", nn.ReLU), ("circular", nn.GELU), ("reflect", nn.SiLU)])
def test_the_bound_is_above_the_largest_ratio_a_search_finds(mode, activation):
    torch.manual_seed(0)
    model = ResNetish(mode, activation).eval()
    with torch.no_grad():
        model.bn.running_var.uniform_(0.2, 2.0)
    x = torch.randn(2, 1, 8, 8)
    report = specfx.spectrum(model, x)
    found = empirical_lipschitz(model, x, steps=80, restarts=3)
    assert 0 < found <= report.lipschitz


def test_the_search_finds_a_linear_layers_norm():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    x = torch.randn(1, 3, 8, 8, dtype=torch.float64)
    exact = specfx.operator_norm(conv, 8).upper
    assert empirical_lipschitz(conv, x, steps=100) == pytest.approx(exact, rel=1e-3)


def test_export_front_end_gives_the_same_bound():
    torch.manual_seed(0)
    model = ResNetish().eval()
    x = torch.randn(2, 1, 8, 8)
    traced = specfx.spectrum(model, x)
    exported = specfx.spectrum(model, x, frontend="export")
    assert exported.frontend == "export"
    assert [r.description for r in exported.layers] == [r.description for r in traced.layers]
    assert exported.lipschitz == pytest.approx(traced.lipschitz, rel=1e-9)


def test_report_text_html_and_plot(tmp_path):
    torch.manual_seed(0)
    model = ResNetish().eval()
    report = specfx.spectrum(model, torch.randn(1, 1, 8, 8))
    text = str(report)
    assert text.startswith("specfx spectrum (front end: symbolic_trace, 5 layers")
    assert "[conv  ] c2: Conv2d 6→6 k=3x3 d=2x2 groups=2 p=2 zeros on 8x8" in text
    assert "[linear] fc: Linear 128→5" in text
    assert text.splitlines()[-1].startswith("  network Lipschitz upper bound: ")
    page = report.to_html(tmp_path / "spectrum.html").read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<h2>Operator norms</h2>" in page
    assert "table { border-collapse: collapse" in page and "<code>c2</code>" in page
    pytest.importorskip("matplotlib")
    image = report.plot(tmp_path / "sv.png")
    assert image.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slopes_passed_positionally_are_read():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return F.elu(F.leaky_relu(self.fc(x), 2.5), 1.5)

    report = specfx.spectrum(Model().eval(), torch.randn(2, 3))
    assert report.lipschitz == pytest.approx(upper(report, "fc") * 2.5 * 1.5, rel=1e-12)
