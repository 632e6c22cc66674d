"""A corpus of real models, as a user would bring them: the vision and audio models of
``transformers`` and monai's 3D segmentation networks, built from small configs with
random weights (nothing is downloaded), made non-degenerate so that a wrong conv shows in
the output.

``CORPUS`` maps a name to a :class:`Case`; ``case.build()`` returns the model (eval mode,
non-degenerate weights) and its example inputs, the same on every call.

Random init alone hides wrong convs, in three ways found in this corpus:

- norm layers start at scale 1 and shift 0, and several architectures start residual
  branches at (or near) zero: ConvNext's layer-scale gammas are 1e-6, MedNeXt's global
  response norm starts at zero, "zero-init last BN" options scale a branch by 0; a branch
  whose conv is wrong then adds nothing to the output;
- BatchNorm's running statistics start at mean 0, var 1, whatever the activations are:
  in eval mode nothing renormalizes them;
- transformers initializes MobileNetV2's and EfficientNet's conv kernels from N(0, 0.02),
  far below fan-in scale: each layer shrinks the signal ~10x, and with the running
  statistics above the first 40 convs of MobileNetV2 reach the output at 1e-20 of its
  scale (flipping the stem's kernel changed no output bit).

:func:`make_non_degenerate` gives every norm scale and shift and every
constant-initialized parameter ordinary random values, redraws conv kernels drawn far below
fan-in scale at that scale, and sets running statistics near the activations' own (from
one forward pass in train mode on the example inputs), randomly off them.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn


# ---------------------------------------------------------------------------------------
# Non-degenerate weights

_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def _is_constant(t: torch.Tensor) -> bool:
    return t.numel() > 0 and bool((t == t.reshape(-1)[0]).all())


def make_non_degenerate(model: nn.Module, inputs: tuple = (), seed: int = 0) -> nn.Module:
    """Give ``model`` weights under which every conv contributes to the output (in place;
    returns ``model``, in eval mode).

    - norm layers (BatchNorm/InstanceNorm, LayerNorm, GroupNorm; and modules named like a
      norm with a 1-D ``weight``): scale ~ U(0.5, 1.5), shift ~ N(0, 0.1);
    - every other parameter that init left constant (zeros, ones, a layer-scale 1e-6, a
      residual scale of 0): a ``bias``/``beta`` ~ N(0, 0.1), any other ~ U(0.5, 1.5);
    - conv kernels (not transposed, not parametrized) whose std is under a quarter of
      ``1/sqrt(fan_in)`` are redrawn from N(0, 1/fan_in) (PyTorch's and monai's default
      init are at that scale and stay as they are);
    - running statistics: with ``inputs``, measured by one forward pass in train mode
      (cumulative average), then moved off: mean += N(0, 0.1)·std, var *= U(0.5, 1.5);
      without, mean ~ N(0, 0.1), var ~ U(0.5, 1.5).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(shape, lo: float = 0.5, hi: float = 1.5) -> torch.Tensor:
        return torch.rand(shape, generator=gen, dtype=torch.float64).mul(hi - lo).add(lo)

    def randn(shape, std: float = 0.1) -> torch.Tensor:
        return torch.randn(shape, generator=gen, dtype=torch.float64).mul(std)

    with torch.no_grad():
        for module in model.modules():
            weight = getattr(module, "weight", None)
            bias = getattr(module, "bias", None)
            named_norm = ("norm" in type(module).__name__.lower()
                          and isinstance(weight, nn.Parameter) and weight.dim() == 1)
            if isinstance(module, _NORMS) or named_norm:
                if isinstance(weight, torch.Tensor) and weight.is_floating_point():
                    weight.copy_(rand(weight.shape))
                if isinstance(bias, torch.Tensor) and bias.is_floating_point():
                    bias.copy_(randn(bias.shape))
            if (isinstance(module, nn.modules.conv._ConvNd) and not module.transposed
                    and "weight" in module._parameters):
                fan_in = module.weight[0].numel()
                if module.weight.std().item() < 0.25 / fan_in ** 0.5:
                    module.weight.copy_(randn(module.weight.shape, fan_in ** -0.5))

        for name, param in model.named_parameters():
            if param.is_floating_point() and _is_constant(param):
                leaf = name.rsplit(".", 1)[-1].lower()
                param.copy_(randn(param.shape) if leaf.endswith(("bias", "beta")) else rand(param.shape))

    batch_norms = [m for m in model.modules()
                   if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats]
    if inputs and batch_norms:
        momenta = [m.momentum for m in batch_norms]
        for m in batch_norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average: one batch gives its own statistics
        torch.manual_seed(seed)  # dropout / stochastic depth in train mode
        model.train()
        with torch.no_grad():
            model(*inputs)
        for m, momentum in zip(batch_norms, momenta):
            m.momentum = momentum
    with torch.no_grad():
        for m in batch_norms:
            if inputs:
                m.running_mean.add_(randn(m.running_mean.shape) * m.running_var.sqrt())
                m.running_var.mul_(rand(m.running_var.shape))
            else:
                m.running_mean.copy_(randn(m.running_mean.shape))
                m.running_var.copy_(rand(m.running_var.shape))
    return model.eval()


