"""The backbone registry (timm's ``@register_model``, ``create_model``)."""

from __future__ import annotations

from torch import nn

from fewgen.registry import Registry

BACKBONES: Registry = Registry("backbone")


def create_backbone(name: str, in_chans: int = 3, **kwargs) -> nn.Module:
    """Build a registered backbone. Every backbone has ``forward_features(x) -> (B, D)``
    and ``num_features`` (D)."""
    return BACKBONES.get(name)(in_chans=in_chans, **kwargs)
