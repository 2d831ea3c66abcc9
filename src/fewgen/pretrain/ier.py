"""IER: invariant and equivariant representations with multi-head self-distillation.

Rizve, Khan, Kumar, Shah. "Exploring Complementary Strengths of Invariant and Equivariant
Representations for Few-Shot Learning", CVPR 2021 (official code:
github.com/nayeemrizve/invariance-equivariance).

One backbone f_Theta and three heads on its feature ``h = f_Theta(t(x))`` for each
transformation ``t`` of a set of M (default the 4 rotations):

* class head f_Phi:  L_ce  = CE(f_Phi(h), y)                 (the class is invariant to t)
* transformation head f_Psi:  L_eq = CE(f_Psi(h), index of t)   (equivariance)
* contrastive head f_Omega, v = f_Omega(h):  with s(a, b) the cosine similarity,
  ``l(a, b) = -log( e^{s(a,b)/tau} / (e^{s(a,b)/tau} + sum_{m in bank} e^{s(b,m)/tau}) )``
  and ``L_in = [ l(bank_i, v_0) + sum_{t != id} l(v_0, v_t) ] / V``: the
  untransformed view v_0 is pulled towards every transformed view and towards its own
  memory-bank copy; negatives are ``bank_negatives`` momentum-averaged features of other
  images (bank update ``bank_i <- m bank_i + (1 - m) v_0``, m = 0.99).

``L = w_ce L_ce + w_eq L_eq + w_in L_in`` (the paper's training objective). Self-distillation (as in
Tian et al. 2020): generation g >= 1 trains a fresh student of the same architecture from
the frozen generation g-1 (backbone and all heads) with, added to L,
``w_kd [ KL_T(f_Phi^s || f_Phi^t) + KL_T(f_Psi^s || f_Psi^t) + MSE(v^s, v^t) ]``, T = 4
(MSE: the squared L2 distance averaged over elements, as the official ``mse_loss``).

Choices made here, each a config field in ``pretrain.ier``:

* ``num_views`` bounds memory: the official code multiplies every batch by 16 (4 crops x
  4 rotations). Here each step uses the identity plus ``num_views - 1`` transformations
  drawn from the set (default: all of them).
* Rotation classes (Vinyals et al.) vs rotation as the equivariant transformation: with
  ``pretrain.rotation_classes`` on, a rotated view of class c *is* an image of another
  (rotation) class. ``rotation_classes: relabel`` (default) trains over the unrotated base
  images and labels the view rotated by r' of an image of class c with rotation class
  (c, r'), so an epoch sees every (image, rotation) pair once, as CE over the rotation
  classes does, at the same forward passes; f_Psi predicts r'. (The labelling is written
  for inputs of any rotation class (c, r): class (c, r + r' mod 4), f_Psi the absolute
  orientation r + r' mod 4.) ``drop`` trains the class head on the unrotated classes only,
  rotation-invariant as in the paper's natural-image setting; on Omniglot it loses the
  rotation classes' 4x label information, so relabel is the default (docs/methods/ier.md).
* The contrastive loss uses a log-sum-exp instead of the official ``+ 1e-6`` in the
  denominator; memory-bank rows are not renormalised after the update (as official).
* Batch indices (for the memory bank) are recomputed from the training loop's seeded
  permutation; every step checks them against the labels it got, so a change of the loop's
  order raises an error instead of silently corrupting the bank.
* The distillation teacher of generation g is the final (last-epoch) model of generation
  g-1, saved whole as ``<stage>-model.safetensors``; the backbone returned is the val-selected
  one of the last generation. ``ier-distill`` reuses a finished ``ier`` run with the same
  config from the cache as its generation 0.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.errors import FewgenError
from fewgen.options import opt
from fewgen.pretrain.loop import TrainResult, TrainSettings
from fewgen.pretrain.registry import RECIPES, PretrainContext, pretrain_key
from fewgen.utils import make_generator, seed_hash


@dataclass
class IERConfig:
    """IER pretraining (recipes ``ier`` and ``ier-distill``; Rizve et al. 2021). Any loss is off at weight 0."""

    ce_weight: float = opt(1.0, "weight of the cross-entropy on base classes (head f_Phi)")
    equivariant_weight: float = opt(1.0, "weight of the transformation-prediction loss (head f_Psi)")
    invariant_weight: float = opt(1.0, "weight of the memory-bank contrastive loss (head f_Omega)")
    distill_weight: float = opt(1.0, "weight of the teacher terms (KL on class/transformation heads, L2 on f_Omega) in generations >= 1")
    distill_feature_weight: float = opt(0.0, "extra L2 between student and teacher backbone features (the official code uses it; not in the paper's equations)")
    transforms: list[str] = opt(["rotate"], "transformation families whose product is the equivariance set: rotate (4), flip (2), crop (4), affine (4)", choices=("rotate", "flip", "crop", "affine"), nonempty=True)
    num_views: int | None = opt(None, "views per image per step, the identity included (default: every transformation); bounds memory", min=1)
    temperature: float = opt(1.0, "temperature of the contrastive loss (official code: 1.0)", gt=0)
    bank_negatives: int = opt(6400, "negatives drawn from the memory bank per step (official: 6400)", min=1)
    feature_dim: int = opt(64, "output size of the contrastive head f_Omega", min=1)
    bank_momentum: float = opt(0.99, "momentum of the memory-bank update", min=0, max=1)
    head_hidden: int | None = opt(None, "hidden width of the f_Psi / f_Omega MLPs (default: backbone feature size)", min=1)
    rotation_classes: str = opt("relabel", "with pretrain.rotation_classes and rotate in transforms: relabel (each rotated view of an unrotated base image is labelled with its rotation class, as CE sees them) or drop (train on the unrotated base classes only; rotations are just the transformations)", choices=("relabel", "drop"))
    generations: int = opt(1, "distillation generations after the first model (ier-distill)", min=0)
    distill_temperature: float = opt(4.0, "temperature of the distillation KL terms", gt=0)

# ----------------------------------------------------------------------------- losses (pure)


def invariant_contrastive_loss(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
                               temperature: float = 1.0) -> torch.Tensor:
    """Memory-bank contrastive loss of IER (official ``simple_contrstive_loss``).

    ``mean_i -log( e^{s(a_i,p_i)/tau} / (e^{s(a_i,p_i)/tau} + sum_j e^{s(p_i,n_j)/tau}) )``,
    s the cosine similarity. Note the negatives are compared with the *positive*.

    Args:
        anchor: (B, D); positive: (B, D); negatives: (K, D) (shared by the batch).
    Returns: scalar.
    """
    a = F.normalize(anchor, dim=1)
    p = F.normalize(positive, dim=1)
    n = F.normalize(negatives, dim=1)
    pos = (a * p).sum(1, keepdim=True) / temperature  # (B, 1)
    neg = p @ n.t() / temperature  # (B, K)
    logits = torch.cat([pos, neg], 1)
    return (torch.logsumexp(logits, 1) - pos[:, 0]).mean()


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 4.0) -> torch.Tensor:
    """Hinton KD: ``T^2 * KL(softmax(t/T) || softmax(s/T))`` summed over classes, mean over the batch.

    Args: student_logits, teacher_logits: (B, C). Returns: scalar.
    """
    log_p_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_p_s, p_t, reduction="sum") * temperature**2 / student_logits.shape[0]


def ier_losses(logits: torch.Tensor, labels: torch.Tensor, eq_logits: torch.Tensor, eq_labels: torch.Tensor,
               inv: torch.Tensor, bank_copy: torch.Tensor | None, negatives: torch.Tensor | None,
               n_views: int, temperature: float) -> dict[str, torch.Tensor]:
    """The three unweighted IER terms for V views of a batch of B images.

    Args:
        logits: class logits (V*B, C), view-major (rows v*B..v*B+B-1 are view v, view 0 the identity).
        labels: (V*B,) class labels; eq_logits: (V*B, M); eq_labels: (V*B,) transformation index.
        inv: contrastive-head outputs (V*B, D).
        bank_copy: memory-bank rows of the batch's images (B, D), or None to skip the invariant term.
        negatives: (K, D) memory-bank negatives.
    Returns: {"ce", "equivariant", "invariant"} (the last only with a bank).
    """
    out = {"ce": F.cross_entropy(logits, labels), "equivariant": F.cross_entropy(eq_logits, eq_labels)}
    if bank_copy is not None:
        views = inv.view(n_views, -1, inv.shape[1])
        loss = invariant_contrastive_loss(bank_copy, views[0], negatives, temperature)
        for v in range(1, n_views):
            loss = loss + invariant_contrastive_loss(views[0], views[v], negatives, temperature)
        out["invariant"] = loss / n_views
    return out


# ----------------------------------------------------------------------------- memory bank


class MemoryBank(nn.Module):
    """One momentum-averaged feature per training image, kept as a buffer (checkpointed).

    Args:
        size: number of training images; dim: feature size; momentum: m of the update.
    """

    def __init__(self, size: int, dim: int, momentum: float = 0.99, seed: int = 0):
        super().__init__()
        init = torch.randn(size, dim, generator=make_generator("ier-bank", seed))
        self.register_buffer("features", F.normalize(init, dim=1, eps=1e-6))
        self.momentum = momentum

    @torch.no_grad()
    def update(self, indices: torch.Tensor, feats: torch.Tensor) -> None:
        """``bank[i] <- m * bank[i] + (1 - m) * feat`` for the batch's images (indices (B,), feats (B, D))."""
        rows = self.features[indices]
        self.features[indices] = self.momentum * rows + (1 - self.momentum) * feats.detach().to(rows)

    def negatives(self, exclude: torch.Tensor, k: int) -> torch.Tensor:
        """Up to ``k`` random rows (K, D) of images not in ``exclude`` (global torch RNG)."""
        n = self.features.shape[0]
        keep = torch.ones(n, dtype=torch.bool)
        keep[exclude.cpu()] = False
        candidates = torch.nonzero(keep).squeeze(1)
        choice = candidates[torch.randperm(len(candidates))[:k]]
        return self.features[choice.to(self.features.device)]


