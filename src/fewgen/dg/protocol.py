"""The leave-one-domain-out protocol for domain generalization (PACS and any domain dataset).

For each target domain: train on the other domains, select the epoch on held-out images of
the **source** domains only (DomainBed's training-domain validation, Gulrajani & Lopez-Paz
2021: a fixed fraction of every source domain, drawn per seed), and report accuracy on every
image of the target domain. A method is a classifier trainer; what differs between ERM and
DomainFusion is an extra loss term and the extra (synthetic) images of each epoch.

Rows: one per (method, target domain) and one ``average`` row per method. ``accuracy`` is
the mean over seeds; ``ci95`` is the 95% t-interval of per-image correctness pooled over the
seeds (the project's convention of pooling evaluation units over seeds: test-set noise),
``ci95_seeds`` the t-interval of the per-seed accuracies (training noise; wide with few
seeds). The average row averages the target domains with equal weight; its ``ci95`` combines
the domains' intervals as independent (``sqrt(sum h_d^2) / n_domains``) and ``ci95_seeds`` is
the interval of the per-seed averages.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.options import opt
from fewgen.training import TrainingMonitor, cosine_factor, run_steps
from fewgen.utils import make_generator, seed_hash


@dataclass
class DGSplit:
    """One leave-one-domain-out split: train / val from the sources, test = the target domain."""

    target: str
    sources: list[str]
    train: ArrayDataset
    val: ArrayDataset
    test: ArrayDataset


def leave_one_domain_out(full: ArrayDataset, target: str, val_fraction: float = 0.2, seed: int = 0) -> DGSplit:
    """Hold out ``val_fraction`` of each source domain (per seed) for model selection.

    Args:
        full: a dataset with ``domains`` (e.g. PACS or a domain imagefolder).
        target: the unseen domain; all of its images are the test set.
        val_fraction: share of every source domain kept for validation.
        seed: draws the held-out images.
    """
    if full.domains is None or len(full.domain_names) < 2:
        raise FewgenError(f"dataset {full.name!r} has no domains (or only one); leave-one-domain-out needs a "
                          "domain dataset such as pacs, or imagefolder with <root>/<domain>/<class>/ folders")
    if target not in full.domain_names:
        raise FewgenError(f"unknown target domain {target!r}; {full.name!r} has {full.domain_names}")
    if not 0.0 < val_fraction < 1.0:
        raise FewgenError(f"val_fraction must be in (0, 1), got {val_fraction}")
    sources = [d for d in full.domain_names if d != target]
    train_idx, val_idx = [], []
    for d in sources:
        idx = (full.domains == full.domain_names.index(d)).nonzero().squeeze(1)
        perm = idx[torch.randperm(len(idx), generator=make_generator("dg-val", full.name, d, seed))]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        if n_val >= len(idx):
            raise FewgenError(f"source domain {d!r} has {len(idx)} images: too few to hold out {val_fraction:.0%}")
        val_idx.append(perm[:n_val])
        train_idx.append(perm[n_val:])
    test_idx = (full.domains == full.domain_names.index(target)).nonzero().squeeze(1)
    return DGSplit(
        target=target, sources=sources,
        train=full.subset(torch.cat(train_idx).sort().values, name=f"{full.name}/train-not-{target}"),
        val=full.subset(torch.cat(val_idx).sort().values, name=f"{full.name}/val-not-{target}"),
        test=full.subset(test_idx, name=f"{full.name}/{target}"),
    )


class DGClassifier(nn.Module):
    """A backbone (``forward_features``, ``forward_maps``) with a linear head."""

    def __init__(self, backbone: nn.Module, num_classes: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float images (B, C, H, W) in [0, 1] -> logits (B, num_classes)."""
        return self.head(self.backbone.forward_features(x))


@dataclass
class DGTrainOptions:
    """How a DG classifier is trained (the ``domainfusion.*`` keys of the same names, inherited by the
    domainfusion section)."""

    epochs: int = opt(8, "classifier training epochs", min=1)
    batch_size: int = opt(64, "images per step", min=1)
    lr: float = opt(1e-3, "peak learning rate (cosine schedule)", gt=0)
    optimizer: str = opt("adam", "adam or sgd", choices=("adam", "sgd"))
    weight_decay: float = opt(5e-4, "weight decay", min=0)
    augment: list[str] = opt(["crop", "flip"], "kornia augmentations of every training image", choices="augmentation")

    @classmethod
    def of(cls, options) -> dict:
        """These fields of ``options`` (the domainfusion section), as keyword arguments."""
        return {f.name: (lambda v: list(v) if isinstance(v, list) else v)(getattr(options, f.name)) for f in fields(cls)}


