"""Pretraining recipes and the context they run in."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewgen.backbones import create_backbone
from fewgen.data.augment import build_augmentation
from fewgen.data.base import FewShotData
from fewgen.pretrain.loop import TrainResult, TrainSettings, train_backbone
from fewgen.registry import Registry

RECIPES: Registry = Registry("pretraining recipe")


def pretrain_key(backbone, pretrain, data) -> dict:
    """The cache-key parts of the backbone the options ``backbone`` (:class:`~fewgen.backbones.registry.BackboneConfig`)
    and ``pretrain`` (``PretrainConfig``) train on ``data``: those options (IER options only for the
    IER recipes) and the content of the base and val images (``fewgen.keys``), so another class split
    or changed images is another backbone."""
    from fewgen.keys import key_parts, sections

    return key_parts("backbones", sections(backbone=backbone, pretrain=pretrain), base=data.base.digest(),
                     val=data.val.digest())


@dataclass
class PretrainContext:
    """What a recipe gets: the backbone and pretraining options, base training data, val classes and
    a place to write.

    ``train_images`` / ``train_labels`` already include the rotation classes when
    ``pretrain.rotation_classes`` is on.
    """

    backbone_options: Any  # fewgen.backbones.registry.BackboneConfig
    options: Any  # fewgen.pretrain.PretrainConfig
    data: FewShotData
    train_images: torch.Tensor
    train_labels: torch.Tensor
    num_classes: int
    out_dir: Path
    device: torch.device
    log: Callable[[str], None]
    progress: bool = True
    log_dir: Path | None = None  # TensorBoard events, one folder per stage (None: none)
    cache: Any = None  # the fewgen.cache.ArtifactCache the run's backbone is cached in (None: no cache)

    def new_backbone(self) -> nn.Module:
        b = self.backbone_options
        return create_backbone(b.name, in_chans=self.data.base.image_shape[0], **b.kwargs)

    def settings(self, **overrides) -> TrainSettings:
        return TrainSettings.of(self.options, **overrides)

    def augmentation(self) -> nn.Module:
        shape = self.data.base.image_shape
        return build_augmentation(self.options.augment, shape[-1], shape[0]).to(self.device)

    def train(self, model: nn.Module, backbone: nn.Module, loss_fn, stage: str,
              settings: TrainSettings | None = None, extra_modules: dict | None = None) -> TrainResult:
        return train_backbone(
            model, backbone, loss_fn, self.train_images, self.train_labels, self.data.val,
            settings or self.settings(), self.out_dir, stage=stage, augment=self.augmentation(),
            device=self.device, log=self.log, progress=self.progress, extra_modules=extra_modules,
            log_dir=self.log_dir,
        )
