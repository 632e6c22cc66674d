"""Tiny, randomly initialized Hugging Face models (built from a config; nothing is
downloaded): symbolic_trace cannot capture them, so specfx falls back to torch.export,
lowers their convolutions, and the outputs match the original's.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import specfx
from conftest import assert_scaled_close


@pytest.fixture(scope="module")
def wav2vec2():
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
        conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4)
    model = transformers.Wav2Vec2Model(config).eval()
    x = torch.randn(2, 400)
    fast = specfx.optimize(model, (x,), policy="always")
    return model, fast, x


POS_CONV = "encoder.pos_conv_embed.conv"
FEATURE_CONVS = ["feature_extractor.conv_layers.0.conv", "feature_extractor.conv_layers.1.conv"]


def test_wav2vec2_falls_back_to_export_and_lowers_every_conv(wav2vec2):
    model, fast, x = wav2vec2
    report = fast.specfx_report
    assert report.frontend == "export"
    assert report.capture_notes and report.capture_notes[0].startswith("symbolic_trace:")
    assert report.lowered == FEATURE_CONVS + [POS_CONV]
    assert report.kept == {}
    decision = {d.name: d for d in report.decisions}[POS_CONV]
    assert "k=16 groups=4" in decision.description
    assert report.verified_error <= report.verified_tolerance


def test_wav2vec2_outputs_match(wav2vec2):
    model, fast, x = wav2vec2
    with torch.no_grad():
        expected, actual = model(x), fast(x)
    assert type(actual) is type(expected)
    assert_scaled_close(actual.last_hidden_state, expected.last_hidden_state)
    assert_scaled_close(actual.extract_features, expected.extract_features)
    # another batch size runs through the same graph
    x3 = torch.randn(3, 400)
    with torch.no_grad():
        assert_scaled_close(fast(x3).last_hidden_state, model(x3).last_hidden_state)
    with pytest.raises(ValueError, match="specfx.optimize again"):
        fast(torch.randn(2, 480))


def test_wav2vec2_weight_norm_state_and_gradients(wav2vec2):
    model, fast, x = wav2vec2
    keys = list(model.state_dict())
    assert list(fast.state_dict()) == keys
    magnitude = f"{POS_CONV}.parametrizations.weight.original0"
    direction = f"{POS_CONV}.parametrizations.weight.original1"
    assert magnitude in keys and direction in keys

    model.zero_grad(set_to_none=True)
    fast.zero_grad(set_to_none=True)
    upstream = torch.randn_like(model(x).last_hidden_state)
    (model(x).last_hidden_state * upstream).sum().backward()
    (fast(x).last_hidden_state * upstream).sum().backward()
    ref, opt = dict(model.named_parameters()), dict(fast.named_parameters())
    for name in (magnitude, direction, f"{POS_CONV}.bias", "feature_extractor.conv_layers.0.conv.weight"):
        assert opt[name].grad is not None, name
        assert_scaled_close(opt[name].grad, ref[name].grad)
    model.zero_grad(set_to_none=True)


def test_wav2vec2_loads_new_weights(wav2vec2):
    model, fast, x = wav2vec2
    torch.manual_seed(1)
    other = transformers.Wav2Vec2Model(model.config).eval()
    fast_copy = specfx.optimize(model, (x,), policy="always", verify=False)
    fast_copy.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert_scaled_close(fast_copy(x).last_hidden_state, other(x).last_hidden_state)


def test_convnext_depthwise_convs():
    torch.manual_seed(0)
    config = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1], num_stages=2,
                                         image_size=32)
    model = transformers.ConvNextModel(config).eval()
    x = torch.randn(2, 3, 32, 32)
    fast = specfx.optimize(model, (x,), policy="always")
    report = fast.specfx_report
    assert report.frontend == "export"
    dwconvs = ["encoder.stages.0.layers.0.dwconv", "encoder.stages.1.layers.0.dwconv"]
    assert set(dwconvs) <= set(report.lowered)
    assert sorted(report.lowered) == sorted(
        ["embeddings.patch_embeddings", "encoder.stages.1.downsampling_layer.1"] + dwconvs)
    assert report.kept == {}
    for name in dwconvs:
        description = {d.name: d for d in report.decisions}[name].description
        assert "k=7x7 depthwise" in description
    with torch.no_grad():
        expected, actual = model(x), fast(x)
    assert_scaled_close(actual.last_hidden_state, expected.last_hidden_state)
    assert_scaled_close(actual.pooler_output, expected.pooler_output)
    assert list(fast.state_dict()) == list(model.state_dict())

    # under the cost model, the small dense convs stay direct; every kept conv has a reason
    explained = specfx.explain(model, (x,))
    assert explained.frontend == "export"
    assert len(explained.decisions) == 4
    for name in ("embeddings.patch_embeddings", "encoder.stages.1.downsampling_layer.1"):
        assert "dense kernel" in explained.kept[name]
    assert all(reason for reason in explained.kept.values())
