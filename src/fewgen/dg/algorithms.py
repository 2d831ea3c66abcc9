"""The domain-generalization methods of the ``domainfusion`` step, registered as DomainBed's
``ALGORITHMS``: ERM, ERM with offline img2img images, and DomainFusion's two parts alone and
together (``fewgen.dg.domainfusion``, whose options are defined beside each part). A method is
what it adds to ERM's training on the source domains: a loss term, images per epoch, or both."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fewgen.dg.domainfusion import OnlineAugmenter, latent_distillation_loss, offline_synthetic
from fewgen.dg.protocol import DGSplit, DGTrainSettings, predict, train_dg_classifier
from fewgen.registry import Registry
from fewgen.utils import make_generator, seed_hash

DG_ALGORITHMS: Registry = Registry("domainfusion method")


@dataclass(frozen=True)
class DGAlgorithm:
    """Which of DomainFusion's parts a method uses (ERM uses none)."""

    latent_distillation: bool = False
    online_augmentation: bool = False
    offline: bool = False

    @property
    def uses_generator(self) -> bool:
        return self.latent_distillation or self.online_augmentation or self.offline


for _name, _algorithm in {
    "erm": DGAlgorithm(),
    "erm+offline": DGAlgorithm(offline=True),
    "df-ld": DGAlgorithm(latent_distillation=True),
    "df-aug": DGAlgorithm(online_augmentation=True),
    "df": DGAlgorithm(latent_distillation=True, online_augmentation=True),
}.items():
    DG_ALGORITHMS.register(_name)(_algorithm)


def train_algorithm(name: str, split: DGSplit, model, settings: DGTrainSettings, d, generator, seed: int,
                    device: torch.device | str = "cpu", log: Callable[[str], None] = print, progress: bool = False,
                    log_dir: str | Path | None = None) -> dict:
    """Train method ``name`` on one split from ``model``; ``d`` holds the ``domainfusion.*`` options,
    ``generator`` is the frozen denoiser (``fewgen.generators.denoisers``; None for ERM). Returns the
    target's per-image correctness and the run's counts. ``progress`` and ``log_dir`` (TensorBoard)
    as :func:`~fewgen.dg.protocol.train_dg_classifier`'s."""
    algo = DG_ALGORITHMS.get(name)
    t0 = time.time()
    extra_loss = epoch_data = augmenter = None
    offline_count = 0
    if algo.latent_distillation:
        def extra_loss(model, x, y, logits, step):
            g = make_generator("dg-ld", seed, split.target, step)
            k = min(d.ld_batch, len(x))
            return {"ld": d.ld_weight * latent_distillation_loss(generator, x[:k], y[:k], logits[:k],
                                                                 (d.ld_t_min, d.ld_t_max), g)}
    if algo.online_augmentation:
        g = make_generator("dg-synthetic-set", seed, split.target)
        pick = torch.randperm(len(split.train), generator=g)[:d.aug_synthetic]
        augmenter = OnlineAugmenter(generator, split.train.images[pick], split.train.labels[pick], d.aug_every,
                                    d.aug_candidates, d.aug_strength, d.sample_steps, d.aug_feature_level,
                                    d.aug_content_weight, seed=seed_hash("dg-online", seed, split.target))

        def epoch_data(epoch, model):
            augmenter.maybe_refresh(epoch, model.backbone)
            return augmenter.images, augmenter.labels
    if algo.offline:
        offline_count = int(round(d.offline_factor * OnlineAugmenter.planned_images(
            d.epochs, d.aug_every, min(d.aug_synthetic, len(split.train)), d.aug_candidates)))
        off = offline_synthetic(generator, split.train.images, split.train.labels, offline_count, d.aug_strength,
                                d.sample_steps, seed=seed_hash("dg-offline", seed, split.target))

        def epoch_data(epoch, model):
            return off
    result = train_dg_classifier(split, model, settings, extra_loss=extra_loss, epoch_data=epoch_data,
                                 device=device, log=log, label=f"{name} {split.target} seed {seed}",
                                 progress=progress, log_dir=log_dir)
    correct = predict(result.model, split.test, device) == split.test.labels
    generated = augmenter.images_generated if augmenter is not None else offline_count
    return {"correct": correct, "best_epoch": result.best_epoch, "best_val": round(result.best_val, 3),
            "images_generated": int(generated), "wall_s": round(time.time() - t0, 1), "history": result.history}
