"""Base-class pretraining: recipes (``ce``; ``ier`` and ``ier-distill`` in ier.py) and
:func:`pretrain_backbone`, which caches the selected backbone by content key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fewgen.pretrain import ce  # noqa: F401  (registration)
from fewgen.pretrain.registry import RECIPES, PretrainContext, pretrain_key

try:  # the IER recipes register themselves when present
    from fewgen.pretrain import ier  # noqa: F401
except ImportError:  # pragma: no cover
    pass


@dataclass
class PretrainedBackbone:
    backbone: nn.Module
    key: str  # content key of the checkpoint (feeds later cache keys)
    path: Path
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val: float = float("nan")


def pretrain_backbone(cfg, data, cache, device: torch.device | str = "cpu",
                      log: Callable[[str], None] = print, progress: bool = True,
                      log_dir: str | Path | None = None) -> PretrainedBackbone:
    """Pretrain (or load from the cache, or resume) the backbone ``cfg`` describes.

    Returns the val-selected backbone. The cache entry is complete once it is marked done;
    an interrupted run resumes from the last epoch checkpoint in it. ``progress``: a bar per
    stage with its ETA; ``log_dir``: TensorBoard events of each stage's losses in
    ``log_dir/<stage>`` (a backbone from the cache writes none).
    """
    from fewgen.backbones import create_backbone
    from fewgen.backbones.pretrained import is_pretrained
    from fewgen.checkpoint import load_model, save_model
    from fewgen.data.augment import add_rotation_classes
    from fewgen.utils import read_json, seed_everything, write_json

    if is_pretrained(cfg.backbone.name):
        return frozen_pretrained_backbone(cfg, data, cache, device, log)
    recipe = RECIPES.get(cfg.pretrain.recipe)
    parts = pretrain_key(cfg, data)
    entry = cache.entry("backbones", parts)
    key = cache.key(parts)
    final = entry / "backbone.safetensors"
    backbone = create_backbone(cfg.backbone.name, in_chans=data.base.image_shape[0], **cfg.backbone.kwargs)
    if cache.ready(entry, log):
        meta = load_model(final, backbone)
        log(f"pretrained backbone from cache {entry}")
        info = read_json(entry / "history.json")
        return PretrainedBackbone(backbone.to(device), key, final, info["history"], meta.get("best_epoch", -1),
                                  meta.get("best_val", float("nan")))
    seed_everything(cfg.pretrain.seed)
    images, labels, n_classes = data.base.images, data.base.labels, data.base.num_classes
    if cfg.pretrain.rotation_classes:
        images, labels = add_rotation_classes(images, labels, n_classes)
        n_classes *= 4
    log(f"pretraining {cfg.backbone.name} with recipe {cfg.pretrain.recipe!r} on {len(images)} images, "
        f"{n_classes} classes ({data.name} base)")
    ctx = PretrainContext(cfg, data, images, labels, n_classes, entry, torch.device(device), log, progress,
                          None if log_dir is None else Path(log_dir))
    result = recipe(ctx)
    load_model(result.best_path, backbone)
    meta = {"best_epoch": result.best_epoch, "best_val": result.best_val, "recipe": cfg.pretrain.recipe}
    save_model(final, backbone, meta)
    write_json(entry / "history.json", {"history": result.history, **meta})
    cache.mark_done(entry, meta)
    return PretrainedBackbone(backbone.to(device), key, final, result.history, result.best_epoch, result.best_val)


def frozen_pretrained_backbone(cfg, data, cache, device: torch.device | str = "cpu",
                               log: Callable[[str], None] = print) -> PretrainedBackbone:
    """A frozen pretrained backbone (``clip``, ``dinov2``) from ``backbone.model``: loaded, never
    trained. Its key (``fewgen.keys``, kind ``pretrained-backbones``) is derived from the backbone
    section and the model's content, so its features are cached like a trained backbone's; ``path``
    is the model folder."""
    from fewgen.backbones import create_backbone
    from fewgen.keys import key_parts

    b = cfg.backbone
    backbone = create_backbone(b.name, in_chans=data.base.image_shape[0] if data is not None else 3, model=b.model,
                               dtype=b.dtype, **b.kwargs)
    key = cache.key(key_parts("pretrained-backbones", cfg, model=backbone.digest))
    shape = "" if data is None else f"; images {'x'.join(map(str, data.base.image_shape))} preprocessed as its " \
                                    f"image processor: {backbone.preprocessing.describe()}"
    log(f"pretrained {b.name} backbone {backbone.source} (frozen, {backbone.num_features} features, content "
        f"{backbone.digest}); the pretrain options are not used{shape}")
    return PretrainedBackbone(backbone.to(device), key, backbone.folder)


__all__ = ["RECIPES", "PretrainContext", "PretrainedBackbone", "frozen_pretrained_backbone", "pretrain_backbone",
           "pretrain_key"]
