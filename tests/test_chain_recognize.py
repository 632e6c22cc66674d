"""Recognition (specfx.chains.recognize): every spelling of a chain op, as
``symbolic_trace`` and ``make_fx`` (ATen) write it, is the same canonical op; what is not
a chain op is not. A new chain op: its recognizer, and its spellings here."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx
from torch.fx.passes.shape_prop import ShapeProp

from specfx.chains.recognize import OpKind, classify

X = torch.randn(2, 4, 8, 8)


class _Fn(nn.Module):
    def __init__(self, fn, *modules: nn.Module) -> None:
        super().__init__()
        self.fn, self.m = fn, nn.ModuleList(modules)

    def forward(self, x):
        return self.fn(self, x)


def _ops(fn, *modules: nn.Module, aten: bool = False):
    """The chain ops of the graph of ``fn(module, x)``, in order."""
    module = _Fn(fn, *modules).eval()
    gm = make_fx(module)(X) if aten else fx.symbolic_trace(module)
    ShapeProp(gm).propagate(X)
    found = [(n, classify(gm, n, 2)) for n in gm.graph.nodes]
    return [(op.kind, op.activation) for n, op in found if op is not None]


ACTIVATIONS = [
    (lambda s, x: F.relu(x), (), "relu"),
    (lambda s, x: torch.relu(x), (), "relu"),
    (lambda s, x: x.relu(), (), "relu"),
    (lambda s, x: F.relu(x.clone(), inplace=True), (), "relu"),
    (lambda s, x: s.m[0](x), (nn.ReLU(),), "relu"),
    (lambda s, x: F.leaky_relu(x, 0.2), (), "leaky_relu"),
    (lambda s, x: s.m[0](x), (nn.LeakyReLU(0.3),), "leaky_relu"),
    (lambda s, x: F.gelu(x), (), "gelu"),
    (lambda s, x: F.gelu(x, approximate="tanh"), (), "gelu_tanh"),
    (lambda s, x: s.m[0](x), (nn.GELU("tanh"),), "gelu_tanh"),
    (lambda s, x: F.silu(x), (), "silu"),
    (lambda s, x: x * x, (), "square"),
    (lambda s, x: x ** 2, (), "square"),
    (lambda s, x: torch.square(x), (), "square"),
]


@pytest.mark.parametrize("aten", [False, True])
@pytest.mark.parametrize("fn, modules, activation", ACTIVATIONS)
def test_every_spelling_of_an_activation(fn, modules, activation, aten):
    kinds = [k for k in _ops(fn, *modules, aten=aten) if k[0] is OpKind.ACTIVATION]
    assert kinds == [(OpKind.ACTIVATION, activation)]


def test_the_slope_and_inplace_flag_are_bound_by_name():
    gm = fx.symbolic_trace(_Fn(lambda s, x: F.leaky_relu(x.clone(), negative_slope=0.25, inplace=True)))
    ShapeProp(gm).propagate(X)
    op = next(op for n in gm.graph.nodes if (op := classify(gm, n, 2)) is not None)
    assert op.slope == 0.25 and op.inplace


@pytest.mark.parametrize("aten", [False, True])
def test_affine_maps(aten):
    gain = torch.rand(1, 4, 1, 1)
    kinds = _ops(lambda s, x: x * 2.0 + gain, aten=aten)
    assert [k for k, _ in kinds] == [OpKind.AFFINE] * 2


def test_eval_batch_norm():
    assert _ops(lambda s, x: s.m[0](x), nn.BatchNorm2d(4)) == [(OpKind.AFFINE, None)]
    assert _ops(lambda s, x: F.batch_norm(x, torch.zeros(4), torch.ones(4))) == [(OpKind.AFFINE, None)]


def test_a_training_batch_norm_is_not_a_chain_op():
    module = _Fn(lambda s, x: s.m[0](x), nn.BatchNorm2d(4))
    gm = fx.symbolic_trace(module)
    ShapeProp(gm).propagate(X)
    assert all(classify(gm, n, 2) is None for n in gm.graph.nodes)


def test_residual_add_crop_identity_and_pool():
    ops = _ops(lambda s, x: s.m[1](s.m[0](x + x.clone())[..., :6, :6]), nn.AvgPool2d(3, 1, 1), nn.Identity())
    assert [k for k, _ in ops] == [OpKind.ADD, OpKind.POOL, OpKind.CROP, OpKind.IDENTITY]
    assert _ops(lambda s, x: F.avg_pool2d(x, 3, stride=1, padding=1), aten=True) == [(OpKind.POOL, None)]


@pytest.mark.parametrize("fn", [lambda s, x: F.avg_pool2d(x, 2), lambda s, x: x[..., 1:, :],
                                lambda s, x: x + torch.ones(8), lambda s, x: torch.tanh(x)])
def test_what_is_not_a_chain_op(fn):
    assert _ops(fn) == []
