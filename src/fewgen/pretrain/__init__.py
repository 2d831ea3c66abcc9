"""Base-class pretraining: recipes (``ce``; ``ier`` and ``ier-distill`` in ier.py) and
:func:`pretrain_backbone`, which caches the selected backbone by content key."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from fewgen.options import opt
from fewgen.pretrain import ce  # noqa: F401  (registration)
from fewgen.pretrain.ier import IERConfig  # and the IER recipes register themselves
from fewgen.pretrain.loop import TrainSettings
from fewgen.pretrain.registry import RECIPES, PretrainContext, pretrain_key


@dataclass
class PretrainConfig(TrainSettings):
    """Base-class pretraining: the recipe, its loss and data options, and the epoch loop's (``TrainSettings``)."""

    recipe: str = opt("ce", "base-class pretraining recipe", choices="recipe")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy", min=0, max=0.99)
    augment: list[str] = opt(["crop"], "kornia augmentations: crop, resized_crop, flip, affine, color", choices="augmentation")
    rotation_classes: bool = opt(True, "add the 90-degree rotations of base classes as new classes (Vinyals et al.)")
    ier: IERConfig = field(default_factory=IERConfig)


@dataclass
class PretrainedBackbone:
    backbone: nn.Module
    key: str  # content key of the checkpoint (feeds later cache keys)
    path: Path
    history: list[dict] = field(default_factory=list)
    best_epoch: int = -1
    best_val: float = float("nan")


def pretrain_backbone(backbone_options, options, data, cache, device: torch.device | str = "cpu",
                      log: Callable[[str], None] = print, progress: bool = True,
                      log_dir: str | Path | None = None) -> PretrainedBackbone:
    """Pretrain (or load from the cache, or resume) the backbone of the options ``backbone_options``
    (:class:`~fewgen.backbones.registry.BackboneConfig`) with the pretraining options ``options``
    (:class:`PretrainConfig`)
    on ``data``'s base classes.

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

    b, p = backbone_options, options
    if is_pretrained(b.name):
        return frozen_pretrained_backbone(b, data, cache, device, log)
    recipe = RECIPES.get(p.recipe)
    parts = pretrain_key(b, p, data)

    def new_backbone():
        return create_backbone(b.name, in_chans=data.base.image_shape[0], **b.kwargs)

    def build(entry: Path) -> None:
        seed_everything(p.seed)
        images, labels, n_classes = data.base.images, data.base.labels, data.base.num_classes
        if p.rotation_classes:
            images, labels = add_rotation_classes(images, labels, n_classes)
            n_classes *= 4
        log(f"pretraining {b.name} with recipe {p.recipe!r} on {len(images)} images, "
            f"{n_classes} classes ({data.name} base)")
        ctx = PretrainContext(b, p, data, images, labels, n_classes, entry, torch.device(device), log, progress,
                              None if log_dir is None else Path(log_dir), cache)
        result = recipe(ctx)
        backbone = new_backbone()  # after training: the recipe starts from the seed's random state
        load_model(result.best_path, backbone)
        meta = {"best_epoch": result.best_epoch, "best_val": result.best_val, "recipe": p.recipe}
        save_model(entry / "backbone.safetensors", backbone, meta)
        write_json(entry / "history.json", {"history": result.history, **meta})
        cache.mark_done(entry, meta)

    def load(entry: Path) -> PretrainedBackbone:
        backbone = new_backbone()
        final = entry / "backbone.safetensors"
        meta = load_model(final, backbone)
        info = read_json(entry / "history.json")
        return PretrainedBackbone(backbone.to(device), cache.key(parts), final, info["history"],
                                  meta.get("best_epoch", -1), meta.get("best_val", float("nan")))

    return cache.build_or_load("backbones", parts, build, load, log, what="pretrained backbone")


def frozen_pretrained_backbone(backbone_options, data, cache, device: torch.device | str = "cpu",
                               log: Callable[[str], None] = print) -> PretrainedBackbone:
    """A frozen pretrained backbone (``clip``, ``dinov2``) from ``backbone.model``: loaded, never
    trained. Its key (``fewgen.keys``, kind ``pretrained-backbones``) is derived from the backbone
    section and the model's content, so its features are cached like a trained backbone's; ``path``
    is the model folder."""
    from fewgen.backbones import create_backbone
    from fewgen.keys import key_parts, sections

    b = backbone_options
    backbone = create_backbone(b.name, in_chans=data.base.image_shape[0] if data is not None else 3, model=b.model,
                               dtype=b.dtype, **b.kwargs)
    key = cache.key(key_parts("pretrained-backbones", sections(backbone=b), model=backbone.digest))
    shape = "" if data is None else f"; images {'x'.join(map(str, data.base.image_shape))} preprocessed as its " \
                                    f"image processor: {backbone.preprocessing.describe()}"
    log(f"pretrained {b.name} backbone {backbone.source} (frozen, {backbone.num_features} features, content "
        f"{backbone.digest}); the pretrain options are not used{shape}")
    return PretrainedBackbone(backbone.to(device), key, backbone.folder)


__all__ = ["RECIPES", "PretrainContext", "PretrainedBackbone", "frozen_pretrained_backbone", "pretrain_backbone",
           "pretrain_key"]
