"""The backbone registry (timm's ``@register_model``, ``create_model``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from fewgen.options import opt
from fewgen.registry import Registry


@dataclass
class BackboneConfig:
    """Which backbone (the config section ``backbone``): a registered name and its constructor arguments, or
    a frozen pretrained model."""

    name: str = opt("conv4", "registered backbone: conv4, conv4-wide, resnet12, resnet12-small (trained by the "
                    "pretrain step), or clip, dinov2 (frozen pretrained models: backbone.model)", choices="backbone")
    kwargs: dict[str, Any] = opt({}, "extra constructor arguments")
    model: str | None = opt(None, "clip / dinov2: the pretrained model, a local folder or hub id (transformers; clip: "
                            "a CLIPModel or CLIPVisionModelWithProjection, with its preprocessor_config.json)")
    dtype: str = opt("float32", "clip / dinov2: the dtype the frozen model runs in",
                     choices=("float32", "float16", "bfloat16"))

BACKBONES: Registry = Registry("backbone")


def create_backbone(name: str, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered backbone. Every backbone has ``forward_features(x) -> (B, D)``
    and ``num_features`` (D)."""
    return BACKBONES.get(name)(in_chans=in_chans, **kwargs)