@dataclass
class DGTrainSettings(DGTrainOptions):
    """One training run: the options and its seed."""

    seed: int = 0


@dataclass
class DGTrainResult:
    model: DGClassifier  # the selected (best source-validation) weights
    best_epoch: int
    best_val: float
    history: list[dict]
    seconds: float


ExtraLoss = Callable[[DGClassifier, torch.Tensor, torch.Tensor, torch.Tensor, int], dict[str, torch.Tensor]]
"""(model, augmented images (B, C, H, W) in [0, 1], labels (B,), logits (B, K), step) -> named terms."""
EpochData = Callable[[int, DGClassifier], tuple[torch.Tensor, torch.Tensor] | None]
"""(epoch, model) -> extra uint8 images (n, C, H, W) and labels (n,) to train on this epoch, or None."""


@torch.no_grad()
def predict(model: nn.Module, data: ArrayDataset, device: torch.device | str = "cpu",
            batch_size: int = 512) -> torch.Tensor:
    """Predicted classes (n,) in eval mode."""
    was = model.training
    model.eval()
    out = [model(c.to(device).float().div_(255.0)).argmax(1).cpu() for c in torch.split(data.images, batch_size)]
    model.train(was)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.long)


def train_dg_classifier(split: DGSplit, model: DGClassifier, settings: DGTrainSettings, *,
                        extra_loss: ExtraLoss | None = None, epoch_data: EpochData | None = None,
                        device: torch.device | str = "cpu", log: Callable[[str], None] = print,
                        label: str = "", progress: bool = False, log_dir: str | Path | None = None) -> DGTrainResult:
    """Train ``model`` on ``split.train`` (plus ``epoch_data``), keeping the epoch with the best
    accuracy on ``split.val`` (source domains only). Permutations and augmentation are seeded by
    (seed, target, epoch), so every method sees the same real batches under the same seed.
    ``progress``: a bar over the epochs with the ETA; ``log_dir``: TensorBoard events of the loss
    terms per step and of ``val_acc`` per epoch."""
    from fewgen.data.augment import build_augmentation

    s = settings
    c, size = split.train.image_shape[0], split.train.image_shape[-1]
    augment = build_augmentation(s.augment, size, c).to(device)
    model.to(device)
    if s.optimizer == "adam":
        opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    elif s.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=s.lr, momentum=0.9, weight_decay=s.weight_decay, nesterov=True)
    else:
        raise FewgenError(f"unknown optimizer {s.optimizer!r}; use adam or sgd")
    best_val, best_epoch, best_state, history = -1.0, -1, None, []
    t_start = time.time()
    step = 0
    # epochs, not steps: the images of an epoch (epoch_data) and so its steps are known only then
    monitor = TrainingMonitor(f"[{label}] training", s.epochs, log=log, progress=progress, log_dir=log_dir,
                              unit="epoch", warmup=0, estimate_after=1)
    for epoch in range(s.epochs):
        t0 = time.time()
        images, labels = split.train.images, split.train.labels
        extra = epoch_data(epoch, model) if epoch_data is not None else None
        if extra is not None and len(extra[0]):
            images, labels = torch.cat([images, extra[0]]), torch.cat([labels, extra[1]])
        n = len(images)
        perm = torch.randperm(n, generator=make_generator("dg-perm", s.seed, split.target, epoch))
        torch.manual_seed(seed_hash("dg-augment", s.seed, split.target, epoch))
        model.train()
        sums: dict[str, float] = {}
        n_steps = max(1, n // s.batch_size)
        first = step

        # cosine over the fraction of training done, so methods that add images per epoch follow the
        # same schedule per epoch as ERM: the steps of an epoch are known only when it starts, so each
        # epoch has its own schedule, from the fraction done at its start
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i, epoch=epoch, n_steps=n_steps: cosine_factor((epoch + i / n_steps) / s.epochs))

        def step_loss(k: int, first=first, images=images, labels=labels, perm=perm) -> dict[str, torch.Tensor]:
            i = k - first
            idx = perm[i * s.batch_size:(i + 1) * s.batch_size]
            x = augment(images[idx].to(device).float().div_(255.0))
            y = labels[idx].to(device)
            logits = model(x)
            terms = {"ce": F.cross_entropy(logits, y)}
            if extra_loss is not None:
                terms.update(extra_loss(model, x, y, logits, k))
            return terms

        def after_step(k: int, values: dict[str, float], sums=sums) -> None:
            terms = {name[5:]: v for name, v in values.items() if name.startswith("loss/")}
            for name, v in terms.items():
                sums[name] = sums.get(name, 0.0) + v
            monitor.scalars({f"loss/{name}": v for name, v in terms.items()}, k + 1)

        run_steps(step_loss, opt, sched, first + n_steps, start=first, after_step=after_step,
                  name=f"[{label}] training", hint="lower domainfusion.lr")
        step = first + n_steps
        val_acc = float((predict(model, split.val, device) == split.val.labels).double().mean() * 100)
        monitor.scalars({"val_acc": val_acc, "train_images": n}, step)
        monitor.step(val=f"{val_acc:.1f}%")
        record = {"epoch": epoch + 1, "val_acc": round(val_acc, 3), "train_images": n,
                  "seconds": round(time.time() - t0, 2), **{f"loss/{k}": round(v / n_steps, 5) for k, v in sums.items()}}
        history.append(record)
        log(f"[{label}] epoch {epoch + 1}/{s.epochs} " + " ".join(f"{k}={v}" for k, v in record.items() if k != "epoch"))
        if val_acc > best_val:
            best_val, best_epoch = val_acc, epoch + 1
            best_state = copy.deepcopy(model.state_dict())
    monitor.close()
    model.load_state_dict(best_state)
    return DGTrainResult(model, best_epoch, best_val, history, time.time() - t_start)


