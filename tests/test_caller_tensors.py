"""``optimize`` never writes into the caller's example tensors, and verifies against the
user's own model, each run on its own copy of the inputs."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import specfx


class DoublesItsInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 11, padding=5, groups=3)

    def forward(self, x, scale):
        x.mul_(2)
        scale.add_(1)
        return self.conv(x) * scale


@pytest.mark.parametrize("policy", ["always", "auto", "never", "measure"])
def test_example_inputs_are_not_mutated(policy):
    torch.manual_seed(0)
    model = DoublesItsInput().eval()
    x, scale = torch.randn(2, 3, 24, 24), torch.ones(1)
    x_before, scale_before = x.clone(), scale.clone()
    fast = specfx.optimize(model, (x, scale), policy=policy)
    assert torch.equal(x, x_before) and torch.equal(scale, scale_before)
    specfx.explain(model, (x, scale), policy=policy)
    assert torch.equal(x, x_before) and torch.equal(scale, scale_before)

    # the optimized module mutates its own arguments as the original does
    expected_args, actual_args = (x.clone(), scale.clone()), (x.clone(), scale.clone())
    expected = model(*expected_args)
    actual = fast(*actual_args)
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    for a, e in zip(actual_args, expected_args):
        torch.testing.assert_close(a, e)


def test_input_requiring_grad_stays_a_leaf():
    x = torch.randn(1, 3, 24, 24, requires_grad=True)
    specfx.optimize(DoublesItsInput().eval(), (x, torch.ones(1)), policy="always")
    assert x.is_leaf and x.grad is None


def test_verification_runs_the_users_model_not_only_the_captured_graph():
    """A model that computes something else while being traced: the captured graph (and so
    the optimized module) differs from the model, which only a comparison with the model
    itself can show."""

    class TracesDifferently(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 11, padding=5)

        def forward(self, x):
            y = self.conv(x)
            return y * 2 if torch.fx._symbolic_trace.is_fx_tracing() else y

    with pytest.raises(specfx.VerificationError, match="captured graph already differs"):
        specfx.optimize(TracesDifferently().eval(), (torch.randn(1, 3, 24, 24),), policy="always")
