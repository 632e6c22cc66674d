"""Nodes with side effects survive every pass: an in-place op whose result nothing reads
still runs, and the optimized module mutates what the original mutates."""

from __future__ import annotations


import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import specfx
from specfx.side_effects import eliminate_dead_code, has_side_effect


def _sub_mean_(y):
    y.sub_(y.mean())


def _mul_(y):
    y.mul_(2)


def _clamp_(y):
    y.clamp_(-0.5, 0.5)


def _relu_inplace_kw(y):
    F.relu(y, inplace=True)


def _relu_inplace_positional(y):
    F.relu(y, True)


def _torch_relu_(y):
    torch.relu_(y)


def _masked_fill_(y):
    y.masked_fill_(y > 0.5, 0.0)


def _out_kwarg(y):
    torch.neg(y, out=y)


def _setitem(y):
    y[:, 0] = 0.0


# Each mutates ``y`` and its result (if any) is dropped.
EFFECTS = [_sub_mean_, _mul_, _clamp_, _relu_inplace_kw, _relu_inplace_positional, _torch_relu_, _masked_fill_,
           _out_kwarg, _setitem]


class Mutating(nn.Module):
    """conv → (effect) → conv, with effects on the input, between the convs and after the
    last; ``inplace_module`` adds an ``nn.ReLU(inplace=True)`` whose result is unused."""

    def __init__(self, effects: dict[str, object], inplace_module: bool) -> None:
        super().__init__()
        self.a = nn.Conv2d(4, 4, 9, padding=4, groups=4)
        self.b = nn.Conv2d(4, 4, 7, padding=3)
        self.act = nn.ReLU(inplace=True)
        self.effects = effects
        self.inplace_module = inplace_module

    def forward(self, x):
        if "input" in self.effects:
            self.effects["input"](x)
        y = self.a(x)
        if "between" in self.effects:
            self.effects["between"](y)
        if self.inplace_module:
            self.act(y)
        z = self.b(y)
        if "after" in self.effects:
            self.effects["after"](z)
        return z


def _compare(model: nn.Module, x: torch.Tensor, **options) -> None:
    fast = specfx.optimize(model, (x,), **options)
    expected_input, actual_input = x.clone(), x.clone()
    with torch.no_grad():  # (``out=`` calls refuse tensors that require grad)
        expected = model(expected_input)
        actual = fast(actual_input)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())
    # the optimized module writes into its input exactly as the original does
    torch.testing.assert_close(actual_input, expected_input)


@pytest.mark.parametrize("effect", EFFECTS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("where", ["input", "between", "after"])
def test_in_place_op_with_unused_result_is_kept(effect, where):
    torch.manual_seed(0)
    _compare(Mutating({where: effect}, False).eval(), torch.randn(2, 4, 16, 16), policy="always")


def test_in_place_module_with_unused_result_is_kept():
    torch.manual_seed(0)
    _compare(Mutating({}, True).eval(), torch.randn(2, 4, 16, 16), policy="always", chains=False)


@settings(max_examples=40, derandomize=True, deadline=None, database=None)
@given(effects=st.dictionaries(st.sampled_from(["input", "between", "after"]), st.sampled_from(EFFECTS),
                               min_size=1),
       inplace_module=st.booleans(), policy=st.sampled_from(["always", "auto", "never"]), chains=st.booleans())
def test_generated_side_effects_survive_every_policy(effects, inplace_module, policy, chains):
    torch.manual_seed(0)
    _compare(Mutating(effects, inplace_module).eval(), torch.randn(2, 4, 16, 16), policy=policy, chains=chains)


def test_dead_code_elimination_keeps_only_effects():
    def f(x):
        unused = x + 1  # noqa: F841 — pure, dead
        x.add_(1)
        torch.relu_(x)
        F.relu(x, inplace=True)
        F.relu(x)  # pure, dead
        return x

    gm = fx.symbolic_trace(f)
    eliminate_dead_code(gm)
    kept = [n.target for n in gm.graph.nodes if n.op in ("call_function", "call_method")]
    assert kept == ["add_", torch.relu_, F.relu]
    assert has_side_effect(next(n for n in gm.graph.nodes if n.target is F.relu))


def test_batch_norm_in_training_mode_is_an_effect():
    gm = fx.symbolic_trace(nn.Sequential(nn.BatchNorm2d(3)))
    node = next(n for n in gm.graph.nodes if n.op == "call_module")
    assert has_side_effect(node, gm)
    gm.eval()
    assert not has_side_effect(node, gm)


@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
def test_in_place_write_into_a_lowered_conv_output_with_grad(padding_mode):
    """A lowered conv whose output keeps the FFT grid's layout (circular padding, a 1x1
    'valid' conv) may be a view of the op's temporary; writing into it, or into a slice of
    it, must work under autograd as with torch's conv."""
    torch.manual_seed(0)
    circular = padding_mode == "circular"
    conv = nn.Conv1d(2, 2, 5 if circular else 1, padding=2 if circular else 0, padding_mode=padding_mode,
                     bias=False)
    x = torch.randn(1, 2, 8)
    fast = specfx.optimize(nn.Sequential(conv), (x,), policy="always")
    for write in (lambda y: y.relu_(), lambda y: y[..., :2].add_(1)):
        expected, actual = write(conv(x)), write(fast(x))
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
        actual.sum().backward()
