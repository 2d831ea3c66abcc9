"""Pipeline steps of learning with synthetic data: ``learn`` (and the steps that fill the
synthetic slot without fewgen's generator: ``augmented-copies``, ``import-synthetic``).

``learn``, per few-shot seed and shot count K, fine-tunes one classifier per method on that
seed's few-shot set (all novel classes) plus the synthetic set of ``synthesize``
(``run.artifacts["synthetic"][(seed, K)]``), then evaluates it on the run's shared episodes
of that seed: with its own head restricted to each episode's N classes (``classifier:
head``) and with frozen-feature classifiers fitted on the episode supports in the
fine-tuned feature space (``classifier: logreg`` / ``proto``). Rows:

* ``real-only``, ``synthetic-only``: cross-entropy on one source;
* ``datadream``: real + synthetic with DataDream's loss (``datadream.py``);
* ``diffalign`` and ``diffalign-no-<term>``: DiffAlign's full loss and each term off in turn;
* ``frozen+synthetic``: the pretrained backbone's frozen-feature classifiers with the
  synthetic images of the episode classes added to the support;
* ``<method>@<m>``: the sweep over synthetic images per class.

Fine-tuned weights and curves are cached by the content of everything that made them
(backbone key, few-shot set, synthetic images, method and settings), so a rerun or another
preset reuses them.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass

import torch
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.data.fewshot import few_shot_set
from fewgen.errors import FewgenError
from fewgen.keys import key_parts
from fewgen.learners.datadream import datadream_batches, datadream_loss_fn
from fewgen.learners.diffalign import DiffAlignWeights, diffalign_batches, diffalign_loss_fn
from fewgen.learners.finetune import (
    BackboneClassifier,
    FinetuneSettings,
    ce_batches,
    ce_loss,
    finetune,
    finetuned_episode_accuracies,
    model_features,
)
from fewgen.learners.losses import hallucinate_labels
from fewgen.pipeline import STEPS, Run, evaluate_frozen, novel_features
from fewgen.utils import seed_hash, write_json

KNOWN_METHODS = ("real-only", "synthetic-only", "datadream", "diffalign")


@dataclass
class MethodSpec:
    """One fine-tuning recipe: ``kind`` is real-only, synthetic-only, datadream or diffalign."""

    name: str
    kind: str
    weights: DiffAlignWeights | None = None

    @property
    def uses_real(self) -> bool:
        return self.kind in ("real-only", "datadream") or (self.kind == "diffalign" and self.weights.real > 0)

    @property
    def uses_synthetic(self) -> bool:
        return self.kind in ("synthetic-only", "datadream") or (self.kind == "diffalign" and self.weights.uses_synthetic)

    def key(self) -> dict:
        return {"name": self.name, "kind": self.kind,
                "weights": dataclasses.asdict(self.weights) if self.weights else None}


def diffalign_weights(lc) -> DiffAlignWeights:
    return DiffAlignWeights(real=lc.w_real, synthetic=lc.w_synthetic, hallucination=lc.w_hallucination, mmd=lc.w_mmd,
                            label_smoothing=lc.label_smoothing, bandwidths=tuple(lc.mmd_bandwidths),
                            temperature=lc.hallucination_temperature)


def method_specs(lc) -> list[MethodSpec]:
    """The methods of ``learner.methods``, DiffAlign followed by its ablations."""
    specs = []
    for name in lc.methods:
        if name not in KNOWN_METHODS:
            import difflib

            close = difflib.get_close_matches(name, KNOWN_METHODS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise FewgenError(f"unknown learner method {name!r}.{hint} Known: {', '.join(KNOWN_METHODS)}")
        if name == "diffalign":
            w = diffalign_weights(lc)
            specs.append(MethodSpec("diffalign", "diffalign", w))
            for term in lc.ablations:
                specs.append(MethodSpec(f"diffalign-no-{term}", "diffalign", w.without(term)))
        else:
            specs.append(MethodSpec(name, name))
    return specs


def first_per_class(data: ArrayDataset, m: int | None) -> ArrayDataset:
    """The first ``m`` images of every class (all when ``m`` is None)."""
    if m is None:
        return data
    idx = torch.cat([ix[:m] for ix in data.indices_by_class()])
    return data.subset(idx.sort().values, name=f"{data.name}/first{m}")


def synthetic_set(run: Run, seed: int, n_shot: int, required: bool) -> ArrayDataset | None:
    """The synthetic images of ``synthesize`` for (seed, K), checked against the novel classes."""
    store = run.artifacts.get("synthetic") or {}
    syn = store.get((seed, n_shot))
    if syn is None:
        if required:
            raise FewgenError(
                f"the learn step needs synthetic images for seed {seed}, {n_shot}-shot: put 'synthesize' (or "
                "'augmented-copies') before 'learn' in pipeline, or set learner.methods=[real-only]")
        return None
    novel = run.data.novel
    if syn.class_names != novel.class_names:
        raise FewgenError(f"synthetic set for seed {seed}, {n_shot}-shot has classes that are not the novel classes "
                          f"of {novel.name!r}; regenerate it for this dataset")
    if syn.image_shape != novel.image_shape:
        raise FewgenError(f"synthetic images are {syn.image_shape} but the data is {novel.image_shape}; "
                          "regenerate them at the data's image size")
    return syn


def finetune_settings(lc, seed: int) -> FinetuneSettings:
    return FinetuneSettings(steps=lc.steps, lr_backbone=lc.lr_backbone, lr_head=lc.lr_head, momentum=lc.momentum,
                            weight_decay=lc.weight_decay, augment=list(lc.augment), seed=seed)


def new_model(run: Run, n_classes: int) -> nn.Module:
    lc = run.cfg.learner
    if lc.model == "backbone":
        if "backbone" not in run.artifacts:
            raise FewgenError("the learn step needs a backbone: put 'pretrain' before it in pipeline")
        return BackboneClassifier(copy.deepcopy(run.artifacts["backbone"].backbone).cpu(), n_classes)
    if lc.model == "clip":
        from fewgen.learners.clip import CLIPClassifier

        if not lc.clip_path:
            raise FewgenError("learner.model=clip needs learner.clip_path (a local CLIP folder, e.g. ViT-B/16)")
        return CLIPClassifier.from_pretrained(lc.clip_path, run.data.novel.class_names, rank=lc.clip_lora_rank,
                                              prompt=lc.clip_prompt)
    raise FewgenError(f"unknown learner.model {lc.model!r}; use backbone or clip")


class SeedContext:
    """What every method of one (seed, K) shares: sets, teacher features, soft labels."""

    def __init__(self, run: Run, seed: int, n_shot: int, synthetic: ArrayDataset | None):
        self.run, self.seed, self.n_shot = run, seed, n_shot
        self.real = few_shot_set(run.data.novel, n_shot, seed)
        self.synthetic = synthetic
        self._teacher: nn.Module | None = None
        self._soft: torch.Tensor | None = None

    def teacher(self) -> nn.Module:
        if self._teacher is None:
            self._teacher = new_model(self.run, self.run.data.novel.num_classes).to(self.run.device)
        return self._teacher

    def base_soft_labels(self) -> torch.Tensor:
        """Hallucinated soft labels of the base images over the novel classes (pretrained features)."""
        if self._soft is None:
            run, lc = self.run, self.run.cfg.learner
            t = self.teacher()
            support = model_features(t, self.real.images, device=run.device)
            if lc.model == "backbone":
                from fewgen.evaluation.features import cached_features

                pb = run.artifacts["backbone"]
                base = cached_features(run.cache, pb.key, pb.backbone, run.data.base, run.device, run.log)
            else:
                base = model_features(t, run.data.base.images, device=run.device)
            self._soft = hallucinate_labels(support, self.real.labels, base, run.data.novel.num_classes,
                                            temperature=lc.hallucination_temperature, c=run.cfg.eval.logreg_c,
                                            max_iter=run.cfg.eval.logreg_iters)
        return self._soft


def train_one(ctx: SeedContext, spec: MethodSpec, synthetic: ArrayDataset | None) -> tuple[nn.Module, list[dict], float]:
    """Fine-tune (or load from the cache) one method on one few-shot set; returns (model, curve, seconds)."""
    from fewgen.checkpoint import load_model, save_model
    from fewgen.utils import read_json

    run, lc = ctx.run, ctx.run.cfg.learner
    n_classes = run.data.novel.num_classes
    real = ctx.real if spec.uses_real or spec.kind == "diffalign" else None
    syn = synthetic if spec.uses_synthetic else None
    if spec.uses_synthetic and (syn is None or len(syn) == 0):
        raise FewgenError(f"method {spec.name} needs synthetic images but the synthetic set is empty")
    settings = finetune_settings(lc, ctx.seed)
    hallucinates = spec.kind == "diffalign" and spec.weights.hallucination > 0
    parts = key_parts("learners", run.cfg, method=spec.key(), seed=ctx.seed,
                      backbone=run.artifacts["backbone"].key if "backbone" in run.artifacts else None,
                      real=real.digest() if real is not None else None,
                      synthetic=syn.digest() if syn is not None else None,
                      base=run.data.base.digest() if hallucinates else None)
    model = new_model(run, n_classes)
    cacheable = lc.model == "backbone"
    entry = run.cache.entry("learners", parts) if cacheable else None
    if entry is not None and run.cache.ready(entry, run.log):
        load_model(entry / "model.safetensors", model)
        info = read_json(entry / "history.json")
        run.log(f"[{spec.name} seed {ctx.seed} {ctx.n_shot}-shot] from cache {entry}")
        return model.to(run.device).eval(), info["history"], info["seconds"]

    t0 = time.time()
    sp = (spec.name, ctx.seed, ctx.n_shot)
    if lc.head_init == "prototypes" and lc.model == "backbone":  # CLIP's head starts from the class prompts
        images = [d for d in (real if spec.uses_real else None, syn) if d is not None]
        x = torch.cat([d.images for d in images])
        y = torch.cat([d.labels for d in images])
        model.head.init_prototypes(model_features(ctx.teacher(), x, device=run.device), y)
    elif lc.head_init != "random":
        raise FewgenError(f"unknown learner.head_init {lc.head_init!r}; use prototypes or random")
    if spec.kind == "real-only":
        batch_fn, loss_fn = ce_batches(real, lc.batch_size, *sp), ce_loss
    elif spec.kind == "synthetic-only":
        batch_fn, loss_fn = ce_batches(syn, lc.batch_size, *sp), ce_loss
    elif spec.kind == "datadream":
        batch_fn, loss_fn = datadream_batches(real, syn, lc.batch_size, *sp), datadream_loss_fn(lc.datadream_lambda)
    else:
        w = spec.weights
        base_images = base_soft = None
        if w.hallucination > 0:
            base_images, base_soft = run.data.base.images, ctx.base_soft_labels()
        batch_fn = diffalign_batches(real, syn, base_images, base_soft, lc.batch_size, lc.synthetic_batch_size,
                                     lc.base_batch_size, *sp)
        loss_fn = diffalign_loss_fn(w)
    history = finetune(model, batch_fn, loss_fn, settings, run.data.novel.image_shape, run.device,
                       log=run.log, name=f"{spec.name} seed {ctx.seed} {ctx.n_shot}-shot")
    seconds = round(time.time() - t0, 2)
    if entry is not None:
        save_model(entry / "model.safetensors", model, {"method": spec.name})
        write_json(entry / "history.json", {"history": history, "seconds": seconds})
        run.cache.mark_done(entry, {"method": spec.name, "seconds": seconds})
    return model, history, seconds


def _classifier_kwargs(run: Run) -> dict:
    return {"logreg": {"c": run.cfg.eval.logreg_c, "max_iter": run.cfg.eval.logreg_iters}}


class Results:
    """Per-episode accuracies gathered over seeds, turned into rows at the end."""

    def __init__(self) -> None:
        self.acc: dict[tuple, list[torch.Tensor]] = {}
        self.extra: dict[tuple, dict] = {}

    def add(self, method: str, clf: str, n_way: int, n_shot: int, acc: torch.Tensor, seconds: float,
            n_synthetic: int, per_class: int | None, **fields) -> None:
        key = (method, clf, n_way, n_shot)
        self.acc.setdefault(key, []).append(acc)
        ex = self.extra.setdefault(key, {"train_seconds": 0.0, "n_synthetic": [], **fields})
        ex["train_seconds"] = round(ex["train_seconds"] + seconds, 2)
        ex["n_synthetic"].append(n_synthetic)
        ex["synthetic_per_class"] = per_class

    def rows(self, run: Run) -> list[dict]:
        from fewgen.evaluation.protocol import summary_row

        out = []
        for key, accs in self.acc.items():
            method, clf, n_way, n_shot = key
            out.append(summary_row(method, n_way, n_shot, accs, run.cfg.seeds, classifier=clf,
                                   n_query=run.cfg.eval.n_query, learner=run.cfg.learner.model, **self.extra[key]))
        return out


def _per_class(data: ArrayDataset | None) -> int:
    return int(data.counts().min()) if data is not None and len(data) else 0


def generated(run: Run) -> bool:
    """Whether the run's synthetic slot holds generated images (``synthesize`` or imported), not
    the generator-free control (``augmented-copies``): what ``uses_synthetic`` says of a row."""
    return run.artifacts.get("synthetic_kind", "generated") != "augmented-copies"


def _frozen_synthetic_rows(run: Run, sets: dict[tuple, ArrayDataset], method: str, weight: float | None = None,
                           uses_synthetic: bool | None = None,
                           weights: dict[tuple, torch.Tensor] | None = None) -> list[dict]:
    """Frozen-feature rows with each (seed, K)'s extra set (synthetic images, or augmented copies)
    added to the episode supports and to the all-way support, each image weighted ``weight``
    (default ``learner.synthetic_weight``); ``uses_synthetic`` defaults to whether the run's
    synthetic slot holds generated images.

    Only the shot counts for which every seed has a set are evaluated.
    """
    from fewgen.evaluation.features import cached_features
    from fewgen.evaluation.protocol import ExtraSupport

    pb = run.artifacts["backbone"]
    n_shots = [k for k in run.cfg.eval.n_shots if all((s, k) in sets for s in run.cfg.seeds)]
    if not n_shots:
        return []
    feats, labels = {}, {}
    for key, syn in sets.items():
        if len(syn):
            feats[key] = cached_features(run.cache, pb.key, pb.backbone, syn, run.device, run.log)
        else:
            feats[key] = torch.zeros(0, pb.backbone.num_features)
        labels[key] = syn.labels
    sub = copy.copy(run)  # same episodes and data, restricted shot counts
    sub.cfg = copy.deepcopy(run.cfg)
    sub.cfg.eval.n_shots = n_shots
    per_class = min(_per_class(s) for s in sets.values())
    extra = ExtraSupport(feats, labels, weight=run.cfg.learner.synthetic_weight if weight is None else weight,
                         weights=weights)
    uses = generated(run) if uses_synthetic is None else uses_synthetic
    return evaluate_frozen(sub, novel_features(run), method, extra=extra,
                           extra_fields={"synthetic_per_class": per_class, "synthetic_weight": extra.weight,
                                         "n_synthetic": [len(s) for s in sets.values()],
                                         "uses_synthetic": uses and per_class > 0})


@torch.no_grad()
def shot_classifier(run: Run, real: ArrayDataset, syn: ArrayDataset) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """L2-normalised pretrained features of the real shots and the synthetic images, and the
    probabilities over all novel classes that a logistic regression fitted on the shots gives
    each synthetic image: (real feats, synthetic feats, (n_synthetic, n_classes))."""
    import torch.nn.functional as F

    from fewgen.evaluation.classifiers import LogisticRegression
    from fewgen.evaluation.features import extract_features

    pb = run.artifacts["backbone"]
    fr = F.normalize(extract_features(pb.backbone, real, device=run.device), dim=-1)
    fs = F.normalize(extract_features(pb.backbone, syn, device=run.device), dim=-1)
    clf = LogisticRegression(c=run.cfg.eval.logreg_c, max_iter=run.cfg.eval.logreg_iters)
    clf.fit(fr[None], real.labels[None], n_classes=run.data.novel.num_classes)
    return fr, fs, clf.predict_proba(fs[None])[0]


def keep_consistent(syn: ArrayDataset, own_prob: torch.Tensor, keep: float) -> ArrayDataset:
    """The share ``keep`` of each class's synthetic images with the highest probability of their
    own class under the shot classifier (at least one per class), in their original order, so
    ``first_per_class`` and the sweep still take a prefix."""
    if not 0 < keep <= 1:
        raise FewgenError(f"learner.synthetic_keep must be in (0, 1], got {keep}")
    if keep == 1:
        return syn
    chosen = []
    for idx in syn.indices_by_class():
        if len(idx):
            m = max(1, int(round(keep * len(idx))))
            chosen.append(idx[own_prob[idx].argsort(descending=True, stable=True)[:m]])
    idx = torch.cat(chosen).sort().values
    return syn.subset(idx, name=f"{syn.name}/keep{keep:g}")


@torch.no_grad()
def synthetic_diagnostics(run: Run, real: ArrayDataset, syn: ArrayDataset) -> dict:
    """How usable a synthetic set is, judged with the few shots only (never the test images).

    In the pretrained feature space: ``label_fidelity`` - the share of synthetic images that a
    logistic regression fitted on the real shots assigns to their own label (all novel classes);
    ``nn_cosine_to_shots`` - mean cosine similarity of each synthetic image to the nearest real
    shot of its class (1 = copies); ``intra_class_cosine`` - mean pairwise cosine among the
    synthetic images of a class (diversity: lower is more diverse); ``shots_intra_class_cosine``
    - the same among the real shots (needs K > 1); ``mmd_real_synthetic`` - the multi-kernel MMD
    between real shots and synthetic images (L2-normalised features).
    """
    from fewgen.learners.losses import mmd

    fr, fs, prob = shot_classifier(run, real, syn)
    n = run.data.novel.num_classes
    fidelity = float((prob.argmax(1) == syn.labels).double().mean())
    nn_cos, intra, shots_intra = [], [], []
    for c in range(n):
        r, s_ = fr[real.labels == c], fs[syn.labels == c]
        if len(s_):
            nn_cos.append(float((s_ @ r.t()).max(1).values.mean()))
        for group, out in ((s_, intra), (r, shots_intra)):
            if len(group) > 1:
                sim = group @ group.t()
                out.append(float((sim.sum() - sim.diag().sum()) / (len(group) * (len(group) - 1))))
    mean = lambda v: round(sum(v) / len(v), 4) if v else None  # noqa: E731
    return {"label_fidelity": round(fidelity, 4), "nn_cosine_to_shots": mean(nn_cos),
            "intra_class_cosine": mean(intra), "shots_intra_class_cosine": mean(shots_intra),
            "mmd_real_synthetic": round(float(mmd(fr, fs, run.cfg.learner.mmd_bandwidths)), 4),
            "synthetic_per_class": _per_class(syn), "n_synthetic": len(syn)}


@STEPS.register("learn")
def step_learn(run: Run) -> None:
    """Fine-tune and evaluate every learner method (module docstring) for each seed and K."""
    cfg, lc = run.cfg, run.cfg.learner
    specs = method_specs(lc)
    for clf in lc.eval_with:
        if clf != "head":
            from fewgen.evaluation.classifiers import CLASSIFIERS

            CLASSIFIERS.get(clf)
    needs_syn = any(s.uses_synthetic for s in specs) or bool([m for m in lc.sweep if m > 0]) or lc.frozen_synthetic
    if lc.augmented_control and lc.model != "backbone":
        raise FewgenError("learner.augmented_control needs learner.model=backbone (frozen pretrained features)")
    if lc.frozen_synthetic and lc.model != "backbone":
        raise FewgenError("learner.frozen_synthetic needs learner.model=backbone (it uses the pretrained backbone)")
    if lc.synthetic_keep < 1 and lc.model != "backbone":
        raise FewgenError("learner.synthetic_keep < 1 needs learner.model=backbone (it ranks the "
                          "synthetic images with the pretrained backbone)")
    torch.set_grad_enabled(True)
    results = Results()
    histories: dict[str, dict] = {}
    novel = run.data.novel
    ckw = _classifier_kwargs(run)

    def evaluate(model, ctx: SeedContext, name: str, seconds: float, syn: ArrayDataset | None, **fields) -> None:
        episodes = [run.episodes(n_way, ctx.n_shot, ctx.seed) for n_way in cfg.eval.n_ways]
        accs = finetuned_episode_accuracies(model, novel, episodes, lc.eval_with, ckw, run.device)
        for clf, per_set in accs.items():
            for n_way, acc in zip(cfg.eval.n_ways, per_set):
                results.add(name, clf, n_way, ctx.n_shot, acc, seconds, len(syn) if syn is not None else 0,
                            _per_class(syn), **fields)

    used_sets: dict[tuple, ArrayDataset] = {}
    diagnostics: dict[str, dict] = {}
    sweep_sets: dict[int, dict[tuple, ArrayDataset]] = {}
    for n_shot in cfg.eval.n_shots:
        for seed in cfg.seeds:
            ctx = SeedContext(run, seed, n_shot, None)
            syn_all = synthetic_set(run, seed, n_shot, required=needs_syn)
            if syn_all is not None and len(syn_all) and lc.synthetic_keep < 1:
                own = shot_classifier(run, ctx.real, syn_all)[2].gather(1, syn_all.labels[:, None])[:, 0]
                syn_all = keep_consistent(syn_all, own, lc.synthetic_keep)
            syn = ctx.synthetic = first_per_class(syn_all, lc.synthetic_per_class) if syn_all is not None else None
            if syn is not None:
                used_sets[(seed, n_shot)] = syn
            if syn is not None and len(syn) and lc.model == "backbone":
                diagnostics[f"seed{seed}_{n_shot}shot"] = d = synthetic_diagnostics(run, ctx.real, syn)
                run.log(f"synthetic set seed {seed} {n_shot}-shot: " + ", ".join(f"{k} {v}" for k, v in d.items()))
            for spec in specs:
                model, history, seconds = train_one(ctx, spec, syn)
                histories[f"{spec.name}/seed{seed}/{n_shot}shot"] = {
                    "method": spec.name, "seed": seed, "n_shot": n_shot, "history": history}
                evaluate(model, ctx, spec.name, seconds, syn if spec.uses_synthetic else None,
                         uses_synthetic=spec.uses_synthetic and generated(run))
            if n_shot not in lc.sweep_shots:
                continue
            for m in lc.sweep:
                sub = first_per_class(syn_all, m) if syn_all is not None else None
                if m > 0 and (sub is None or _per_class(sub) < m):
                    run.log(f"sweep: skipping {m} synthetic images per class (the synthetic set has "
                            f"{_per_class(syn_all)} per class); raise the synthesis count to include it")
                    continue
                if lc.sweep_method != "frozen":  # fine-tune at each point; "frozen": the frozen rows only
                    spec = MethodSpec("real-only", "real-only") if m == 0 else sweep_spec(lc)
                    model, history, seconds = train_one(ctx, spec, sub if m > 0 else None)
                    evaluate(model, ctx, f"{lc.sweep_method}@{m}", seconds, sub if m > 0 else None, sweep=True,
                             uses_synthetic=m > 0 and generated(run))
                if sub is not None:
                    sweep_sets.setdefault(m, {})[(seed, n_shot)] = sub
    rows = results.rows(run)
    if lc.frozen_synthetic and used_sets:
        rows += _frozen_synthetic_rows(run, used_sets, "frozen+synthetic")
    if lc.augmented_control:  # the generator-free control on the same episodes
        copies = {(s, k): augmented_copies(few_shot_set(novel, k, s), lc.augmented_copies_per_class, s)
                  for k in cfg.eval.n_shots for s in cfg.seeds}
        rows += _frozen_synthetic_rows(run, copies, "frozen+augmented-copies", lc.augmented_weight, False)
        if lc.frozen_synthetic and used_sets:  # both at once: does the generator add what copies do not?
            both = {key: ArrayDataset.concat([copies[key], syn], name=f"{syn.name}+copies")
                    for key, syn in used_sets.items()}
            weights = {key: torch.cat([torch.full((len(copies[key]),), lc.augmented_weight),
                                       torch.full((len(syn),), lc.synthetic_weight)])
                       for key, syn in used_sets.items()}
            rows += _frozen_synthetic_rows(run, both, "frozen+synthetic+copies", weights=weights)
    if lc.frozen_synthetic:
        for m, sets in sorted(sweep_sets.items()):
            for row in _frozen_synthetic_rows(run, sets, f"frozen+synthetic@{m}"):
                row["sweep"] = True
                rows.append(row)
    run.add_rows(rows)
    run.artifacts["learn_histories"] = histories
    if run.dir is not None:
        write_json(run.dir / "learn_history.json", histories)
        if diagnostics:
            write_json(run.dir / "synthetic_diagnostics.json", diagnostics)


def sweep_spec(lc) -> MethodSpec:
    """The method the sweep trains at m > 0 synthetic images per class (no ablations)."""
    return method_specs(dataclasses.replace(lc, methods=[lc.sweep_method], ablations=[]))[0]


def augmented_copies(real: ArrayDataset, per_class: int, seed: int) -> ArrayDataset:
    """``per_class`` random affine distortions of each class's real shots (cycled), labels kept.

    A no-generator baseline for the synthetic set: it shows what plain augmentation of the
    few shots buys, the bar a generator has to clear.
    """
    import kornia.augmentation as K

    aug = K.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.85, 1.15), shear=10, p=1.0)
    parts_x, parts_y = [], []
    for c, idx in enumerate(real.indices_by_class()):
        if not len(idx):
            continue
        src = idx[torch.arange(per_class) % len(idx)]
        torch.manual_seed(seed_hash("augmented-copies", real.name, seed, c))
        x = aug(real.float_images(src))
        parts_x.append(x.mul(255).round().clamp(0, 255).to(torch.uint8))
        parts_y.append(torch.full((per_class,), c, dtype=torch.long))
    return ArrayDataset(torch.cat(parts_x), torch.cat(parts_y), list(real.class_names),
                        name=f"{real.name}/augmented-copies{per_class}")


@STEPS.register("augmented-copies")
def step_augmented_copies(run: Run) -> None:
    """Fill ``run.artifacts["synthetic"]`` with augmented copies of each seed's real shots
    (``learner.augmented_copies_per_class`` per class): the generator-free control."""
    store = run.artifacts.setdefault("synthetic", {})
    m = run.cfg.learner.augmented_copies_per_class
    for n_shot in run.cfg.eval.n_shots:
        for seed in run.cfg.seeds:
            store[(seed, n_shot)] = augmented_copies(few_shot_set(run.data.novel, n_shot, seed), m, seed)
    run.artifacts["synthetic_source"] = f"augmented copies of the real shots ({m} per class, random affine)"
    run.artifacts["synthetic_kind"] = "augmented-copies"
    run.log(f"synthetic set: {run.artifacts['synthetic_source']}")


def import_synthetic(folder: str, novel: ArrayDataset, per_class: int) -> ArrayDataset:
    """The first ``per_class`` images (by sorted file name) of each novel class from
    ``folder/<class name>/*.png|jpg``, at the novel data's size and channels, labelled in the
    novel classes' order. Only those files are read; other class folders are ignored."""
    from pathlib import Path

    import numpy as np

    from fewgen.data.datasets import image_files, read_image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FewgenError(f"synthesis.import_dir={folder!r} is not a folder; give a folder with one subfolder "
                          "per novel class (<dir>/<class>/*.png)")
    missing = [c for c in novel.class_names if not (root / c).is_dir()]
    if missing:
        raise FewgenError(f"{root} has no folder for novel class(es) {', '.join(map(repr, missing[:5]))}; "
                          f"its subfolders must be named as the novel classes: {', '.join(novel.class_names[:10])}")
    c, h, _ = novel.image_shape
    files = []
    for name in novel.class_names:
        found = image_files(root / name)
        if len(found) < per_class:
            raise FewgenError(f"{root / name} has {len(found)} images but synthesis.synthetic_per_class={per_class}; "
                              "add images or lower synthesis.synthetic_per_class")
        files += found[:per_class]
    images = torch.from_numpy(np.stack([read_image(f, str(f), h, c) for f in files]))
    labels = torch.arange(len(novel.class_names)).repeat_interleave(per_class)
    return ArrayDataset(images, labels, list(novel.class_names), name=f"imported:{root.name}/{per_class}")


@STEPS.register("import-synthetic")
def step_import_synthetic(run: Run) -> None:
    """Fill ``run.artifacts["synthetic"]`` with images made elsewhere (``synthesis.import_dir``),
    the same set for every seed and K: e.g. a GPU's Stable Diffusion output, or real images of
    the classes from another source as an upper bound on what a generator could give."""
    sc = run.cfg.synthesis
    if not sc.import_dir:
        raise FewgenError("the import-synthetic step needs synthesis.import_dir=<folder>/<class>/*.png")
    syn = import_synthetic(sc.import_dir, run.data.novel, sc.synthetic_per_class)
    store = run.artifacts.setdefault("synthetic", {})
    for n_shot in run.cfg.eval.n_shots:
        for seed in run.cfg.seeds:
            store[(seed, n_shot)] = syn
    run.artifacts["synthetic_source"] = f"imported from {sc.import_dir} ({sc.synthetic_per_class} per class)"
    run.artifacts["synthetic_kind"] = "imported"
    run.log(f"synthetic set: {run.artifacts['synthetic_source']}")


@STEPS.register("export")
def step_export(run: Run) -> None:
    """``<run>/classifier/``: the pretrained backbone and a head fitted on every novel class's shots
    (``export.n_shot``, ``export.seed``) and what ``export.extra`` adds (the run's generated images of
    those shots, augmented copies of them, or both, weighted as the learn step weights them): the fit
    of the run's all-way row of the same classifier and extra images. Its accuracy on the remaining
    novel images (when there are any) is recorded."""
    import yaml

    from fewgen.classifier import fit_classifier
    from fewgen.evaluation.features import cached_features
    from fewgen.evaluation.protocol import ExtraSupport

    cfg, ec = run.cfg, run.cfg.export
    if "backbone" not in run.artifacts:
        raise FewgenError("the export step needs a backbone: put 'pretrain' before it in pipeline")
    n_shot = max(cfg.eval.n_shots) if ec.n_shot is None else ec.n_shot
    seed = cfg.seeds[0] if ec.seed is None else ec.seed
    if n_shot not in cfg.eval.n_shots or seed not in cfg.seeds:
        raise FewgenError(f"export.n_shot={n_shot} and export.seed={seed} must be among eval.n_shots "
                          f"{cfg.eval.n_shots} and seeds {cfg.seeds}")
    pb, novel, lc = run.artifacts["backbone"], run.data.novel, cfg.learner
    shots = few_shot_set(novel, n_shot, seed)
    parts, weights = [], []  # in the order of the learn step's rows: copies, then generated images
    if "copies" in ec.extra:
        copies = augmented_copies(shots, lc.augmented_copies_per_class, seed)
        parts.append(copies)
        weights.append(torch.full((len(copies),), lc.augmented_weight))
    syn = (run.artifacts.get("synthetic") or {}).get((seed, n_shot)) if "synthetic" in ec.extra else None
    if syn is not None and len(syn):
        parts.append(syn)
        weights.append(torch.full((len(syn),), lc.synthetic_weight))
    extra = None
    uses_synthetic = syn is not None and len(syn) > 0 and generated(run)
    if parts:
        more = ArrayDataset.concat(parts, name=f"{shots.name}+extra") if len(parts) > 1 else parts[0]
        feats = cached_features(run.cache, pb.key, pb.backbone, more, run.device, run.log)
        w = torch.cat(weights)
        extra = ExtraSupport({(seed, n_shot): feats}, {(seed, n_shot): more.labels},
                             weights={(seed, n_shot): w}).for_all_way(seed, n_shot, novel.num_classes)
    info = {"fit": {"n_shot": n_shot, "seed": seed, "shots": len(shots), "extra": ec.extra,
                    "synthetic": 0 if syn is None else len(syn),
                    "copies": lc.augmented_copies_per_class * novel.num_classes if "copies" in ec.extra else 0,
                    "synthetic_weight": lc.synthetic_weight, "copies_weight": lc.augmented_weight,
                    "uses_synthetic": uses_synthetic},
            "novel": run.data.protocol, "run": cfg.name}
    clf = fit_classifier(pb.backbone, {"name": cfg.backbone.name, "kwargs": dict(cfg.backbone.kwargs)}, shots.images,
                         shots.labels, list(novel.class_names), ec.head, cfg.eval.logreg_c, cfg.eval.logreg_iters,
                         extra=extra, info=info)
    queries = len(novel) - len(shots)
    if queries > 0:  # the same images the all-way evaluation classifies
        from fewgen.data.fewshot import all_way_split

        _, qry = all_way_split(novel, n_shot, seed)
        feats = cached_features(run.cache, pb.key, pb.backbone, novel, run.device, run.log)[qry]
        pred = clf._head().predict(feats[None])[0]
        clf.info["all_way"] = {"queries": int(len(qry)),
                               "accuracy": round(float((pred == novel.labels[qry]).double().mean() * 100), 3)}
    if run.dir is not None:
        folder = clf.save(run.dir / "classifier", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        acc = clf.info.get("all_way")
        run.log(f"classifier ({ec.head}, {novel.num_classes} classes, {len(shots)} shots"
                f"{f' + {len(extra[0])} more ({ec.extra})' if extra is not None else ''}) in {folder.name}/"
                + (f"; {acc['accuracy']:.2f}% on the other {acc['queries']} novel images" if acc else ""))
    run.artifacts["classifier"] = clf