# ----------------------------------------------------------------------------- rows


def _t_ci(values: np.ndarray) -> float:
    from fewgen.evaluation.protocol import mean_ci95

    return mean_ci95(values)[1]


def dg_rows(method: str, correct: dict[str, list[torch.Tensor]], seeds: list[int],
            per_target: dict[str, dict] | None = None, uses_synthetic: bool = False) -> list[dict]:
    """Rows for one method: one per target domain and one ``average`` row.

    Args:
        correct: target domain -> per-seed correctness (bool/float (n_test,)), in ``seeds`` order.
        per_target: extra fields per target (numbers are averaged into the ``average`` row).
        uses_synthetic: whether the method trains with generated images (every row says so).
    """
    rows = []
    seed_acc = {}
    for target, per_seed in correct.items():
        accs = np.array([float(c.double().mean() * 100) for c in per_seed])
        seed_acc[target] = accs
        pooled = torch.cat(per_seed).double().numpy() * 100
        row = {"method": method, "domain": target, "accuracy": round(float(accs.mean()), 3),
               "ci95": round(_t_ci(pooled), 3), "ci95_seeds": round(_t_ci(accs), 3),
               "seed_accuracies": [round(float(a), 3) for a in accs], "seeds": list(seeds),
               "test_images": int(len(per_seed[0])), "uses_synthetic": uses_synthetic}
        row.update((per_target or {}).get(target, {}))
        rows.append(row)
    if len(rows) > 1:
        per_seed_avg = np.mean(np.stack(list(seed_acc.values())), 0)
        avg = {"method": method, "domain": "average",
               "accuracy": round(float(np.mean([r["accuracy"] for r in rows])), 3),
               "ci95": round(math.sqrt(sum(r["ci95"] ** 2 for r in rows)) / len(rows), 3),
               "ci95_seeds": round(_t_ci(per_seed_avg), 3),
               "seed_accuracies": [round(float(a), 3) for a in per_seed_avg], "seeds": list(seeds),
               "test_images": int(sum(r["test_images"] for r in rows)), "uses_synthetic": uses_synthetic}
        for k, v in (per_target or {}).get(rows[0]["domain"], {}).items():
            if isinstance(v, int | float) and not isinstance(v, bool):
                avg[k] = round(float(np.mean([r[k] for r in rows])), 2)
        rows.append(avg)
    return rows
