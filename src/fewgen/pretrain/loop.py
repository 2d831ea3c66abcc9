"""The base-class training loop every pretraining recipe shares.

Per epoch: a permutation and augmentation seeded by (seed, stage, epoch) alone, so a run
resumed from its last epoch checkpoint continues exactly as an uninterrupted one; the
recipe's loss (a dict of named terms, each logged); validation few-shot accuracy on the
val classes (never novel) for model selection; a safetensors checkpoint of weights,
optimizer and scheduler.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from fewgen.checkpoint import load_training_state, save_model, save_training_state
from fewgen.data.base import ArrayDataset
from fewgen.data.fewshot import sample_episodes
from fewgen.evaluation.features import extract_features
from fewgen.evaluation.protocol import episode_accuracies
from fewgen.options import opt
from fewgen.training import TrainingMonitor, cosine_schedule, run_steps
from fewgen.utils import make_generator, seed_hash


@dataclass
class TrainSettings:
    """The epoch loop's options (:func:`train_backbone`); the ``pretrain`` config section inherits
    them, so they are the keys ``pretrain.epochs``, ``pretrain.lr``, ... themselves."""

    epochs: int = opt(10, "training epochs over the base classes", min=1)
    batch_size: int = opt(128, "images per step", min=1)
    optimizer: str = opt("sgd", "sgd or adam", choices=("sgd", "adam"))
    lr: float = opt(0.05, "peak learning rate (cosine schedule)", gt=0)
    momentum: float = opt(0.9, "SGD momentum", min=0)
    weight_decay: float = opt(5e-4, "weight decay", min=0)
    val_every: int = opt(1, "epochs between validation few-shot evaluations (model selection)", min=1)
    val_episodes: int = opt(300, "validation episodes (on val classes only)", min=1)
    val_n_way: int = opt(5, "validation episode ways (capped at the number of val classes; with a single val "
                         "class there is no validation and the last epoch is kept)", min=2)
    val_n_shot: int = opt(1, "validation episode shots", min=1)
    seed: int = opt(0, "seed of the pretraining run")
    max_steps_per_epoch: int | None = opt(None, "cap steps per epoch (quick tests)", min=1)

    @classmethod
    def of(cls, options, **overrides) -> TrainSettings:
        """The loop's own fields of ``options`` (the pretrain section), with ``overrides``."""
        return cls(**{**{f.name: getattr(options, f.name) for f in fields(cls)}, **overrides})


@dataclass
class TrainResult:
    best_path: Path
    best_epoch: int
    best_val: float | None  # None: no validation (fewer than two val classes), the last epoch kept
    history: list[dict] = field(default_factory=list)


LossFn = Callable[[torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]


def validation_accuracy(backbone: nn.Module, val: ArrayDataset, s: TrainSettings, device) -> float:
    """Mean 1-shot (by default) prototype accuracy on val-class episodes, in percent."""
    n_way = min(s.val_n_way, val.num_classes)
    n_query = max(1, min(15, int(val.counts().min()) - s.val_n_shot))
    episodes = sample_episodes(val, n_way, s.val_n_shot, n_query, s.val_episodes, seed=seed_hash("val", s.seed))
    feats = extract_features(backbone, val, device=device)
    return float(episode_accuracies(feats, episodes, "proto").mean() * 100)


def build_optimizer(params, s: TrainSettings, steps_total: int):
    if s.optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=s.lr, momentum=s.momentum, weight_decay=s.weight_decay, nesterov=True)
    elif s.optimizer == "adam":
        opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    else:
        from fewgen.errors import FewgenError

        raise FewgenError(f"unknown optimizer {s.optimizer!r}; use sgd or adam")
    sched = cosine_schedule(opt, steps_total)
    return opt, sched


