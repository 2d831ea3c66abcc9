"""The fine-tuning loop shared by every learner: backbone + head on real and synthetic images.

A learner supplies two functions: ``batch_fn(step) -> Batch`` (uint8 images and labels
drawn from its sources: the real few-shot set, the synthetic set, base images) and
``loss_fn(model, batch) -> {term: loss}``. The loop augments every image tensor of the
batch, sums the terms and steps SGD (two learning rates: backbone and head) on a cosine
schedule. Every draw comes from generators seeded by the run seed and the method name, and
augmentation from a per-step seed, so the same config and seed give the same weights.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.data.fewshot import Episodes
from fewgen.learners.registry import LEARNER_METHODS, LearnerMethod
from fewgen.options import opt
from fewgen.training import TrainingMonitor, cosine_schedule, mixed_precision, run_steps
from fewgen.utils import make_generator, seed_hash

Batch = dict[str, torch.Tensor]
"""Keys ``x_<source>`` (uint8 images (B, C, H, W), augmented to float by the loop) and
``y_<source>`` (int labels (B,)) or ``q_<source>`` (soft labels (B, C)); sources are
``real``, ``syn`` and ``base``."""


class CosineHead(nn.Module):
    """``scale * <f / |f|, w_c / |w_c|>`` (Baseline++, Chen et al. 2019), learnable scale.

    Cosine logits let the head start from class prototypes (weight imprinting, Qi et al. 2018)
    so a few hundred steps suffice, for every method alike.
    """

    def __init__(self, dim: int, n_classes: int, scale: float = 10.0):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, D) -> logits (B, n_classes)."""
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).t()

    @torch.no_grad()
    def init_prototypes(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Set each class weight to the mean normalised feature of its images (classes without
        images keep their random weight)."""
        f = F.normalize(features.float(), dim=-1)
        onehot = F.one_hot(labels, self.weight.shape[0]).float()  # (n, C)
        counts = onehot.sum(0)
        means = onehot.t() @ f / counts.clamp_min(1)[:, None]
        have = counts > 0
        self.weight[have] = means[have].to(self.weight)


class BackboneClassifier(nn.Module):
    """A few-shot backbone (``forward_features``) with a :class:`CosineHead` over the novel classes."""

    def __init__(self, backbone: nn.Module, n_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = CosineHead(backbone.num_features, n_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images (B, C, H, W) in [0, 1] -> features (B, D)."""
        return self.backbone.forward_features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def param_groups(self, lr_backbone: float, lr_head: float) -> list[dict]:
        return [{"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": lr_backbone},
                {"params": list(self.head.parameters()), "lr": lr_head}]


@dataclass
class FinetuneOptions:
    """How a learner is fine-tuned (the ``learner.*`` keys of the same names, inherited by the
    learner section): steps, SGD learning rates of backbone and head, momentum, weight decay,
    augmentation and precision."""

    steps: int = opt(150, "optimizer steps per fine-tuning run", min=1)
    lr_backbone: float = opt(0.025, "SGD learning rate of the backbone (DiffAlign: 0.025)", min=0)
    lr_head: float = opt(0.05, "SGD learning rate of the head (DiffAlign: 0.05)", min=0)
    momentum: float = opt(0.9, "SGD momentum", min=0)
    weight_decay: float = opt(5e-4, "weight decay", min=0)
    augment: list[str] = opt(["crop", "flip", "color"], "kornia augmentations (colour jitter is skipped on 1-channel data)", choices="augmentation")
    precision: str = opt("float32", "fine-tuning precision: float32, bfloat16 (autocast; CPU or GPU) or float16 "
                         "(autocast with loss scaling; CUDA only)", choices=("float32", "bfloat16", "float16"))

    @classmethod
    def of(cls, options) -> dict:
        """These fields of ``options`` (the learner section), as keyword arguments."""
        return {f.name: (lambda v: list(v) if isinstance(v, list) else v)(getattr(options, f.name)) for f in fields(cls)}


@dataclass
class FinetuneSettings(FinetuneOptions):
    """One fine-tuning run: the options, its seed and how often its curve is recorded."""

    seed: int = 0
    log_every: int = 10


class IndexStream:
    """Endless draws from ``range(n)``: epoch after epoch of seeded permutations."""

    def __init__(self, n: int, *seed_parts):
        if n < 1:
            raise ValueError("IndexStream needs a non-empty pool")
        self.n, self.seed_parts, self.epoch = n, seed_parts, 0
        self._perm = torch.empty(0, dtype=torch.long)

    def next(self, k: int) -> torch.Tensor:
        out = []
        while k > 0:
            if len(self._perm) == 0:
                self._perm = torch.randperm(self.n, generator=make_generator("stream", *self.seed_parts, self.epoch))
                self.epoch += 1
            take, self._perm = self._perm[:k], self._perm[k:]
            out.append(take)
            k -= len(take)
        return torch.cat(out)


@torch.no_grad()
def model_features(model: nn.Module, images: torch.Tensor, batch_size: int = 512,
                   device: torch.device | str = "cpu") -> torch.Tensor:
    """Features (n, D) of uint8 images (n, C, H, W) under ``model.forward_features`` in eval mode."""
    was = model.training
    model.eval()
    out = [model.forward_features(c.to(device).float().div_(255.0)).float().cpu() for c in torch.split(images, batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0)


def finetune(model: nn.Module, batch_fn: Callable[[int], Batch],
             loss_fn: Callable[[nn.Module, Batch], dict[str, torch.Tensor]], settings: FinetuneSettings,
             image_shape: tuple[int, int, int], device: torch.device | str = "cpu",
             log: Callable[[str], None] | None = None, name: str = "finetune", progress: bool = False,
             log_dir: str | Path | None = None) -> list[dict]:
    """Fine-tune ``model`` in place and return its training curve.

    Args:
        model: has ``param_groups(lr_backbone, lr_head)``, ``forward_features`` and ``head``.
        batch_fn: step -> :data:`Batch` of uint8 images and labels.
        loss_fn: (model, batch with float augmented images) -> named loss terms (weighted).
        image_shape: (C, H, W) of the images, for the augmentation.
        progress: a progress bar with the ETA; log_dir: TensorBoard events of the loss terms and the
            head's learning rate per step (None: none).

    ``settings.precision`` bfloat16 / float16 runs the forward pass and the loss in autocast (the
    weights, the optimiser and the augmentation stay float32); float16 scales the loss
    (``torch.amp.GradScaler``) so small gradients do not underflow, and needs CUDA.

    Returns:
        one record per ``log_every`` steps: ``step``, ``lr``, ``loss`` and ``loss/<term>`` means.
    """
    from fewgen.data.augment import build_augmentation

    s = settings
    model.to(device).train()
    augment = build_augmentation(s.augment, image_shape[-1], image_shape[0]).to(device)
    opt = torch.optim.SGD(model.param_groups(s.lr_backbone, s.lr_head), momentum=s.momentum,
                          weight_decay=s.weight_decay, nesterov=True)
    sched = cosine_schedule(opt, s.steps)
    autocast, scaler = mixed_precision(torch.device(device), s.precision)
    history: list[dict] = []
    sums: dict[str, float] = {}
    count, t0 = 0, time.time()

    def step_loss(step: int) -> dict[str, torch.Tensor]:
        torch.manual_seed(seed_hash("finetune-augment", s.seed, name, step))
        batch = batch_fn(step)
        for key in list(batch):
            if key.startswith("x_"):
                x = batch[key].to(device).float().div_(255.0)
                batch[key] = augment(x) if len(x) else x
            else:
                batch[key] = batch[key].to(device)
        with autocast():
            return loss_fn(model, batch)

    def after_step(step: int, values: dict[str, float]) -> None:
        nonlocal sums, count
        count += 1
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if (step + 1) % s.log_every == 0 or step + 1 == s.steps:
            rec = {"step": step + 1, "lr_head": opt.param_groups[-1]["lr"], "seconds": round(time.time() - t0, 2)}
            rec.update({k: v / count for k, v in sums.items()})
            history.append(rec)
            sums, count = {}, 0

    with TrainingMonitor(f"[{name}]", s.steps, log=log, progress=progress, log_dir=log_dir) as monitor:
        run_steps(step_loss, opt, sched, s.steps, scaler=scaler, monitor=monitor, after_step=after_step, name=name,
                  hint="lower learner.lr_backbone / lr_head")
    model.eval()
    if log is not None and history:
        last = history[-1]
        log(f"[{name}] {s.steps} steps, final loss {last['loss']:.4f} ({last['seconds']:.1f}s)")
    return history


# ----------------------------------------------------------------------------- batches


def ce_batches(data: ArrayDataset, batch_size: int, *seed_parts) -> Callable[[int], Batch]:
    """Plain minibatches of one labelled set (real-only or synthetic-only training)."""
    stream = IndexStream(len(data), "ce", *seed_parts)

    def batch_fn(step: int) -> Batch:
        idx = stream.next(min(batch_size, len(data)))
        return {"x_real": data.images[idx], "y_real": data.labels[idx]}

    return batch_fn


def ce_loss(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
    return {"ce": F.cross_entropy(model(batch["x_real"]), batch["y_real"])}


# ----------------------------------------------------------------------------- evaluation


@torch.no_grad()
def finetuned_episode_accuracies(model: nn.Module, novel: ArrayDataset, episodes: list[Episodes],
                                 classifiers: list[str], classifier_kwargs: dict | None = None,
                                 device: torch.device | str = "cpu") -> dict[str, list[torch.Tensor]]:
    """Per-episode accuracies (E,) of a fine-tuned model, one list entry per episode set.

    ``head``: the model's own head over all novel classes, restricted to the episode's N
    classes (argmax among their logits; the support images are not used: the head was trained
    on the same few-shot set). ``logreg`` / ``proto``: a frozen-feature classifier fitted on the
    episode's support features of the fine-tuned backbone.
    """
    from fewgen.evaluation.protocol import episode_accuracies

    feats = model_features(model, novel.images, device=device)
    out: dict[str, list[torch.Tensor]] = {c: [] for c in classifiers}
    logits = model.head(feats.to(device)).float().cpu() if "head" in classifiers else None
    for ep in episodes:
        for clf in classifiers:
            if clf == "head":
                q = logits[ep.query]  # (E, N, Q, C_novel)
                cols = ep.classes[:, None, None, :].expand(-1, q.shape[1], q.shape[2], -1)
                pred = torch.gather(q, 3, cols).argmax(-1)  # (E, N, Q) in episode labels
                target = torch.arange(ep.n_way)[None, :, None]
                out[clf].append((pred == target).double().flatten(1).mean(1))
            else:
                kw = (classifier_kwargs or {}).get(clf)
                out[clf].append(episode_accuracies(feats, ep, clf, classifier_kwargs=kw))
    return out


@LEARNER_METHODS.register("real-only")
class RealOnly(LearnerMethod):
    """Cross-entropy on the real shots only."""

    def objective(self, spec, lc, src):
        return ce_batches(src.real, src.batch_size, *src.seed_parts), ce_loss


@LEARNER_METHODS.register("synthetic-only")
class SyntheticOnly(LearnerMethod):
    """Cross-entropy on the synthetic images only."""

    def uses_real(self, spec) -> bool:
        return False

    def uses_synthetic(self, spec) -> bool:
        return True

    def objective(self, spec, lc, src):
        return ce_batches(src.synthetic, src.batch_size, *src.seed_parts), ce_loss
