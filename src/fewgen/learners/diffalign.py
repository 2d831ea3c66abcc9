"""DiffAlign's classifier training (Roy et al. 2024, "DiffAlign: Few-shot learning using
diffusion based synthesis and alignment").

The backbone and head are fine-tuned on the real few-shot set, the synthetic images of the
novel classes and the base images, with

    L = w_real * CE(f(x_real), y_real)
      + w_syn  * CE_eps(f(x_syn), y_syn)                 (label smoothing eps)
      + w_hall * KL(q(x_base) || softmax(f(x_base)))     (label hallucination)
      + w_mmd  * MMD^2(phi(x_real), phi(x_syn))           (multi-kernel Gaussian MMD)

* ``q(x_base)`` are soft labels over the novel classes that a logistic regression fitted on
  the support features assigns to base images (Jian & Torresani 2022), computed once per
  few-shot set with the pretrained features; they keep the many base images useful.
* ``phi`` are the L2-normalised backbone features; the synthetic batch is drawn
  class-matched to the real batch (same labels), so the MMD aligns the synthetic
  distribution of each class with the real one instead of mixing classes.

Defaults follow the paper: SGD with momentum 0.9, learning rate 0.025 for the backbone and
0.05 for the head, weight decay 5e-4, colour jitter, crop and flip (see ``LearnerConfig``).
Each weight can be set to zero, which is how the ablation rows are made.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.learners.finetune import Batch, IndexStream
from fewgen.learners.losses import hallucination_kl, label_smoothed_ce, mmd
from fewgen.learners.registry import LEARNER_METHODS, LearnerMethod, MethodSpec
from fewgen.options import opt
from fewgen.utils import make_generator

TERMS = ("real", "synthetic", "hallucination", "mmd")


@dataclass
class DiffAlignOptions:
    """DiffAlign's options (``learner.*`` keys)."""

    ablations: list[str] = opt(["synthetic", "hallucination", "mmd"],
                               "DiffAlign terms switched off one at a time (real, synthetic, hallucination, mmd)",
                               choices=TERMS)
    synthetic_batch_size: int = opt(64, "synthetic images per step (DiffAlign)", min=1)
    base_batch_size: int = opt(64, "base images per step for the hallucination term (DiffAlign)", min=1)
    w_real: float = opt(1.0, "DiffAlign weight: CE on the real shots", min=0)
    w_synthetic: float = opt(1.0, "DiffAlign weight: label-smoothed CE on synthetic images", min=0)
    w_hallucination: float = opt(1.0, "DiffAlign weight: KL to the hallucinated soft labels of base images", min=0)
    w_mmd: float = opt(1.0, "DiffAlign weight: multi-kernel MMD between real and synthetic features", min=0)
    label_smoothing: float = opt(0.1, "label smoothing of the synthetic CE", min=0, max=0.99)
    mmd_bandwidths: list[float] = opt([0.5, 1.0, 2.0], "Gaussian kernel bandwidths of the MMD (on L2-normalised "
                                      "features)", gt=0, nonempty=True)
    hallucination_temperature: float = opt(1.0, "softmax temperature of the hallucinated soft labels", gt=0)

    @classmethod
    def of(cls, options) -> DiffAlignOptions:
        """DiffAlign's own fields of ``options`` (the learner section, which holds them among others)."""
        return cls(**{f.name: getattr(options, f.name) for f in fields(cls)})

    def without(self, term: str) -> DiffAlignOptions:
        """A copy with one term's weight at zero (an ablation)."""
        if term not in TERMS:
            from fewgen.errors import FewgenError

            raise FewgenError(f"unknown DiffAlign term {term!r} in learner.ablations; use {', '.join(TERMS)}")
        return replace(self, **{f"w_{term}": 0.0})

    @property
    def uses_synthetic(self) -> bool:
        return self.w_synthetic > 0 or self.w_mmd > 0

    def key(self) -> dict:
        """What of these options a row's training depends on (its learners' cache key): the loss,
        not which other rows run (``ablations``) nor the batch sizes, which the key holds elsewhere."""
        return {"real": self.w_real, "synthetic": self.w_synthetic, "hallucination": self.w_hallucination,
                "mmd": self.w_mmd, "label_smoothing": self.label_smoothing, "bandwidths": tuple(self.mmd_bandwidths),
                "temperature": self.hallucination_temperature}


