"""Training through the spectral ops: the backward runs in the frequency domain and
reuses the forward's spectra (Mathieu, Henaff & LeCun, "Fast Training of Convolutional
Networks through FFTs").

A lowered conv's training step transforms ``x``, ``w`` and ``dy`` forward once each and
``y``, ``dx`` and ``dw`` back once each: the input gradient reads the weight spectrum the
forward cached, the kernel gradient contracts the saved input spectrum with the output
gradient's spectrum. The tests count the transforms torch actually runs (the profiler's
``aten::_fft_*`` events, and the rows each one transforms, so that a transform split into
blocks still counts once), in eager mode and under ``torch.compile(backend="specfx")``;
check the gradients with fp64 ``gradcheck`` and ``gradgradcheck``; and train a small
large-kernel CNN for 50 steps next to eager.
"""

from __future__ import annotations

import collections
import copy
import math

import pytest
import torch
import torch._functorch.config
import torch._inductor.config
import torch.nn as nn
import torch.nn.functional as F
from conftest import assert_scaled_close
from torch.profiler import ProfilerActivity, profile

import specfx
from specfx.ops import SPECTRUM_CACHE

OPS = torch.ops.specfx
CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TRANSFORMS = {"aten::_fft_r2c": "forward", "aten::_fft_c2r": "inverse", "aten::_fft_c2c": "complex"}

# name: (input shape, out channels, kernel, stride, padding, dilation, groups, padding_mode)
CONFIGS = {
    "dense_2d": ((2, 4, 12, 10), 6, (5, 3), 1, 2, 1, 1, "zeros"),
    "depthwise_multiplier_same_2d": ((2, 3, 11, 11), 6, 7, 1, "same", 1, 3, "zeros"),
    "grouped_strided_dilated_2d": ((2, 4, 13, 12), 4, 3, (2, 3), (2, 1), (2, 1), 2, "zeros"),
    "circular_strided_2d": ((1, 2, 9, 8), 3, 5, 2, 2, 1, 1, "circular"),
    "reflect_2d": ((2, 3, 10, 9), 2, 5, 1, 2, 1, 1, "reflect"),
    "replicate_dilated_1d": ((3, 2, 20), 4, 4, 1, 3, 2, 2, "replicate"),
    "valid_long_1d": ((2, 3, 40), 2, 17, 1, 0, 1, 1, "zeros"),
    "depthwise_3d": ((1, 2, 6, 5, 7), 2, 3, 1, 1, 1, 2, "zeros"),
}


def make_conv(config, dtype=torch.float32, seed=0) -> tuple[nn.Module, torch.Tensor]:
    shape, c_out, k, stride, padding, dilation, groups, mode = config
    torch.manual_seed(seed)
    conv = CONVS[len(shape) - 2](shape[1], c_out, k, stride=stride, padding=padding, dilation=dilation,
                                 groups=groups, padding_mode=mode).to(dtype)
    return conv, torch.randn(shape, dtype=dtype)


def count_transforms(fn, rank: int) -> tuple[collections.Counter, collections.Counter]:
    """Calls and transformed rows (the product of the dims before the last ``rank``) of
    each kind of FFT torch runs during ``fn()``."""
    calls, rows = collections.Counter(), collections.Counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    for event in prof.events():
        kind = TRANSFORMS.get(event.name)
        if kind is not None:
            calls[kind] += 1
            rows[kind] += math.prod(event.input_shapes[0][:-rank])
    return calls, rows