# ----------------------------------------------------------------------------- transformations

FAMILY_SIZES = {"rotate": 4, "flip": 2, "crop": 4, "affine": 4}
# fixed affine maps (output -> input coordinates, as F.affine_grid takes them)
_AFFINES = [
    [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]],
    [[1.0, 0.3, 0.0], [0.0, 1.0, 0.0]],  # horizontal shear
    [[1.0, 0.0, 0.0], [0.3, 1.0, 0.0]],  # vertical shear
    [[1.3, 0.0, 0.0], [0.0, 1.3, 0.0]],  # zoom out
]


class TransformSet:
    """The product of transformation families; transformation index 0 is the identity.

    Families: ``rotate`` (0/90/180/270 degrees), ``flip`` (none/horizontal), ``crop`` (the
    official four: whole image; a 2/3-height strip at a random row; a 2/3-width strip at a
    random column; a 2/3 x 2/3 patch at a random place; each resized back), ``affine``
    (identity, horizontal shear, vertical shear, zoom out). Applied in the order crop,
    affine, flip, rotate.
    """

    def __init__(self, families: list[str]):
        if not families:
            raise FewgenError("pretrain.ier.transforms is empty; give at least one of rotate, flip, crop, affine")
        for f in families:
            if f not in FAMILY_SIZES:
                raise FewgenError(f"unknown IER transformation {f!r} in pretrain.ier.transforms; "
                                  f"available: {', '.join(FAMILY_SIZES)}")
        if len(set(families)) != len(families):
            raise FewgenError(f"pretrain.ier.transforms lists a family twice: {families}")
        self.families = list(families)
        self.combos = list(itertools.product(*[range(FAMILY_SIZES[f]) for f in self.families]))

    def __len__(self) -> int:
        return len(self.combos)

    def component(self, t: int, family: str) -> int:
        return self.combos[t][self.families.index(family)] if family in self.families else 0

    def index(self, parts: dict[str, int]) -> int:
        """Transformation index of ``{family: component}`` (mixed radix, first family most significant)."""
        idx = 0
        for f in self.families:
            idx = idx * FAMILY_SIZES[f] + parts.get(f, 0)
        return idx

    def apply(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """Transformation ``t`` of a batch x (B, C, H, W); crops draw offsets from the global RNG."""
        crop, affine = self.component(t, "crop"), self.component(t, "affine")
        flip, rot = self.component(t, "flip"), self.component(t, "rotate")
        if crop or affine:
            b = x.shape[0]
            theta = torch.zeros(b, 2, 3)
            theta[:, 0, 0] = theta[:, 1, 1] = 1.0
            if crop:
                sh, sw = {1: (2 / 3, 1.0), 2: (1.0, 2 / 3), 3: (2 / 3, 2 / 3)}[crop]
                theta[:, 0, 0], theta[:, 1, 1] = sw, sh
                theta[:, 0, 2] = (torch.rand(b) * 2 - 1) * (1 - sw)
                theta[:, 1, 2] = (torch.rand(b) * 2 - 1) * (1 - sh)
            if affine:
                a = torch.tensor(_AFFINES[affine] + [[0.0, 0.0, 1.0]])
                full = torch.cat([theta, torch.tensor([0.0, 0.0, 1.0]).expand(b, 1, 3)], 1)
                theta = (full @ a)[:, :2]
            grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
        if flip:
            x = torch.flip(x, dims=(3,))
        if rot:
            x = torch.rot90(x, rot, dims=(2, 3))
        return x


# ----------------------------------------------------------------------------- model


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    # the official heads: two hidden layers with batch norm
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, d_out),
    )