def constant_parameters(model: nn.Module) -> list[str]:
    """Names of the parameters (more than one element) that are still constant."""
    return [n for n, p in model.named_parameters() if p.numel() > 1 and _is_constant(p)]


# ---------------------------------------------------------------------------------------
# The corpus


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    config: str  # what the small config is, for reports

    def build(self) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
        torch.manual_seed(0)
        model = self.make_model()
        x = torch.randn(self.input_shape, generator=torch.Generator().manual_seed(2))
        make_non_degenerate(model, (x,), seed=1)
        return model, (x,)


def hf_model(model_cls: str, config_cls: str, **config) -> Callable[[], nn.Module]:
    """A factory of the ``transformers`` model ``model_cls`` built from ``config_cls(**config)``
    (random weights; nothing is downloaded)."""
    def make() -> nn.Module:
        import transformers
        return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config))
    return make


def monai_model(net: str, **kwargs) -> Callable[[], nn.Module]:
    """A factory of monai's ``networks.nets.<net>(**kwargs)``."""
    def make() -> nn.Module:
        from monai.networks import nets
        return getattr(nets, net)(**kwargs)
    return make


# Small speech models: two feature convs (k10 s5, k3 s2; 3200 samples, 0.2 s at 16 kHz,
# give 319 frames), hidden size 32, one transformer layer; the positional conv has
# wav2vec2-base's geometry (k128 in 16 groups), under which "auto" lowers it.
_AUDIO = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
              conv_dim=(16, 16), conv_kernel=(10, 3), conv_stride=(5, 2),
              num_conv_pos_embeddings=128, num_conv_pos_embedding_groups=16,
              hidden_dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
              feat_proj_dropout=0.0, layerdrop=0.0)
_AUDIO_SHORT = dict(_AUDIO, num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)