def diffalign_batches(real: ArrayDataset, synthetic: ArrayDataset | None, base_images: torch.Tensor | None,
                      base_soft: torch.Tensor | None, batch_size: int, synthetic_batch_size: int,
                      base_batch_size: int, *seed_parts) -> Callable[[int], Batch]:
    """``batch_fn(step) -> {x_real, y_real[, x_syn, y_syn][, x_base, q_base]}``.

    Synthetic images are drawn class-matched: each takes the label of a random image of the
    real batch and a random synthetic image of that class. Pass ``synthetic=None`` or
    ``base_images=None`` to leave a source out.
    """
    real_stream = IndexStream(len(real), "diffalign-real", *seed_parts)
    g = make_generator("diffalign-syn", *seed_parts)
    syn_by_class = synthetic.indices_by_class() if synthetic is not None else None
    base_stream = IndexStream(len(base_images), "diffalign-base", *seed_parts) if base_images is not None else None

    def batch_fn(step: int) -> Batch:
        r = real_stream.next(min(batch_size, len(real)))
        batch: Batch = {"x_real": real.images[r], "y_real": real.labels[r]}
        if syn_by_class is not None:
            labels = batch["y_real"][torch.randint(len(r), (synthetic_batch_size,), generator=g)]
            picks = [syn_by_class[int(c)] for c in labels]
            keep = [i for i, p in enumerate(picks) if len(p)]
            s = torch.stack([picks[i][torch.randint(len(picks[i]), (1,), generator=g)][0] for i in keep]) \
                if keep else torch.zeros(0, dtype=torch.long)
            batch["x_syn"], batch["y_syn"] = synthetic.images[s], synthetic.labels[s]
        if base_stream is not None:
            b = base_stream.next(base_batch_size)
            batch["x_base"], batch["q_base"] = base_images[b], base_soft[b]
        return batch

    return batch_fn


def diffalign_loss_fn(w: DiffAlignOptions) -> Callable[[nn.Module, Batch], dict[str, torch.Tensor]]:
    """``loss_fn(model, batch)``: the weighted terms above; zero-weight terms are left out."""

    def loss_fn(model: nn.Module, batch: Batch) -> dict[str, torch.Tensor]:
        parts = [batch["x_real"]]
        if "x_syn" in batch:
            parts.append(batch["x_syn"])
        if "x_base" in batch:
            parts.append(batch["x_base"])
        sizes = [len(p) for p in parts]
        feats = model.forward_features(torch.cat(parts))  # one pass: batch norm sees the whole batch
        logits = model.head(feats)
        f_split, l_split = torch.split(feats, sizes), torch.split(logits, sizes)
        terms: dict[str, torch.Tensor] = {}
        if w.w_real > 0:
            terms["real"] = w.w_real * F.cross_entropy(l_split[0], batch["y_real"])
        i = 1
        if "x_syn" in batch:
            if len(batch["y_syn"]):
                if w.w_synthetic > 0:
                    terms["synthetic"] = w.w_synthetic * label_smoothed_ce(l_split[i], batch["y_syn"], w.label_smoothing)
                if w.w_mmd > 0:
                    terms["mmd"] = w.w_mmd * mmd(F.normalize(f_split[0], dim=-1), F.normalize(f_split[i], dim=-1),
                                                 tuple(w.mmd_bandwidths))
            i += 1
        if "x_base" in batch and w.w_hallucination > 0:
            terms["hallucination"] = w.w_hallucination * hallucination_kl(l_split[i], batch["q_base"])
        if not terms:
            from fewgen.errors import FewgenError

            raise FewgenError("every DiffAlign loss weight is zero; set at least one of learner.w_real, w_synthetic, "
                              "w_hallucination, w_mmd above zero")
        return terms

    return loss_fn


@LEARNER_METHODS.register("diffalign")
class DiffAlign(LearnerMethod):
    """The full loss above, then each term of ``learner.ablations`` switched off in turn."""

    def specs(self, lc) -> list[MethodSpec]:
        w = DiffAlignOptions.of(lc)
        return [MethodSpec("diffalign", "diffalign", w),
                *[MethodSpec(f"diffalign-no-{term}", "diffalign", w.without(term)) for term in lc.ablations]]

    def uses_real(self, spec) -> bool:
        return spec.weights.w_real > 0

    def uses_synthetic(self, spec) -> bool:
        return spec.weights.uses_synthetic

    def hallucinates(self, spec) -> bool:
        return spec.weights.w_hallucination > 0

    def objective(self, spec, lc, src):
        w = spec.weights
        base_images, base_soft = (src.base_images, src.base_soft()) if w.w_hallucination > 0 else (None, None)
        return (diffalign_batches(src.real, src.synthetic, base_images, base_soft, src.batch_size,
                                  lc.synthetic_batch_size, lc.base_batch_size, *src.seed_parts),
                diffalign_loss_fn(w))
