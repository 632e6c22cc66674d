"""``specfx.optimize`` end to end: every conv form is found and lowered exactly, the
policies decide as documented, the report names what was done, and the optimized module
behaves like the original (state_dict, training, gradients, errors).

References are always the original model run by torch itself (or torch's convs), with the
same weights; nothing is compared against stored numbers.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from torch.fx.passes.infra.pass_base import PassResult
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import specfx
import specfx.passes
from conftest import assert_scaled_close
from specfx.canonical import find_conv_sites
from specfx.capture import capture
from specfx.verify import verify

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel")

SPECTRAL_CONV = torch.ops.specfx.lowered_conv.default
SPECTRAL_OPS = {torch.ops.specfx.to_spectrum.default, torch.ops.specfx.spectral_mix.default,
                torch.ops.specfx.from_spectrum.default, SPECTRAL_CONV}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def spectral_ops(gm: fx.GraphModule) -> list:
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and n.target in SPECTRAL_OPS]


def assert_all_lowered(fast: fx.GraphModule, count: int) -> None:
    """``count`` convs lowered, none kept, none left in the graph, each one ``lowered_conv``
    (its three ops merged: no chain reads their spectra)."""
    report = fast.specfx_report
    assert len(report.lowered) == count, str(report)
    assert report.kept == {}, str(report)
    assert find_conv_sites(fast) == []
    assert spectral_ops(fast) == [SPECTRAL_CONV] * count


def check_forward_backward(model: nn.Module, fast: nn.Module, *inputs: torch.Tensor) -> None:
    """Outputs, input gradients and parameter gradients of ``fast`` equal ``model``'s
    (which must hold the same weights)."""
    expected = model(*inputs)
    actual = fast(*inputs)
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert_scaled_close(actual, expected)

    upstream = torch.randn_like(expected)
    ref_in = [x.detach().clone().requires_grad_() for x in inputs]
    opt_in = [x.detach().clone().requires_grad_() for x in inputs]
    model.zero_grad(set_to_none=True)
    fast.zero_grad(set_to_none=True)
    (model(*ref_in) * upstream).sum().backward()
    (fast(*opt_in) * upstream).sum().backward()
    for a, e in zip(opt_in, ref_in):
        assert_scaled_close(a.grad, e.grad)
    ref_params = dict(model.named_parameters())
    opt_params = dict(fast.named_parameters())
    assert opt_params.keys() == ref_params.keys()
    for name, p in opt_params.items():
        assert p.grad is not None, name
        assert_scaled_close(p.grad, ref_params[name].grad)


class Net(nn.Module):
    """A small CNN whose conv sits at ``layer1.conv``, with an unused submodule, a
    persistent and a non-persistent buffer."""

    def __init__(self, channels: int = 4, kernel: int = 5) -> None:
        super().__init__()
        self.layer1 = nn.Module()
        self.layer1.conv = nn.Conv2d(channels, 8, kernel, padding=kernel // 2)
        self.layer1.act = nn.ReLU()
        self.head = nn.Conv2d(8, 8, 3, groups=8)
        self.unused = nn.Linear(3, 3)
        self.register_buffer("scale", torch.tensor(1.5))
        self.register_buffer("cache", torch.zeros(2), persistent=False)

    def forward(self, x):
        return self.head(self.layer1.act(self.layer1.conv(x))) * self.scale


# --- 1. every conv form, lowered exactly ---------------------------------------------------

MODULE_CASES = {
    "conv1d": (lambda: nn.Conv1d(4, 6, 9, padding=4), (2, 4, 30)),
    "conv1d_strided_dilated": (lambda: nn.Conv1d(4, 6, 5, stride=3, dilation=2, padding=3), (2, 4, 31)),
    "conv2d": (lambda: nn.Conv2d(4, 6, 3, padding=1), (2, 4, 12, 12)),
    "conv2d_rect_stride_dilation": (
        lambda: nn.Conv2d(4, 6, (3, 5), stride=(2, 1), dilation=(1, 2), padding=(2, 1)), (2, 4, 13, 12)),
    "conv2d_groups_no_bias": (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), (2, 4, 10, 11)),
    "conv2d_depthwise": (lambda: nn.Conv2d(8, 8, 7, groups=8, padding=3), (2, 8, 16, 16)),
    "conv2d_depthwise_multiplier": (lambda: nn.Conv2d(4, 8, 5, groups=4, padding="same"), (1, 4, 9, 9)),
    "conv2d_even_same": (lambda: nn.Conv2d(3, 4, 4, padding="same", dilation=2), (2, 3, 12, 12)),
    "conv3d": (lambda: nn.Conv3d(2, 4, 3, padding=1, stride=(1, 2, 1)), (2, 2, 6, 7, 6)),
    "conv3d_depthwise_valid": (lambda: nn.Conv3d(4, 4, 3, groups=4, padding="valid"), (1, 4, 6, 6, 6)),
}


@pytest.mark.parametrize("case", sorted(MODULE_CASES))
def test_module_convs_lowered_exactly(case):
    make_conv, shape = MODULE_CASES[case]
    model = nn.Sequential(make_conv(), nn.Tanh())
    x = torch.randn(shape)
    fast = specfx.optimize(model, (x,), policy="always")
    assert fast.specfx_report.lowered == ["0"]
    assert_all_lowered(fast, 1)
    check_forward_backward(model, fast, x)


@pytest.mark.parametrize("padding_mode", ["zeros", "reflect", "replicate", "circular"])
@pytest.mark.parametrize("padding", [1, (2, 1), "same", "valid"])
def test_module_padding_modes(padding_mode, padding):
    model = nn.Sequential(nn.Conv2d(3, 4, (3, 5), padding=padding, padding_mode=padding_mode))
    x = torch.randn(2, 3, 10, 9)
    fast = specfx.optimize(model, (x,), policy="always")
    assert fast.specfx_report.lowered == ["0"]
    assert_all_lowered(fast, 1)
    check_forward_backward(model, fast, x)


@pytest.mark.parametrize("padding_mode", ["reflect", "circular"])
def test_padding_modes_strided_dilated(padding_mode):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2, dilation=2, padding=(2, 1), padding_mode=padding_mode))
    x = torch.randn(2, 3, 11, 10)
    fast = specfx.optimize(model, (x,), policy="always")
    assert_all_lowered(fast, 1)
    check_forward_backward(model, fast, x)


class Functional(nn.Module):
    """F.convNd and torch.convNd calls in every spelling: positional, keyword, strings."""

    def __init__(self) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(6, 4, 5) / 5)
        self.w2 = nn.Parameter(torch.randn(6, 4, 3, 3) / 5)
        self.wg = nn.Parameter(torch.randn(6, 2, 3, 3) / 5)
        self.w3 = nn.Parameter(torch.randn(4, 2, 3, 3, 3) / 5)
        self.b = nn.Parameter(torch.randn(6))

    def forward(self, x):
        x1 = x.flatten(2)                      # (N, 4, 144)
        x3 = x.reshape(x.shape[0], 4, 4, 6, 6)  # (N, 4, 4, 6, 6)
        return (
            F.conv1d(x1, self.w1, self.b, 2, 3, 1, 1).sum(),
            torch.conv1d(input=x1, weight=self.w1, padding="same", dilation=3).sum(),
            F.conv2d(x, self.w2, None, (2, 1), (1, 2), (1, 2), 1),
            torch.conv2d(x, self.w2, padding="valid"),
            F.conv2d(x, self.wg, bias=self.b, groups=2, padding="same", dilation=2),
            F.conv3d(x3, self.w3, None, 1, "same", 1, 2),
            torch.conv3d(x3, weight=self.w3, stride=(2, 1, 1), groups=2),
        )


def check_outputs(fast, model, x):
    expected, actual = model(x), fast(x)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
        assert_scaled_close(a, e)


def test_functional_convs_symbolic_trace():
    model, x = Functional(), torch.randn(2, 4, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always")
    report = fast.specfx_report
    assert report.frontend == "symbolic_trace"
    # functional convs at the root are named by their node
    assert report.lowered == ["conv1d", "conv1d_1", "conv2d", "conv2d_1", "conv2d_2", "conv3d", "conv3d_1"]
    assert_all_lowered(fast, 7)
    check_outputs(fast, model, x)


def test_functional_convs_export_give_aten_forms():
    model, x = Functional(), torch.randn(2, 4, 12, 12)
    gm, frontend = capture(copy.deepcopy(model), (x,), "export")
    assert frontend == "export"
    aten = torch.ops.aten
    targets = {n.target for n in gm.graph.nodes if n.op == "call_function"}
    # padding strings give the .padding overloads, int paddings the .default ones
    assert {aten.conv1d.default, aten.conv1d.padding, aten.conv2d.default, aten.conv2d.padding,
            aten.conv3d.default, aten.conv3d.padding} <= targets

    fast = specfx.optimize(model, (x,), policy="always", frontend="export")
    report = fast.specfx_report
    assert report.frontend == "export"
    assert_all_lowered(fast, 7)
    assert all(d.name == d.node for d in report.decisions)  # root convs: their node names
    check_outputs(fast, model, x)


def aten_convolution_module() -> fx.GraphModule:
    """A graph calling ``aten.convolution.default`` directly: a forward conv (dilated,
    padded, biased) and a transposed one."""
    root = nn.Module()
    root.weight = nn.Parameter(torch.randn(6, 4, 3, 3) / 5)
    root.bias = nn.Parameter(torch.randn(6))
    root.t_weight = nn.Parameter(torch.randn(6, 3, 3, 3) / 5)
    graph = fx.Graph()
    x = graph.placeholder("x")
    conv = graph.call_function(torch.ops.aten.convolution.default,
                               (x, graph.get_attr("weight"), graph.get_attr("bias"), [1, 2], [2, 1],
                                [2, 1], False, [0, 0], 1))
    act = graph.call_function(torch.tanh, (conv,))
    up = graph.call_function(torch.ops.aten.convolution.default,
                             (act, graph.get_attr("t_weight"), None, [2, 2], [1, 1], [1, 1], True, [1, 1], 1))
    graph.output((act, up))
    return fx.GraphModule(root, graph)


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_aten_convolution_graph(frontend):
    model, x = aten_convolution_module(), torch.randn(2, 4, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always", frontend=frontend)
    report = fast.specfx_report
    assert len(report.lowered) == 1
    (kept_reason,) = report.kept.values()
    assert "transposed" in kept_reason
    remaining = [n.target for n in fast.graph.nodes if n.op == "call_function"]
    assert remaining.count(torch.ops.aten.convolution.default) == 1  # the transposed one
    assert spectral_ops(fast) == [SPECTRAL_CONV]
    check_outputs(fast, model, x)


@pytest.mark.parametrize("conv, shape", [
    (lambda: nn.Conv1d(4, 6, 5, padding=2), (4, 20)),
    (lambda: nn.Conv2d(4, 6, 3, stride=2), (4, 11, 10)),
    (lambda: nn.Conv3d(2, 3, 3, padding=1, groups=1), (2, 6, 5, 6)),
], ids=["1d", "2d", "3d"])
def test_unbatched_inputs(conv, shape):
    model = nn.Sequential(conv())
    x = torch.randn(shape)
    fast = specfx.optimize(model, (x,), policy="always")
    assert_all_lowered(fast, 1)
    check_forward_backward(model, fast, x)


def test_fp64_stays_fp64():
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2), nn.Tanh(), nn.Conv2d(4, 4, 7, groups=4)).double()
    x = torch.randn(2, 3, 14, 14, dtype=torch.float64)
    fast = specfx.optimize(model, (x,), policy="always")
    assert_all_lowered(fast, 2)
    # the fp64 tolerance (1e-12 of the scale) is only met if the FFTs run in fp64
    check_forward_backward(model, fast, x)
    assert fast.specfx_report.verified_error < 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_models(dtype):
    model = nn.Sequential(nn.Conv2d(4, 6, 5, padding=2, padding_mode="reflect")).to(dtype)
    x = torch.randn(2, 4, 12, 12).to(dtype)
    fast = specfx.optimize(model, (x,), policy="always")
    assert_all_lowered(fast, 1)
    actual = fast(x)
    assert actual.dtype == dtype
    for p in fast.parameters():
        assert p.dtype == dtype
    # the spectral ops compute in fp32 and round once: compare with the fp32 conv of the
    # same (half-representable) values, rounded to the half dtype
    reference = copy.deepcopy(model).float()
    expected = reference(x.float()).to(dtype)
    assert_scaled_close(actual, expected)
    # and with torch's own half-precision conv, to that dtype's rounding
    assert_scaled_close(actual.float(), model(x).float(), tol=4 * torch.finfo(dtype).eps)


def test_gradcheck_fp64():
    model = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect", stride=2), nn.Tanh(),
                          nn.Conv2d(2, 2, 3, groups=2, padding="same")).double()
    x = torch.randn(1, 2, 5, 5, dtype=torch.float64)
    fast = specfx.optimize(model, (x,), policy="always")
    assert_all_lowered(fast, 2)

    def run(inp, w0, w2, b2):
        # gradcheck perturbs its inputs in place through ``.data``, which bumps no tensor
        # version, so the spectrum cache could not see it: hand the module fresh tensors.
        params = {"0.weight": w0.clone(), "2.weight": w2.clone(), "2.bias": b2}
        return torch.func.functional_call(fast, params, (inp,))

    leaves = (x, fast.get_parameter("0.weight"), fast.get_parameter("2.weight"), fast.get_parameter("2.bias"))
    leaves = tuple(t.detach().clone().requires_grad_() for t in leaves)
    assert torch.autograd.gradcheck(run, leaves)


# --- 2. policies -----------------------------------------------------------------------------

class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.c1 = nn.Conv2d(16, 16, 1)
        self.dw = nn.Conv2d(16, 16, 15, padding=7, groups=16)
        self.big = nn.Conv2d(16, 16, 31, padding=15)
        self.up = nn.ConvTranspose2d(16, 4, 3, padding=1)

    def forward(self, x):
        return self.up(self.big(self.dw(self.c1(self.c3(x)))))


@pytest.fixture(scope="module")
def mixed():
    torch.manual_seed(1)
    return Mixed(), torch.randn(1, 16, 32, 32)


def test_policy_auto(mixed):
    model, x = mixed
    fast = specfx.optimize(model, (x,))
    report = fast.specfx_report
    assert report.policy == "auto"
    assert report.lowered == ["dw", "big"]
    assert set(report.kept) == {"c3", "c1", "up"}
    assert "dense kernel" in report.kept["c3"] and "dense kernel" in report.kept["c1"]
    assert "transposed" in report.kept["up"]
    assert [n.target for n in fast.graph.nodes if n.op == "call_module"] == ["c3", "c1", "up"]
    assert_scaled_close(fast(x), model(x))
    # explain gives the same decisions without rewriting
    explained = specfx.explain(model, (x,))
    assert not explained.applied
    assert explained.lowered == report.lowered and explained.kept == report.kept


def test_policy_always_keeps_only_transposed(mixed):
    model, x = mixed
    report = specfx.explain(model, (x,), policy="always")
    assert report.lowered == ["c3", "c1", "dw", "big"]
    assert list(report.kept) == ["up"]


def test_policy_never(mixed):
    model, x = mixed
    fast = specfx.optimize(model, (x,), policy="never")
    report = fast.specfx_report
    assert report.lowered == []
    assert list(report.kept) == ["c3", "c1", "dw", "big", "up"]
    assert all(reason for reason in report.kept.values())
    assert report.kept["dw"] == "policy='never'"
    assert spectral_ops(fast) == []
    assert not any(p.modified for p in report.passes)
    assert torch.equal(fast(x), model(x))


@pytest.mark.parametrize("conv", [
    lambda: nn.ConvTranspose1d(4, 4, 5),
    lambda: nn.ConvTranspose2d(4, 6, 3, stride=2, output_padding=1),
    lambda: nn.ConvTranspose3d(4, 2, 3),
], ids=["1d", "2d", "3d"])
def test_transposed_convs_kept(conv):
    module = conv()
    rank = len(module.kernel_size)
    model = nn.Sequential(module)
    x = torch.randn(1, 4, *([6] * rank))
    fast = specfx.optimize(model, (x,), policy="always")
    report = fast.specfx_report
    assert report.lowered == []
    assert "transposed" in report.kept["0"]
    assert f"ConvTranspose{rank}d 4→{module.out_channels}" in str(report)
    assert torch.equal(fast(x), model(x))


def test_functional_transposed_conv_kept():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 2, 3, 3))

        def forward(self, x):
            return F.conv_transpose2d(x, self.w, stride=2)

    model, x = M(), torch.randn(1, 4, 6, 6)
    report = specfx.optimize(model, (x,), policy="always").specfx_report
    assert report.lowered == []
    assert "transposed" in report.kept["conv_transpose2d"]


def test_conv_with_hooks_or_custom_forward_kept():
    class Custom(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 3, 5, padding=2), Custom(3, 3, 5, padding=2))
    calls = []
    model[0].register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(1, 3, 10, 10)
    fast = specfx.optimize(model, (x,), policy="always")
    report = fast.specfx_report
    assert list(report.kept) == ["0"]
    assert "hooks" in report.kept["0"]
    # a subclass that is not a leaf module is traced through: its F.conv2d is lowered
    # (named by its module), the rest of its forward kept
    assert report.lowered == ["1"]
    calls.clear()
    assert_scaled_close(fast(x), model(x))
    assert len(calls) == 2  # the hook still runs in the optimized module


# --- 3. the report --------------------------------------------------------------------------

@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_report_names_are_module_paths(frontend):
    model, x = Net(), torch.randn(2, 4, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always", frontend=frontend)
    report = fast.specfx_report
    assert report.frontend == frontend
    assert report.lowered == ["layer1.conv", "head"]
    assert_scaled_close(fast(x), model(x))


def test_report_text():
    model, x = Net(), torch.randn(2, 4, 12, 12)
    report = specfx.optimize(model, (x,), policy="auto").specfx_report
    assert report.lowered == []
    assert set(report.kept) == {"layer1.conv", "head"}
    text = str(report)
    assert "symbolic_trace" in text
    for name, reason in report.kept.items():
        assert name in text and reason in text
    for decision in report.decisions:
        assert decision.cost is not None
        assert decision.cost.summary() in text
    assert "GFLOP" in text and "ms" in text

    lowered = specfx.optimize(model, (x,), policy="always").specfx_report
    text = str(lowered)
    assert "2 of 2 convolutions lowered" in text
    assert "verified" in text and lowered.verified_error is not None
    assert lowered.verified_error <= lowered.verified_tolerance


def test_report_for_model_without_convs():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(2, 4)
    fast = specfx.optimize(model, (x,), policy="always")
    assert fast.specfx_report.decisions == []
    assert torch.equal(fast(x), model(x))


# --- 4. the optimized module behaves like the original -----------------------------------

def state_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}


def assert_same_state(model: nn.Module, snapshot: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == snapshot.keys()
    for k, v in state.items():
        assert torch.equal(v, snapshot[k]), k


@pytest.mark.parametrize("frontend", ["symbolic_trace", "export"])
def test_state_dict_keys_and_loading(frontend):
    model, x = Net(), torch.randn(2, 4, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always", frontend=frontend)
    assert list(fast.state_dict()) == list(model.state_dict())
    assert "cache" not in fast.state_dict()
    for k, v in fast.state_dict().items():
        assert torch.equal(v, model.state_dict()[k])

    fast.load_state_dict(model.state_dict())  # strict: keys must match both ways
    torch.manual_seed(123)
    other = Net()
    with torch.no_grad():
        other.scale.fill_(0.5)
    fast.load_state_dict(other.state_dict())
    assert_scaled_close(fast(x), other(x))
    assert not torch.allclose(fast(x), model(x))


def test_buffers_and_unused_parameters_kept():
    model, x = Net(), torch.randn(2, 4, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always")
    assert [n for n, _ in fast.named_parameters()] == [n for n, _ in model.named_parameters()]
    assert [n for n, _ in fast.named_buffers()] == [n for n, _ in model.named_buffers()]
    assert isinstance(fast.get_submodule("unused"), nn.Linear)


def test_optimizer_steps_follow_eager():
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 9, groups=8, padding=4))
    x = torch.randn(2, 3, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always")
    eager = copy.deepcopy(model)
    opt_fast = torch.optim.SGD(fast.parameters(), lr=0.5, momentum=0.9)
    opt_eager = torch.optim.SGD(eager.parameters(), lr=0.5, momentum=0.9)
    for _ in range(3):
        for module, opt in ((fast, opt_fast), (eager, opt_eager)):
            opt.zero_grad()
            module(x).square().mean().backward()
            opt.step()
        with torch.no_grad():
            assert_scaled_close(fast(x), eager(x))
    # the weights really moved, so stale spectra would have shown
    assert not torch.allclose(eager[0].weight, model[0].weight)


def test_weight_assignment_in_no_grad_is_seen():
    model = nn.Sequential(nn.Conv2d(3, 4, 7, padding=3))
    x = torch.randn(1, 3, 10, 10)
    fast = specfx.optimize(model, (x,), policy="always")
    fast(x)
    with torch.no_grad():
        fast.get_parameter("0.weight").mul_(-2)
        model[0].weight.mul_(-2)
    assert_scaled_close(fast(x), model(x))
    fast.get_submodule("0").weight = nn.Parameter(torch.randn(4, 3, 7, 7))
    expected = F.conv2d(x, fast.get_parameter("0.weight"), model[0].bias, padding=3)
    assert_scaled_close(fast(x), expected)


def test_original_not_mutated():
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.BatchNorm2d(8), nn.Dropout(0.5),
                          nn.Conv2d(8, 8, 9, groups=8, padding=4)).train()
    before = state_snapshot(model)
    params = [p for p in model.parameters()]
    x = torch.randn(2, 3, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always")
    assert_all_lowered(fast, 2)
    assert_same_state(model, before)  # running stats and num_batches_tracked untouched
    assert [p for p in model.parameters()] == params
    assert all(p.grad is None for p in model.parameters())
    assert model.training and all(m.training for m in model.modules())
    assert isinstance(model[0], nn.Conv2d)
    assert not any(p is q for p in fast.parameters() for q in model.parameters())

    # the optimized module trains like the original: same dropout mask, same BN updates
    eager = copy.deepcopy(model)
    torch.manual_seed(7)
    actual = fast(x)
    torch.manual_seed(7)
    expected = eager(x)
    assert_scaled_close(actual, expected)
    assert_scaled_close(fast.get_buffer("1.running_mean"), eager[1].running_mean)
    assert_scaled_close(fast.get_buffer("1.running_var"), eager[1].running_var)
    assert_same_state(model, before)

    fast.eval()
    eager.eval()
    assert_scaled_close(fast(x), eager(x))


def test_second_optimize_is_noop():
    model, x = Net(), torch.randn(2, 4, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always")
    again = specfx.optimize(fast, (x,), policy="always")
    assert again.code == fast.code
    report = again.specfx_report
    assert report.decisions == []
    assert not any(p.modified for p in report.passes)
    assert list(again.state_dict()) == list(model.state_dict())
    assert torch.equal(again(x), fast(x))


def test_batch_size_may_change_spatial_size_may_not():
    model, x = Net(), torch.randn(2, 4, 12, 12)
    fast = specfx.optimize(model, (x,), policy="always")
    x5 = torch.randn(5, 4, 12, 12)
    assert_scaled_close(fast(x5), model(x5))
    x1 = torch.randn(4, 12, 12)  # unbatched
    assert_scaled_close(fast(x1), model(x1))
    with pytest.raises(ValueError, match=r"(?s)\[12, 12\].*\[16, 12\].*specfx\.optimize again"):
        fast(torch.randn(2, 4, 16, 12))


# --- 5. weight parametrizations --------------------------------------------------------------

class PositionalConv(nn.Module):
    """Like wav2vec2's positional conv embedding: weight_norm over the kernel axis,
    grouped, padded by half the (even) kernel, last output dropped."""

    def __init__(self, channels=16, kernel=8, groups=4):
        super().__init__()
        self.conv = weight_norm(nn.Conv1d(channels, channels, kernel, padding=kernel // 2, groups=groups),
                                name="weight", dim=2)

    def forward(self, x):
        return x + F.gelu(self.conv(x)[..., :-1])


def test_weight_norm_conv():
    model, x = PositionalConv(), torch.randn(2, 16, 30)
    fast = specfx.optimize(model, (x,), policy="always")
    assert fast.specfx_report.lowered == ["conv"]
    assert_all_lowered(fast, 1)
    assert list(fast.state_dict()) == list(model.state_dict()) == [
        "conv.bias", "conv.parametrizations.weight.original0", "conv.parametrizations.weight.original1"]
    assert parametrize.is_parametrized(fast.get_submodule("conv"), "weight")
    check_forward_backward(model, fast, x)  # includes the gradients of original0/1

    # a new magnitude vector reaches the output (the weight is recomputed every call)
    with torch.no_grad():
        fast.get_parameter("conv.parametrizations.weight.original0").mul_(3)
        model.conv.parametrizations.weight.original0.mul_(3)
    assert_scaled_close(fast(x), model(x))


# --- 7. errors ------------------------------------------------------------------------------

def test_wrong_example_input_shape():
    model = Net()
    with pytest.raises(specfx.ExampleInputError, match=r"\(2, 3, 12, 12\)") as info:
        specfx.optimize(model, (torch.randn(2, 3, 12, 12),))
    message = str(info.value)
    assert "Net" in message and "RuntimeError" in message and "channels" in message


def test_model_that_raises():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            raise KeyError("missing feature 'pixel_mask'")

    with pytest.raises(specfx.ExampleInputError, match="pixel_mask") as info:
        specfx.optimize(Broken(), torch.randn(1, 3, 8, 8))
    assert isinstance(info.value.__cause__, KeyError)


def test_non_module_model():
    with pytest.raises(TypeError, match="nn.Module"):
        specfx.optimize(lambda x: x, (torch.randn(2),))
    with pytest.raises(TypeError, match="nn.Module"):
        specfx.explain(F.conv2d, (torch.randn(2),))


def test_bad_policy():
    with pytest.raises(ValueError, match="policy"):
        specfx.optimize(Net(), (torch.randn(1, 4, 8, 8),), policy="fast")
    with pytest.raises(ValueError, match="policy"):
        specfx.explain(Net(), (torch.randn(1, 4, 8, 8),), policy="sometimes")


def test_bad_frontend():
    with pytest.raises(ValueError, match="frontend"):
        specfx.optimize(Net(), (torch.randn(1, 4, 8, 8),), frontend="dynamo")


# --- 8. verification ------------------------------------------------------------------------

def _shift_lowered_conv(gm: fx.GraphModule, index: int) -> None:
    """Corrupt the ``index``-th lowered conv (merged, or a chain's ``spectral_mix``): place
    its kernel with the wrong shift."""
    shift_arg = {SPECTRAL_CONV: 6, torch.ops.specfx.spectral_mix.default: 4}
    convs = [n for n in gm.graph.nodes if n.target in shift_arg]
    args = list(convs[index].args)
    at = shift_arg[convs[index].target]
    args[at] = [s + 1 for s in args[at]]
    convs[index].args = tuple(args)
    gm.recompile()


def test_verify_names_the_diverging_node():
    model = nn.Sequential(nn.Conv2d(3, 8, 5, padding=2), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.Tanh())
    x = torch.randn(2, 3, 12, 12)
    reference, _ = capture(copy.deepcopy(model), (x,), "symbolic_trace")
    # per-conv lowering, so that each conv is its own node (no fused chain)
    fast = specfx.optimize(reference, (x,), policy="always", chains=False)
    verified = verify(model, reference, fast, (x,))
    assert verified.error <= verified.tolerance

    _shift_lowered_conv(fast, 1)
    with pytest.raises(specfx.VerificationError) as info:
        verify(model, reference, fast, (x,))
    message = str(info.value)
    # the second conv's node, not the first conv's, nor the tanh after it
    second = [n.name for n in fast.graph.nodes if n.target is SPECTRAL_CONV][1]
    assert f"node {second!r}" in message
    assert "lowered from conv '2'" in message


def test_optimize_raises_verification_error(monkeypatch):
    def corrupt(gm, ctx):
        _shift_lowered_conv(gm, 0)
        return PassResult(gm, True)

    pipeline = list(specfx.passes.PIPELINE) + [
        specfx.pipeline.RegisteredPass("corrupt", corrupt, analysis=False, doc="test: break the first conv")]
    monkeypatch.setattr(specfx.passes, "PIPELINE", pipeline)
    model, x = Net(), torch.randn(2, 4, 12, 12)
    with pytest.raises(specfx.VerificationError, match=r"lowered from conv 'layer1\.conv'"):
        specfx.optimize(model, (x,), policy="always", chains=False)  # per-conv lowering
    # verify=False returns the (wrong) module without checking
    fast = specfx.optimize(model, (x,), policy="always", verify=False)
    assert fast.specfx_report.verified_error is None


def test_verify_tolerance_override():
    model = nn.Sequential(nn.Conv2d(3, 4, 5, padding=2))
    x = torch.randn(2, 3, 12, 12)
    with pytest.raises(specfx.VerificationError, match=r"exceeds tolerance 0e\+00"):
        # fp32 rounding is nonzero; a tolerance of zero rejects it
        specfx.optimize(model, (x,), policy="always", verify_tol=0.0)
    fast = specfx.optimize(model, (x,), policy="always", verify_tol=1e-3)
    assert fast.specfx_report.verified_tolerance == 1e-3
    for bad in (-1e-4, float("nan"), "1e-4"):
        with pytest.raises(ValueError, match="verify_tol"):
            specfx.optimize(model, (x,), policy="always", verify_tol=bad)