_CASES = [
    # --- transformers, vision ------------------------------------------------------------
    Case("resnet", hf_model("ResNetModel", "ResNetConfig", embedding_size=8, hidden_sizes=[16, 32],
                       depths=[1, 2], layer_type="bottleneck"),
         (2, 3, 32, 32), "bottleneck, embedding 8, hidden [16, 32], depths [1, 2]"),
    Case("resnet_basic", hf_model("ResNetModel", "ResNetConfig", embedding_size=8, hidden_sizes=[8, 16],
                             depths=[1, 1], layer_type="basic", downsample_in_first_stage=True),
         (2, 3, 32, 32), "basic blocks, embedding 8, hidden [8, 16], depths [1, 1]"),
    Case("convnext", hf_model("ConvNextModel", "ConvNextConfig", hidden_sizes=[8, 16], depths=[1, 2],
                         num_stages=2, image_size=32),
         (2, 3, 32, 32), "hidden [8, 16], depths [1, 2], k7 depthwise, layer scale"),
    Case("mobilenet_v2", hf_model("MobileNetV2Model", "MobileNetV2Config", depth_multiplier=0.35,
                             image_size=32),
         (2, 3, 48, 48), "depth multiplier 0.35 (17 inverted residuals), tf padding, 48x48 (last maps 2x2)"),
    Case("regnet", hf_model("RegNetModel", "RegNetConfig", embedding_size=8, hidden_sizes=[8, 16],
                       depths=[1, 2], groups_width=4, layer_type="y"),
         (2, 3, 32, 32), "Y blocks (SE), embedding 8, hidden [8, 16], depths [1, 2], group width 4"),
    Case("efficientnet", hf_model("EfficientNetModel", "EfficientNetConfig", image_size=32,
                             width_coefficient=0.25, depth_coefficient=0.5,
                             kernel_sizes=[3, 3, 5], in_channels=[32, 16, 24],
                             out_channels=[16, 24, 40], strides=[1, 2, 2],
                             num_block_repeats=[1, 2, 1], expand_ratios=[1, 6, 6],
                             hidden_dim=320, depthwise_padding=[]),
         (2, 3, 32, 32), "width 0.25, depth 0.5, 3 stages (k3, k3, k5), top conv 320"),
    # --- transformers, audio -------------------------------------------------------------
    Case("wav2vec2", hf_model("Wav2Vec2Model", "Wav2Vec2Config", **_AUDIO),
         (2, 3200), "hidden 32, 1 layer, feature convs (16, 16) k(10, 3) s(5, 2), pos conv k128 g16"),
    Case("wav2vec2_stable_ln", hf_model("Wav2Vec2Model", "Wav2Vec2Config", feat_extract_norm="layer",
                                   do_stable_layer_norm=True, **_AUDIO_SHORT),
         (2, 800), "as wav2vec2 with layer-norm feature extractor, pre-LN encoder, pos conv k16 g4"),
    Case("wav2vec2_conformer", hf_model("Wav2Vec2ConformerModel", "Wav2Vec2ConformerConfig",
                                   conv_depthwise_kernel_size=31, conformer_conv_dropout=0.0,
                                   position_embeddings_type="relative", **_AUDIO),
         (2, 3200), "as wav2vec2, conformer layer: relative positions, k31 depthwise conv module"),
    Case("hubert", hf_model("HubertModel", "HubertConfig", **_AUDIO),
         (2, 3200), "as wav2vec2 (HuBERT encoder)"),
    # --- monai, 3D -----------------------------------------------------------------------
    Case("monai_unet", monai_model("UNet", spatial_dims=3, in_channels=1, out_channels=2,
                              channels=(4, 8, 16), strides=(2, 2), num_res_units=1),
         (1, 1, 32, 32, 32), "channels (4, 8, 16), strides (2, 2), 1 residual unit, instance norm"),
    Case("monai_basic_unet", monai_model("BasicUNet", spatial_dims=3, in_channels=1, out_channels=2,
                                    features=(4, 4, 8, 8, 16, 4)),
         (1, 1, 32, 32, 32), "features (4, 4, 8, 8, 16, 4), affine instance norm, deconv"),
    Case("monai_segresnet", monai_model("SegResNet", spatial_dims=3, init_filters=8, in_channels=1,
                                   out_channels=2, blocks_down=(1, 2, 1), blocks_up=(1, 1)),
         (1, 1, 32, 32, 32), "init filters 8, blocks down (1, 2, 1), up (1, 1), group norm"),
    Case("monai_dynunet", monai_model("DynUNet", spatial_dims=3, in_channels=1, out_channels=2,
                                 kernel_size=[3, 3, 3], strides=[1, 2, 2],
                                 upsample_kernel_size=[2, 2], filters=[4, 8, 16], res_block=True),
         (1, 1, 32, 32, 32), "filters (4, 8, 16), strides (1, 2, 2), residual blocks"),
    Case("monai_mednext", monai_model("MedNeXt", spatial_dims=3, init_filters=4, in_channels=1,
                                 out_channels=2, kernel_size=7, blocks_down=(1, 1),
                                 blocks_bottleneck=1, blocks_up=(1, 1),
                                 use_residual_connection=True, global_resp_norm=True),
         (1, 1, 32, 32, 32), "init filters 4, k7 depthwise, blocks (1, 1 | 1 | 1, 1), GRN, residual"),
]

CORPUS: dict[str, Case] = {c.name: c for c in _CASES}