def expected_rows(conv: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """Rows of the six transforms of one training step: x, w and dy forward; y, dx and dw back."""
    channel_dim = x.dim() - (conv.weight.dim() - 2) - 1
    batch, c_in, c_out = math.prod(x.shape[:channel_dim]), x.shape[channel_dim], conv.weight.shape[0]
    kernels = conv.weight.shape[0] * conv.weight.shape[1]
    return {"forward": batch * c_in + kernels + batch * c_out, "inverse": batch * c_out + batch * c_in + kernels}


class TrainingStep:
    """One SGD training step of ``model`` on ``x`` (which needs its gradient, as inside a
    network); the first :meth:`prepare` runs warm-up steps, so that the counted step finds
    weights the previous step changed, as every step of a training loop does."""

    def __init__(self, model: nn.Module, x: torch.Tensor) -> None:
        self.model, self.x = model, x.detach().clone().requires_grad_()
        self.optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
        with torch.no_grad():
            shape = model(self.x).shape
        self.dy = torch.randn(shape, generator=torch.Generator().manual_seed(1), dtype=x.dtype)

    def __call__(self) -> None:
        self.optimizer.zero_grad()
        self.x.grad = None
        self.model(self.x).backward(self.dy)

    def prepare(self, warmup: int = 2) -> None:
        for _ in range(warmup):
            self()
            self.optimizer.step()


def assert_three_and_three(conv: nn.Module, x: torch.Tensor, step: TrainingStep) -> None:
    """One step runs 3 forward and 3 inverse transforms (no complex-to-complex ones), of
    exactly the rows of x, w, dy and of y, dx, dw, and computes the weight spectrum once:
    one cache miss in the forward, one hit in the backward."""
    rank = conv.weight.dim() - 2
    hits, misses = SPECTRUM_CACHE.hits, SPECTRUM_CACHE.misses
    calls, rows = count_transforms(step, rank)
    assert (SPECTRUM_CACHE.hits - hits, SPECTRUM_CACHE.misses - misses) == (1, 1)
    assert calls["forward"] <= 3 and calls["inverse"] <= 3 and calls["complex"] == 0, calls
    assert dict(rows) == expected_rows(conv, x)


# --- the transforms of a training step -----------------------------------------------------

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_training_step_runs_three_forward_and_three_inverse_transforms(name):
    conv, x = make_conv(CONFIGS[name])
    fast = specfx.optimize(conv, (x,), policy="always")
    assert fast.specfx_report.lowered
    step = TrainingStep(fast, x)
    step.prepare()
    assert_three_and_three(conv, x, step)


def test_transforms_split_into_blocks_still_transform_each_tensor_once():
    """Large tensors are transformed a block of rows at a time (forward and backward, and
    the kernel spectra in both): more calls, the same rows."""
    conv, x = make_conv(((2, 64, 128, 128), 64, 9, 1, "same", 1, 64, "zeros"))
    fast = specfx.optimize(conv, (x,), policy="always")
    step = TrainingStep(fast, x)
    step.prepare()
    calls, rows = count_transforms(step, 2)
    assert calls["forward"] > 3 and calls["inverse"] > 3
    assert dict(rows) == expected_rows(conv, x)


def test_training_under_torch_compile_uses_the_same_backward():
    """The compiled backward holds the gradient ops as single nodes: the input gradient
    reads the weight spectrum the compiled forward cached, nothing transforms the weight
    again (traced into plain tensor code it would). The caches are off so that the graphs
    are traced from this code, not loaded from an earlier run's."""
    config = CONFIGS["grouped_strided_dilated_2d"]
    conv, x = make_conv(config)
    model = copy.deepcopy(conv)
    compiled = torch.compile(model, backend="specfx", options={"policy": "always"})
    with torch._functorch.config.patch(enable_autograd_cache=False), \
            torch._inductor.config.patch(fx_graph_cache=False):
        step = TrainingStep(compiled, x)
        step.prepare()
        assert_three_and_three(conv, x, step)
    reference = TrainingStep(conv, x)
    reference.prepare()
    reference()
    for got, want in zip(model.parameters(), conv.parameters()):
        assert_scaled_close(got.grad, want.grad)
    assert_scaled_close(step.x.grad, reference.x.grad)


# --- weight spectra: once per step in training, cached across calls in inference ---------

def test_weight_spectrum_is_computed_once_per_step_and_follows_the_weights():
    conv, x = make_conv(CONFIGS["dense_2d"])
    fast = specfx.optimize(conv, (x,), policy="always")
    ours, theirs = TrainingStep(fast, x), TrainingStep(conv, x)
    for _ in range(3):
        ours()
        theirs()
        ours.optimizer.step()
        theirs.optimizer.step()
        hits, misses = SPECTRUM_CACHE.hits, SPECTRUM_CACHE.misses
        ours()
        assert (SPECTRUM_CACHE.hits - hits, SPECTRUM_CACHE.misses - misses) == (1, 1)
        theirs()
        for got, want in zip(fast.parameters(), conv.parameters()):
            assert_scaled_close(got.grad, want.grad)
    # Inference reuses the spectrum across calls: the last step's, until the weights change.
    for changed in (False, True):
        if changed:
            ours.optimizer.step()
            theirs.optimizer.step()
        hits, misses = SPECTRUM_CACHE.hits, SPECTRUM_CACHE.misses
        with torch.no_grad():
            for _ in range(3):
                assert_scaled_close(fast(x), conv(x))
        assert (SPECTRUM_CACHE.hits - hits, SPECTRUM_CACHE.misses - misses) == ((2, 1) if changed else (3, 0))


def test_input_spectrum_is_saved_only_for_the_weight_gradient():
    """A frozen conv (fine-tuning around it) keeps no input spectrum for its backward."""
    conv, x = make_conv(CONFIGS["dense_2d"])
    fast = specfx.optimize(conv, (x,), policy="always")
    for p in fast.parameters():
        p.requires_grad_(False)
    y = fast(x.requires_grad_())
    node = y.grad_fn
    while "spectral_mix" not in type(node).__name__:
        node = node.next_functions[0][0]
    x_hat, weight = node.saved_tensors
    assert x_hat is None and weight is not None


# --- gradients -----------------------------------------------------------------------------

# The configurations above, on inputs small enough for finite differences.
GRADCHECK_CONFIGS = {
    "dense_2d": ((1, 2, 6, 5), 3, (3, 2), 1, 1, 1, 1, "zeros"),
    "depthwise_multiplier_same_2d": ((2, 2, 5, 5), 4, 3, 1, "same", 1, 2, "zeros"),
    "grouped_strided_dilated_2d": ((1, 4, 7, 6), 2, 2, (2, 3), (2, 1), (2, 1), 2, "zeros"),
    "circular_strided_2d": ((1, 2, 5, 6), 2, 3, 2, (2, 1), 1, 1, "circular"),
    "reflect_2d": ((1, 2, 5, 4), 2, 3, 1, 1, 1, 1, "reflect"),
    "replicate_dilated_1d": ((2, 2, 9), 2, 3, 1, 2, 2, 2, "replicate"),
    "valid_long_1d": ((2, 2, 14), 2, 9, 1, 0, 1, 1, "zeros"),
    "depthwise_3d": ((1, 2, 4, 3, 4), 2, 2, 1, 1, 1, 2, "zeros"),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CONFIGS))