class IERModel(nn.Module):
    """Backbone f_Theta with the class head f_Phi, transformation head f_Psi and contrastive head f_Omega."""

    def __init__(self, backbone: nn.Module, num_classes: int, num_transforms: int, feature_dim: int = 64,
                 hidden: int | None = None):
        super().__init__()
        d = backbone.num_features
        hidden = hidden or d
        self.backbone = backbone
        self.classifier = nn.Linear(d, num_classes)
        self.eq_head = _mlp(d, hidden, num_transforms)
        self.inv_head = _mlp(d, hidden, feature_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> features (B, D), class logits (B, C'), transformation logits (B, M), v (B, feature_dim)."""
        h = self.backbone.forward_features(x)
        return h, self.classifier(h), self.eq_head(h), self.inv_head(h)


# ----------------------------------------------------------------------------- the step


class BatchIndexer:
    """The training-image indices of the loop's step ``step`` (for the memory bank).

    Reproduces :func:`fewgen.pretrain.loop.train_backbone`'s seeded permutation and checks
    the result against the step's labels.
    """

    def __init__(self, labels: torch.Tensor, settings: TrainSettings, stage: str):
        self.labels, self.s, self.stage = labels, settings, stage
        n = len(labels)
        self.steps_per_epoch = max(1, n // settings.batch_size)
        if settings.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, settings.max_steps_per_epoch)
        self._epoch, self._perm = -1, None

    def __call__(self, step: int, y: torch.Tensor) -> torch.Tensor:
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            gen = make_generator("perm", self.s.seed, self.stage, epoch)
            self._epoch, self._perm = epoch, torch.randperm(len(self.labels), generator=gen)
        idx = self._perm[i * self.s.batch_size : (i + 1) * self.s.batch_size]
        if not torch.equal(self.labels[idx], y.cpu()):
            raise RuntimeError("IER memory bank: the batch indices recomputed from the training loop's "
                               "permutation do not match the batch's labels; the loop's batch order changed")
        return idx


@dataclasses.dataclass
class _ViewPlan:
    transforms: TransformSet
    n_views: int
    relabel_rotations: bool  # rotation classes kept: rotated views change class
    base_classes: int  # C (classes before rotation copies) when relabelling


def _make_views(x: torch.Tensor, y: torch.Tensor, plan: _ViewPlan):
    """The V views of a batch, view-major: images (V*B, ...), class labels (V*B,), transformation labels (V*B,)."""
    ts = plan.transforms
    m = len(ts)
    if plan.n_views >= m:
        chosen = list(range(m))
    else:  # identity first, then distinct others (global RNG, seeded per epoch by the loop)
        chosen = [0] + (torch.randperm(m - 1)[: plan.n_views - 1] + 1).tolist()
    images, labels, eq_labels = [], [], []
    for t in chosen:
        images.append(ts.apply(x, t))
        if plan.relabel_rotations:
            c, r = y % plan.base_classes, y // plan.base_classes
            absolute = (r + ts.component(t, "rotate")) % 4
            labels.append(c + absolute * plan.base_classes)
            # same transformation with its rotation component replaced by the absolute orientation
            stride = ts.index({"rotate": 1})
            eq_labels.append(t + (absolute - ts.component(t, "rotate")) * stride)
        else:
            labels.append(y)
            eq_labels.append(torch.full_like(y, t))
    return torch.cat(images), torch.cat(labels), torch.cat(eq_labels), len(chosen)


# ----------------------------------------------------------------------------- recipes


def check_ier_settings(ic, recipe: str = "ier") -> None:
    """Raise one clear :class:`FewgenError` for IER options (``pretrain.ier``, an ``IERConfig``) that
    cannot train under ``recipe`` (ier or ier-distill); reads the options only, so a run checks them
    before anything is computed."""
    ts = TransformSet(ic.transforms)
    n_views = len(ts) if ic.num_views is None else ic.num_views
    if not 2 <= n_views <= len(ts):
        raise FewgenError(f"pretrain.ier.num_views={ic.num_views} must be between 2 and {len(ts)} (the number of "
                          f"transformations of {ic.transforms}, identity included)")
    if ic.rotation_classes not in ("drop", "relabel"):
        raise FewgenError(f"pretrain.ier.rotation_classes={ic.rotation_classes!r}; use drop or relabel")
    for name in ("ce_weight", "equivariant_weight", "invariant_weight", "distill_weight", "distill_feature_weight"):
        if getattr(ic, name) < 0:
            raise FewgenError(f"pretrain.ier.{name}={getattr(ic, name)} must be >= 0 (0 switches the term off)")
    if ic.temperature <= 0 or ic.distill_temperature <= 0:
        raise FewgenError("pretrain.ier.temperature and distill_temperature must be > 0")
    if not 0 <= ic.bank_momentum < 1:
        raise FewgenError(f"pretrain.ier.bank_momentum={ic.bank_momentum} must be in [0, 1)")
    if ic.ce_weight == ic.equivariant_weight == ic.invariant_weight == 0:  # the first model has no teacher
        raise FewgenError("pretrain.ier.ce_weight, equivariant_weight and invariant_weight are all 0, so the first "
                          "IER model has no loss; set at least one above 0")
    if recipe == "ier-distill" and ic.generations < 1:
        raise FewgenError(f"pretrain.ier.generations={ic.generations}: ier-distill needs at least 1 (or use recipe ier)")


def _prepare(ctx: PretrainContext) -> tuple[PretrainContext, _ViewPlan]:
    """Check the IER settings; choose the training set (see 'Rotation classes' above)."""
    ic = ctx.options.ier
    check_ier_settings(ic, ctx.options.recipe)
    ts = TransformSet(ic.transforms)
    n_views = len(ts) if ic.num_views is None else ic.num_views
    rotation_data = ctx.options.rotation_classes
    relabel = False
    base_classes = ctx.data.base.num_classes
    if rotation_data and "rotate" in ts.families:
        base = ctx.data.base
        if ic.rotation_classes == "drop":
            ctx = dataclasses.replace(ctx, train_images=base.images, train_labels=base.labels,
                                      num_classes=base.num_classes)
            ctx.log(f"IER: rotations are the equivariant transformations; training on the {len(base)} unrotated "
                    f"base images ({base.num_classes} classes) instead of the rotation classes")
        else:
            # the views of an unrotated image are its 4 rotation classes: every (image, rotation)
            # pair once per epoch, as CE over the rotation classes, at the same forward passes
            relabel = True
            ctx = dataclasses.replace(ctx, train_images=base.images, train_labels=base.labels,
                                      num_classes=4 * base.num_classes)
            ctx.log(f"IER: each of the {len(base)} unrotated base images is seen in its 4 rotations, labelled "
                    f"with the rotation classes ({4 * base.num_classes} classes)")
    return ctx, _ViewPlan(ts, n_views, relabel, base_classes)


def _build_model(ctx: PretrainContext, plan: _ViewPlan, stage: str) -> IERModel:
    ic = ctx.options.ier
    # seeded by stage, so a generation resumed alone starts from the same weights
    torch.manual_seed(seed_hash("ier-init", ctx.options.seed, stage))
    return IERModel(ctx.new_backbone(), ctx.num_classes, len(plan.transforms), ic.feature_dim, ic.head_hidden)


def _loss_fn(ctx: PretrainContext, model: IERModel, plan: _ViewPlan, bank: MemoryBank, settings: TrainSettings,
             stage: str, teacher: IERModel | None = None):
    ic = ctx.options.ier
    indexer = BatchIndexer(ctx.train_labels, settings, stage)

    def loss_fn(x: torch.Tensor, y: torch.Tensor, step: int) -> dict[str, torch.Tensor]:
        xv, yv, ev, n_views = _make_views(x, y, plan)
        h, logits, eq_logits, inv = model(xv)
        bank_copy = negatives = idx = None
        if ic.invariant_weight > 0:
            idx = indexer(step, y)
            bank_copy = bank.features[idx.to(bank.features.device)]
            negatives = bank.negatives(idx, ic.bank_negatives)
        raw = ier_losses(logits, yv, eq_logits, ev, inv, bank_copy, negatives, n_views, ic.temperature)
        terms = {}
        if ic.ce_weight > 0:
            terms["ce"] = ic.ce_weight * raw["ce"]
        if ic.equivariant_weight > 0:
            terms["equivariant"] = ic.equivariant_weight * raw["equivariant"]
        if ic.invariant_weight > 0:
            terms["invariant"] = ic.invariant_weight * raw["invariant"]
            bank.update(idx.to(bank.features.device), inv[: len(y)])
        if teacher is not None and ic.distill_weight > 0:
            with torch.no_grad():
                h_t, logits_t, eq_t, inv_t = teacher(xv)
            w, temp = ic.distill_weight, ic.distill_temperature
            terms["kd_class"] = w * distill_kl(logits, logits_t, temp)
            terms["kd_transform"] = w * distill_kl(eq_logits, eq_t, temp)
            terms["kd_invariant"] = w * F.mse_loss(inv, inv_t)
        if teacher is not None and ic.distill_feature_weight > 0:
            with torch.no_grad():
                h_t = teacher.backbone.forward_features(xv)
            terms["kd_feature"] = ic.distill_feature_weight * F.mse_loss(h, h_t)
        if not terms:
            raise FewgenError("every IER loss weight is 0; set at least one of pretrain.ier.*_weight > 0")
        return terms

    return loss_fn


def _train_generation(ctx: PretrainContext, plan: _ViewPlan, stage: str,
                      teacher: IERModel | None = None) -> tuple[TrainResult, IERModel]:
    """Train one generation (student of ``teacher`` when given); save the whole final model."""
    ic = ctx.options.ier
    model = _build_model(ctx, plan, stage)
    bank = MemoryBank(len(ctx.train_images), ic.feature_dim, ic.bank_momentum, seed=seed_hash(ctx.options.seed, stage))
    settings = ctx.settings()
    if teacher is not None:
        teacher.to(ctx.device).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    loss_fn = _loss_fn(ctx, model, plan, bank.to(ctx.device), settings, stage, teacher)
    result = ctx.train(model, model.backbone, loss_fn, stage=stage, settings=settings, extra_modules={"bank": bank})
    from fewgen.checkpoint import save_model

    # the final model (backbone + heads) is the next generation's teacher
    save_model(ctx.out_dir / f"{stage}-model.safetensors", model, {"stage": stage, "epochs": settings.epochs})
    for record in result.history:
        record.setdefault("stage", stage)
    return result, model


def load_generation(path: str | Path, ctx: PretrainContext, plan: _ViewPlan) -> IERModel:
    """A saved generation (``<stage>-model.safetensors``) as a frozen-ready :class:`IERModel`."""
    from fewgen.checkpoint import load_model

    ic = ctx.options.ier
    model = IERModel(ctx.new_backbone(), ctx.num_classes, len(plan.transforms), ic.feature_dim, ic.head_hidden)
    load_model(path, model)
    return model


@RECIPES.register("ier")
def train_ier(ctx: PretrainContext) -> TrainResult:
    """IER without distillation: L = w_ce L_ce + w_eq L_eq + w_in L_in."""
    ctx, plan = _prepare(ctx)
    result, _ = _train_generation(ctx, plan, "ier")
    return result


def _cached_ier_model(ctx: PretrainContext) -> Path | None:
    """The final model of a finished ``ier`` run of the same config in the run's cache, if any."""
    cache = ctx.cache
    if cache is None:
        return None
    options = copy.deepcopy(ctx.options)
    options.recipe = "ier"
    entry = cache.path("backbones", pretrain_key(ctx.backbone_options, options, ctx.data))
    path = entry / "ier-model.safetensors"
    return path if entry != ctx.out_dir and cache.ready(entry, ctx.log) and path.exists() else None


@RECIPES.register("ier-distill")
def train_ier_distill(ctx: PretrainContext) -> TrainResult:
    """IER, then ``generations`` rounds of multi-head self-distillation (stages ier, gen1, gen2, ...)."""
    generations = ctx.options.ier.generations
    ctx, plan = _prepare(ctx)  # checks generations >= 1
    history: list[dict] = []
    cached = _cached_ier_model(ctx)
    if cached is not None:
        ctx.log(f"IER generation 0 from the finished ier run {cached.parent}")
        teacher = load_generation(cached, ctx, plan)
        from fewgen.utils import read_json

        history += [r | {"stage": "ier"} for r in read_json(cached.parent / "history.json").get("history", [])]
    else:
        result, teacher = _train_generation(ctx, plan, "ier")
        history += result.history
    for g in range(1, generations + 1):
        result, teacher = _train_generation(ctx, plan, f"gen{g}", teacher=teacher)
        history += result.history
    return TrainResult(result.best_path, result.best_epoch, result.best_val, history)


__all__ = [
    "BatchIndexer", "IERModel", "MemoryBank", "TransformSet", "distill_kl", "ier_losses",
    "invariant_contrastive_loss", "load_generation", "train_ier", "train_ier_distill",
]