def train_backbone(
    model: nn.Module,
    backbone: nn.Module,
    loss_fn: LossFn,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    val: ArrayDataset,
    settings: TrainSettings,
    out_dir: Path,
    stage: str = "main",
    augment: nn.Module | None = None,
    device: torch.device | str = "cpu",
    log: Callable[[str], None] = print,
    progress: bool = True,
    extra_modules: dict[str, nn.Module] | None = None,
    log_dir: Path | None = None,
) -> TrainResult:
    """Train ``model`` (which contains ``backbone``) with ``loss_fn`` and keep the best backbone.

    Args:
        model: every trainable module (backbone and heads).
        backbone: the part whose features are validated and saved as ``best.safetensors``.
        loss_fn: (augmented images (B, C, H, W) float, labels (B,), global step) -> named loss
            terms; their sum is minimised and each is logged per epoch.
        train_images: uint8 (n, C, H, W); train_labels: (n,).
        out_dir: where ``<stage>-state.safetensors`` (resume) and ``<stage>-best.safetensors`` go.
        extra_modules: non-trained state to checkpoint and restore too (e.g. a memory bank).
        progress: a progress bar over the stage's steps, with its ETA.
        log_dir: TensorBoard events of the loss terms per step and of lr and val_acc per epoch go
            to ``log_dir/<stage>`` (None: none).
    """
    s = settings
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / f"{stage}-state.safetensors"
    best_path = out_dir / f"{stage}-best.safetensors"
    n = len(train_images)
    steps_per_epoch = max(1, n // s.batch_size)
    if s.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, s.max_steps_per_epoch)
    model.to(device)
    opt, sched = build_optimizer([p for p in model.parameters() if p.requires_grad], s, steps_per_epoch * s.epochs)
    modules = {"model": model, **(extra_modules or {})}
    start_epoch, best_val, best_epoch, history = 0, -1.0, -1, []
    # a validation episode needs two classes: with fewer, the last epoch is kept (e.g. PACS's one val class)
    validate = val.num_classes >= 2
    if not validate:
        log(f"[{stage}] validation skipped: {val.num_classes} validation class(es), an episode needs 2; the last "
            "epoch is kept (give data.val_classes two or more classes to select the epoch on validation)")
    if state_path.exists():
        extra = load_training_state(state_path, modules, opt, sched)
        start_epoch = extra["epoch"] + 1
        best_val, best_epoch, history = extra["best_val"], extra["best_epoch"], extra["history"]
        best_txt = f"best val {best_val:.2f}%" if validate and best_val is not None else "no validation"
        log(f"[{stage}] resuming after epoch {extra['epoch'] + 1}/{s.epochs} ({best_txt})")
    monitor = TrainingMonitor(f"pretrain {stage}", steps_per_epoch * s.epochs, start=start_epoch * steps_per_epoch,
                              log=log, progress=progress, log_dir=None if log_dir is None else Path(log_dir) / stage)
    with monitor:
        for epoch in range(start_epoch, s.epochs):
            t0 = time.time()
            model.train()
            torch.manual_seed(seed_hash("train", s.seed, stage, epoch))  # augmentation RNG
            perm = torch.randperm(n, generator=make_generator("perm", s.seed, stage, epoch))
            sums: dict[str, float] = {}
            first = epoch * steps_per_epoch

            def step_loss(step: int, perm=perm, first=first) -> dict[str, torch.Tensor]:
                i = step - first
                idx = perm[i * s.batch_size : (i + 1) * s.batch_size]
                x = train_images[idx].to(device).float().div_(255.0)
                if augment is not None:
                    x = augment(x)
                return loss_fn(x, train_labels[idx].to(device), step)

            def after_step(step: int, values: dict[str, float], epoch=epoch, sums=sums) -> None:
                terms = {k: v for k, v in values.items() if k.startswith("loss/")}
                for k, v in terms.items():
                    sums[k[5:]] = sums.get(k[5:], 0.0) + v
                monitor.step(terms, epoch=f"{epoch + 1}/{s.epochs}")

            run_steps(step_loss, opt, sched, first + steps_per_epoch, start=first, after_step=after_step,
                      name=f"pretrain {stage}", hint="lower pretrain.lr")
            record = {"epoch": epoch + 1, "lr": opt.param_groups[0]["lr"], "seconds": round(time.time() - t0, 2)}
            record.update({f"loss/{k}": v / steps_per_epoch for k, v in sums.items()})
            if not validate:
                if epoch + 1 == s.epochs:
                    best_val, best_epoch = None, epoch + 1
                    save_model(best_path, backbone, {"epoch": epoch + 1, "val_acc": None})
            elif (epoch + 1) % s.val_every == 0 or epoch + 1 == s.epochs:
                record["val_acc"] = validation_accuracy(backbone, val, s, device)
                if record["val_acc"] > best_val:
                    best_val, best_epoch = record["val_acc"], epoch + 1
                    save_model(best_path, backbone, {"epoch": epoch + 1, "val_acc": best_val})
            history.append(record)
            monitor.scalars({k: record[k] for k in ("lr", "val_acc") if k in record}, monitor.done)
            parts = " ".join(f"{k[5:]}={v:.4f}" for k, v in record.items() if k.startswith("loss/"))
            val_txt = f" val={record['val_acc']:.2f}%" if "val_acc" in record else ""
            log(f"[{stage}] epoch {epoch + 1}/{s.epochs} {parts}{val_txt} ({record['seconds']}s)")
            save_training_state(state_path, modules, opt, sched,
                                {"epoch": epoch, "best_val": best_val, "best_epoch": best_epoch, "history": history})
    return TrainResult(best_path=best_path, best_epoch=best_epoch, best_val=best_val, history=history)