def test_gradcheck_and_gradgradcheck_fp64(name):
    """First and second derivatives of the lowered conv equal finite differences (fp64):
    the backward's own backward runs through the same spectral ops. The second derivatives
    are checked in gradgradcheck's fast mode (random projections of the Jacobian; a wrong
    formula fails it as surely, at a fraction of the cost)."""
    conv, x = make_conv(GRADCHECK_CONFIGS[name], torch.float64)
    leaves = (x.requires_grad_(), conv.weight.detach().requires_grad_(), conv.bias.detach().requires_grad_())

    def spectral(x, weight, bias):
        return specfx.spectral_conv(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups,
                                    conv.padding_mode)

    assert torch.autograd.gradcheck(spectral, leaves)
    assert torch.autograd.gradgradcheck(spectral, leaves, fast_mode=True)


def gradient_op_arguments(dtype):
    torch.manual_seed(0)
    fft, bins, groups = [5, 4], [5, 3], 2
    grad = torch.randn(2, 2, *bins, dtype=dtype, requires_grad=True)
    x_hat = torch.randn(2, 4, *bins, dtype=dtype, requires_grad=True)
    weight = torch.randn(2, 2, 3, 2, dtype=dtype.to_real(), requires_grad=True)
    return {
        "spectral_mix_grad_input": (grad, weight, fft, [2, 1], [1, 0], groups),
        "spectral_mix_grad_weight": (x_hat, grad, [3, 2], fft, [2, 1], [1, 0], groups, weight.dtype),
        "to_spectrum_adjoint": (x_hat, [4, 3], fft, weight.dtype),
    }


