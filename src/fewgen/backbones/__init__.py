"""Backbones: every one has ``forward_features(x) -> (B, D)`` and ``num_features``. Conv-4 and ResNet-12
are trained by the ``pretrain`` step; ``clip`` and ``dinov2`` are frozen pretrained models (pretrained.py)."""

from fewgen.backbones import conv4, pretrained, resnet12  # noqa: F401  (registration)
from fewgen.backbones.registry import BACKBONES, create_backbone

__all__ = ["BACKBONES", "create_backbone"]
