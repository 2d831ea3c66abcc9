"""Backbones: every one has ``forward_features(x) -> (B, D)`` and ``num_features``."""

from fewgen.backbones import conv4, resnet12  # noqa: F401  (registration)
from fewgen.backbones.registry import BACKBONES, create_backbone

__all__ = ["BACKBONES", "create_backbone"]