@pytest.mark.parametrize("op_name", ["spectral_mix_grad_input", "spectral_mix_grad_weight", "to_spectrum_adjoint"])
def test_gradient_ops_pass_opcheck_and_gradcheck_on_arbitrary_spectra(op_name):
    """The gradient ops are registered like the forward ops (fake impl, autograd), and
    their own gradients hold for any complex spectra, not only those of real signals."""
    torch.library.opcheck(getattr(OPS, op_name), gradient_op_arguments(torch.complex64)[op_name])
    args = gradient_op_arguments(torch.complex128)[op_name]
    tensors = [a for a in args if isinstance(a, torch.Tensor)]

    def op(*ts):
        it = iter(ts)
        return getattr(OPS, op_name)(*[next(it) if isinstance(a, torch.Tensor) else a for a in args])

    assert torch.autograd.gradcheck(op, tensors)


# --- a training run ------------------------------------------------------------------------

def grating_batch(gen: torch.Generator, n: int = 8, size: int = 24, classes: int = 4):
    """Noisy sinusoidal gratings, labelled by their orientation (one of ``classes``), with
    random spatial frequency and phase: a task large kernels suit."""
    labels = torch.randint(0, classes, (n,), generator=gen)
    theta = labels.double() * math.pi / classes
    freq = 0.15 + 0.1 * torch.rand(n, generator=gen, dtype=torch.float64)
    phase = 2 * math.pi * torch.rand(n, generator=gen, dtype=torch.float64)
    r = torch.arange(size, dtype=torch.float64)
    rows, cols = torch.meshgrid(r, r, indexing="ij")
    proj = cols * theta.cos()[:, None, None] + rows * theta.sin()[:, None, None]
    image = torch.sin(2 * math.pi * freq[:, None, None] * proj + phase[:, None, None])
    noise = 0.5 * torch.randn(n, 3, size, size, generator=gen, dtype=torch.float64)
    return image[:, None] + noise, labels


class LargeKernelNet(nn.Module):
    """A small RepLKNet/SLaK-style CNN: a 3x3 stem, a 13x13 depthwise block with a 1x1
    mix and a residual, a strided circular 9x9 grouped conv, a reflect-padded dense 7x7."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.large = nn.Conv2d(16, 16, 13, padding="same", groups=16)
        self.mix = nn.Conv2d(16, 16, 1)
        self.down = nn.Conv2d(16, 32, 9, stride=2, padding=4, groups=16, padding_mode="circular")
        self.dense = nn.Conv2d(32, 32, 7, padding=3, padding_mode="reflect")
        self.head = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.stem(x))
        x = x + self.mix(F.gelu(self.large(x)))
        x = F.relu(self.dense(F.relu(self.down(x))))
        return self.head(x.abs().mean(dim=(2, 3)))


def train(model: nn.Module, batches, steps: int = 50) -> torch.Tensor:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.015, momentum=0.9)
    losses = []
    for x, labels in batches[:steps]:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), labels)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
def test_fifty_training_steps_follow_eagers_loss_curve(dtype, tol):
    """50 SGD steps (lr 0.015, momentum 0.9; the mean loss of the last 10 steps is ~0.6 of
    the first 10's) of the same network from the same weights on the same batches, every
    conv lowered: each step's loss equals eager's within ``tol`` relative.

    fp64 (tol 1e-10; 2e-15 measured) shows the training is exact up to rounding. fp32
    (tol 1e-4, as test_backend's training test; 3e-7 measured): rounding differences
    (eager's own included) are amplified from step to step, the more so the faster a run
    learns (at lr 0.02 the two fp32 curves part by 4e-3 within the 50 steps), so the bound
    holds for this learning rate.
    """
    gen = torch.Generator().manual_seed(0)
    batches = [(x.to(dtype), labels) for x, labels in (grating_batch(gen) for _ in range(50))]
    torch.manual_seed(0)
    eager = LargeKernelNet().to(dtype)
    fast = specfx.optimize(eager, (batches[0][0],), policy="always")
    assert fast.specfx_report.lowered == ["stem", "large", "mix", "down", "dense"]
    expected = train(eager, batches)
    actual = train(fast, batches)
    assert expected[-10:].mean() < 0.8 * expected[:10].mean()  # it learns
    torch.testing.assert_close(actual, expected, rtol=tol, atol=0)
