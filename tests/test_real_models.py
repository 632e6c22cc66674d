"""The real-model corpus (tests/real_models.py): every model × {"always", "auto"} is
optimized, its outputs match the original's, the original's state_dict is bit-identical
afterwards, and under "always" at least one conv was lowered.

Run it alone (about 2-4 minutes on a 2-core CPU; ``-p no:logging`` keeps torch.export's
DEBUG records out of failure reports)::

    .venv/bin/python -m pytest tests/test_real_models.py -q -p no:logging

Tolerance. A lowered conv rounds differently from torch's direct conv, so the optimized
model is another fp32 evaluation of the same function: how far it may be from the original
depends on how much rounding the model amplifies, which the original's own fp32 run shows.
For each output tensor the fp64 evaluation of the original (a copy in float64) gives

    eager_err = max |original_fp32 − original_fp64|

and the optimized output must be within

    atol = max(ERR_FACTOR · eager_err, FLOOR · max |original_fp64|),   rtol = 0

of the original's fp32 output. An FFT conv's error is ~eps·log2(N) of its output's scale,
against ~eps·sqrt(K) for a direct conv (README, "Tolerance"): within a small factor of
direct's, so the optimized model's distance from fp64 is a few times eager_err at most, and
its distance from the fp32 original at most that plus eager_err. ERR_FACTOR = 10 leaves
room for that; FLOOR = 1e-5 (the per-op fp32 constant of tests/conftest.py) covers outputs
where eager happens to round almost exactly. A wrong conv (wrong tap, padding, stride,
groups, dilation) changes the output by a sizable fraction of its scale (make_non_degenerate
sees to it that every branch reaches the output), orders of magnitude above this:
test_corpus_shows_a_wrong_conv checks it (a conv output off by one position moves the
output by 300x to 1e5x the tolerance).

Measured (torch 2.13 CPU): eager_err is 2e-7 to 2e-6 of the output scale, 2e-4 for
MobileNetV2 (17 BatchNorm'd inverted residuals); under "always" the optimized output's
distance from fp64 is 0.7x to 5x eager's, its distance from the fp32 original 0.03 to 0.2
of atol.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import specfx
from real_models import CORPUS, constant_parameters


ERR_FACTOR = 10.0
FLOOR = 1e-5
POLICIES = ("always", "auto")


def _tensors(out) -> list[torch.Tensor]:
    """The output tensors of a model, in a fixed order (ModelOutput fields, tuples, lists)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


@functools.lru_cache(maxsize=None)
def _reference(name: str):
    """The model, its inputs, its fp32 outputs, its fp64 outputs, and its state before any
    optimize (built once per model; both policies optimize the same instance)."""
    model, inputs = CORPUS[name].build()
    with torch.no_grad():
        expected = [t.clone() for t in _tensors(model(*inputs))]
        model64 = copy.deepcopy(model).double()
        exact = [t.clone() for t in _tensors(model64(*(x.double() for x in inputs)))]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    return model, inputs, expected, exact, state


def _atols(expected, exact) -> list[float]:
    """The tolerance of each output (module docstring)."""
    return [max(ERR_FACTOR * (e.double() - e64).abs().max().item(), FLOOR * e64.abs().max().item())
            for e, e64 in zip(expected, exact)]


def test_corpus_weights_are_non_degenerate():
    """No parameter of more than one element is left constant (norm scales, layer-scale
    gammas, zero-initialized residual branches all got ordinary values)."""
    for name in CORPUS:
        model, *_ = _reference(name)
        assert constant_parameters(model) == [], name
        assert not model.training, name


WRONG_CONV_SAMPLES = 5


@pytest.mark.parametrize("name", list(CORPUS))
def test_corpus_shows_a_wrong_conv(name):
    """The corpus can fail: a conv whose output is off by one position (the likeliest FFT
    mistake: a tap placed one sample over), tried on up to WRONG_CONV_SAMPLES convs of the
    model spread over its depth, moves the output by far more than the tolerance. (With
    the models' own init, ConvNext's depthwise convs and MobileNetV2's and EfficientNet's
    early convs did not: make_non_degenerate.)"""
    model, inputs, expected, exact, _ = _reference(name)
    atols = _atols(expected, exact)
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed]
    step = max(1, len(convs) // WRONG_CONV_SAMPLES)
    sample = convs[::step][:WRONG_CONV_SAMPLES - 1] + convs[-1:]
    tried = 0
    for conv_name, conv in sample:
        shapes = []

        def off_by_one(module, args, out):
            shapes.append(out.shape)
            return out.roll(1, -1)

        handle = conv.register_forward_hook(off_by_one)
        try:
            with torch.no_grad():
                wrong = _tensors(model(*inputs))
        finally:
            handle.remove()
        if not shapes or shapes[0][-1] == 1:  # not run (an unused module), or nothing to shift
            continue
        tried += 1
        change = max((w - e).abs().max().item() / a for w, e, a in zip(wrong, expected, atols))
        assert change > 100, f"{name}: an off-by-one {conv_name} moves the output by only {change:.3g}x the tolerance"
    assert tried, name


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("name", list(CORPUS))
def test_real_model(name, policy):
    model, inputs, expected, exact, state = _reference(name)

    fast = specfx.optimize(model, inputs, policy=policy)
    report = fast.specfx_report

    # the original is untouched: same keys, bit-identical tensors
    after = model.state_dict()
    assert list(after) == list(state)
    changed = [k for k, v in after.items() if not torch.equal(v, state[k])]
    assert changed == [], f"optimize modified the original's state_dict: {changed}"

    if policy == "always":
        assert report.lowered, f"no conv lowered under policy='always':\n{report}"

    with torch.no_grad():
        actual = _tensors(fast(*inputs))
    assert len(actual) == len(expected)
    for i, (a, e, e64, atol) in enumerate(zip(actual, expected, exact, _atols(expected, exact))):
        assert a.shape == e.shape and a.dtype == e.dtype, i
        eager_err = (e.double() - e64).abs().max().item()
        scale = e64.abs().max().item()
        torch.testing.assert_close(
            a, e, rtol=0, atol=atol,
            msg=lambda m: (f"{name} [{policy}] output {i}: {m}\n(scale {scale:.3g}, eager fp32 vs "
                           f"fp64 {eager_err:.3g}, atol {atol:.3g}; "
                           f"{len(report.lowered)} of {len(report.decisions)} convs lowered)"))
