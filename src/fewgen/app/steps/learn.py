"""Pipeline steps of learning with synthetic data: ``learn`` (and the steps that fill the
synthetic slot without fewgen's generator: ``augmented-copies``, ``import-synthetic``).

``learn``, per few-shot seed and shot count K, fine-tunes one classifier per method on that
seed's few-shot set (all novel classes) plus the synthetic set of ``synthesize``
(``run.state.synthetic[(seed, K)]``), then evaluates it on the run's shared episodes
of that seed: with its own head restricted to each episode's N classes (``classifier:
head``) and with frozen-feature classifiers fitted on the episode supports in the
fine-tuned feature space (``classifier: logreg`` / ``proto``). Rows:

* ``real-only``, ``synthetic-only``: cross-entropy on one source;
* ``datadream``: real + synthetic with DataDream's loss (``learners/datadream_classifier.py``);
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
from pathlib import Path

import torch
from torch import nn

from fewgen.app.runner import Run, step
from fewgen.app.steps.core import evaluate_frozen, novel_features, tensorboard_dir
from fewgen.data.base import ArrayDataset
from fewgen.data.fewshot import few_shot_set
from fewgen.errors import FewgenError
from fewgen.keys import key_parts
from fewgen.learners.finetune import (
    BackboneClassifier,
    FinetuneOptions,
    FinetuneSettings,
    finetune,
    finetuned_episode_accuracies,
    model_features,
)
from fewgen.learners.losses import hallucinate_labels
from fewgen.learners.registry import MethodSpec, Sources, method_specs
from fewgen.learners.synthetic import (
    augmented_copies,
    first_per_class,
    images_per_class,
    import_synthetic,
    keep_consistent,
    shot_classifier,
    synthetic_diagnostics,
)
from fewgen.utils import write_json


def finetune_settings(lc, seed: int) -> FinetuneSettings:
    return FinetuneSettings(**FinetuneOptions.of(lc), seed=seed)


def synthetic_set(run: Run, seed: int, n_shot: int, required: bool) -> ArrayDataset | None:
    """The synthetic images of ``synthesize`` for (seed, K), checked against the novel classes."""
    syn = run.state.synthetic.get((seed, n_shot))
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


def new_model(run: Run, n_classes: int) -> nn.Module:
    lc = run.cfg.learner
    if lc.model == "backbone":
        return BackboneClassifier(copy.deepcopy(run.state.backbone.backbone).cpu(), n_classes)
    if lc.model == "clip":
        from fewgen.learners.clip import CLIPClassifier

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

                pb = run.state.backbone
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
    parts = key_parts("learners", run.cfg, method=spec.key(), seed=ctx.seed,
                      backbone=run.state.backbone.key if run.state.backbone is not None else None,
                      real=real.digest() if real is not None else None,
                      synthetic=syn.digest() if syn is not None else None,
                      base=run.data.base.digest() if spec.hallucinates else None)
    model = new_model(run, n_classes)

    def build(entry: Path | None) -> tuple:
        t0 = time.time()
        sp = (spec.name, ctx.seed, ctx.n_shot)
        if lc.head_init == "prototypes" and lc.model == "backbone":  # CLIP's head starts from the class prompts
            images = [d for d in (real if spec.uses_real else None, syn) if d is not None]
            x = torch.cat([d.images for d in images])
            y = torch.cat([d.labels for d in images])
            model.head.init_prototypes(model_features(ctx.teacher(), x, device=run.device), y)
        sources = Sources(real, syn, run.data.base.images, ctx.base_soft_labels, lc.batch_size, sp)
        batch_fn, loss_fn = spec.method.objective(spec, lc, sources)
        history = finetune(model, batch_fn, loss_fn, settings, run.data.novel.image_shape, run.device,
                           log=run.log, name=f"{spec.name} seed {ctx.seed} {ctx.n_shot}-shot", progress=run.progress,
                           log_dir=tensorboard_dir(run, "learn", f"{spec.name}-seed{ctx.seed}-{ctx.n_shot}shot"
                                                   + ("" if syn is None else f"-{len(syn)}synthetic")))  # sweep points apart
        seconds = round(time.time() - t0, 2)
        if entry is not None:
            save_model(entry / "model.safetensors", model, {"method": spec.name})
            write_json(entry / "history.json", {"history": history, "seconds": seconds})
            run.cache.mark_done(entry, {"method": spec.name, "seconds": seconds})
        return model, history, seconds

    def load(entry: Path) -> tuple:
        load_model(entry / "model.safetensors", model)
        info = read_json(entry / "history.json")
        return model.to(run.device).eval(), info["history"], info["seconds"]

    if lc.model != "backbone":  # the CLIP + LoRA learner is trained each run, not cached
        return build(None)
    return run.cache.build_or_load("learners", parts, build, load, run.log,
                                   what=f"[{spec.name} seed {ctx.seed} {ctx.n_shot}-shot]")


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


def generated(run: Run) -> bool:
    """Whether the run's synthetic slot holds generated images (``synthesize`` or imported), not
    the generator-free control (``augmented-copies``): what ``uses_synthetic`` says of a row."""
    return (run.state.synthetic_kind or "generated") != "augmented-copies"


def _frozen_synthetic_rows(run: Run, sets: dict[tuple, ArrayDataset], method: str, weight: float | None = None,
                           uses_synthetic: bool | None = None,
                           weights: dict[tuple, torch.Tensor] | None = None) -> list[dict]:
    """Frozen-feature rows with each (seed, K)'s extra set (synthetic images, or augmented copies)
    added to the episode supports and to the all-way support, each image weighted ``weight``
    (default ``eval.synthetic_weight``); ``uses_synthetic`` defaults to whether the run's
    synthetic slot holds generated images.

    Only the shot counts for which every seed has a set are evaluated.
    """
    from fewgen.evaluation.features import cached_features
    from fewgen.evaluation.protocol import ExtraSupport

    pb = run.state.backbone
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
    per_class = min(images_per_class(s) for s in sets.values())
    extra = ExtraSupport(feats, labels, weight=run.cfg.eval.synthetic_weight if weight is None else weight,
                         weights=weights, proto_share=run.cfg.eval.proto_share)
    uses = generated(run) if uses_synthetic is None else uses_synthetic
    return evaluate_frozen(run, novel_features(run), method, extra=extra, n_shots=n_shots,
                           extra_fields={"synthetic_per_class": per_class, "synthetic_weight": extra.weight,
                                         "proto_share": extra.proto_share,
                                         "n_synthetic": [len(s) for s in sets.values()],
                                         "uses_synthetic": uses and per_class > 0})


def frozen_synthetic(lc) -> bool:
    """Whether the learn step adds the frozen+synthetic rows: ``learner.frozen_synthetic`` where it
    applies, with ``learner.model=backbone`` (they are the pretrained backbone's frozen classifiers)."""
    return lc.frozen_synthetic and lc.model == "backbone"


def uses_synthetic(lc) -> bool:
    """Whether the learn step reads the synthetic slot: a method that trains on generated images, a
    sweep point above zero, or the frozen+synthetic rows."""
    return any(s.uses_synthetic for s in method_specs(lc)) or any(m > 0 for m in lc.sweep) or frozen_synthetic(lc)


def _learn_needs(cfg) -> tuple[str, ...]:
    lc = cfg.learner
    return (*(("backbone",) if lc.model == "backbone" else ()), *(("synthetic",) if uses_synthetic(lc) else ()))


def seed_synthetic(run: Run, ctx: SeedContext, required: bool) -> tuple[ArrayDataset | None, ArrayDataset | None]:
    """The synthetic set of ``ctx``'s (seed, K) as made (None without one), and as the methods use
    it: ranked by the pretrained backbone and kept (``learner.synthetic_keep``), then the first
    ``learner.synthetic_per_class`` per class."""
    lc = run.cfg.learner
    syn_all = synthetic_set(run, ctx.seed, ctx.n_shot, required=required)
    if syn_all is not None and len(syn_all) and lc.synthetic_keep < 1:  # learner.model=backbone (app.checks)
        own = shot_classifier(run.state.backbone.backbone, ctx.real, syn_all, run.data.novel.num_classes,
                              run.cfg.eval.logreg_c, run.cfg.eval.logreg_iters,
                              run.device)[2].gather(1, syn_all.labels[:, None])[:, 0]
        syn_all = keep_consistent(syn_all, own, lc.synthetic_keep)
    syn = first_per_class(syn_all, lc.synthetic_per_class) if syn_all is not None else None
    return syn_all, syn


def evaluate_finetuned(run: Run, results: Results, model, ctx: SeedContext, name: str, seconds: float,
                       syn: ArrayDataset | None, **fields) -> None:
    """Add a fine-tuned model's per-episode accuracies on ``ctx``'s episodes (every N of eval.n_ways,
    each of learner.eval_with) to ``results``."""
    cfg = run.cfg
    episodes = [run.episodes(n_way, ctx.n_shot, ctx.seed) for n_way in cfg.eval.n_ways]
    accs = finetuned_episode_accuracies(model, run.data.novel, episodes, cfg.learner.eval_with,
                                        _classifier_kwargs(run), run.device)
    for clf, per_set in accs.items():
        for n_way, acc in zip(cfg.eval.n_ways, per_set):
            results.add(name, clf, n_way, ctx.n_shot, acc, seconds, len(syn) if syn is not None else 0,
                        images_per_class(syn), **fields)


def train_methods(run: Run, results: Results, ctx: SeedContext, syn: ArrayDataset | None) -> dict[str, dict]:
    """Fine-tune and evaluate every learner method on ``ctx``'s (seed, K); their training curves."""
    histories = {}
    for spec in method_specs(run.cfg.learner):
        model, history, seconds = train_one(ctx, spec, syn)
        histories[f"{spec.name}/seed{ctx.seed}/{ctx.n_shot}shot"] = {
            "method": spec.name, "seed": ctx.seed, "n_shot": ctx.n_shot, "history": history}
        evaluate_finetuned(run, results, model, ctx, spec.name, seconds, syn if spec.uses_synthetic else None,
                           uses_synthetic=spec.uses_synthetic and generated(run))
    return histories


def train_sweep(run: Run, results: Results, ctx: SeedContext, syn_all: ArrayDataset | None) -> dict[int, ArrayDataset]:
    """The sweep over synthetic images per class (``learner.sweep``) on ``ctx``'s (seed, K): each
    point fine-tuned with ``learner.sweep_method`` (unless ``frozen``) and evaluated; returns the
    subsets by point, for the frozen rows."""
    lc = run.cfg.learner
    subsets = {}
    for m in lc.sweep:
        sub = first_per_class(syn_all, m) if syn_all is not None else None
        if m > 0 and (sub is None or images_per_class(sub) < m):
            run.log(f"sweep: skipping {m} synthetic images per class (the synthetic set has "
                    f"{images_per_class(syn_all)} per class); raise the synthesis count to include it")
            continue
        if lc.sweep_method != "frozen":  # fine-tune at each point; "frozen": the frozen rows only
            spec = MethodSpec("real-only", "real-only") if m == 0 else sweep_spec(lc)
            model, _, seconds = train_one(ctx, spec, sub if m > 0 else None)
            evaluate_finetuned(run, results, model, ctx, f"{lc.sweep_method}@{m}", seconds, sub if m > 0 else None,
                               sweep=True, uses_synthetic=m > 0 and generated(run))
        if sub is not None:
            subsets[m] = sub
    return subsets


def frozen_rows(run: Run, used_sets: dict[tuple, ArrayDataset], sweep_sets: dict[int, dict[tuple, ArrayDataset]]):
    """The pretrained backbone's frozen-classifier rows with extra supports: + the synthetic images
    the methods used, + augmented copies (the generator-free control), + both, and each sweep point."""
    lc, cfg = run.cfg.learner, run.cfg
    rows = []
    if frozen_synthetic(lc) and used_sets:
        rows += _frozen_synthetic_rows(run, used_sets, "frozen+synthetic")
    if lc.augmented_control:  # the generator-free control on the same episodes
        copies = {(s, k): augmented_copies(few_shot_set(run.data.novel, k, s), lc.augmented_copies_per_class, s)
                  for k in cfg.eval.n_shots for s in cfg.seeds}
        rows += _frozen_synthetic_rows(run, copies, "frozen+augmented-copies", run.cfg.eval.augmented_weight, False)
        if frozen_synthetic(lc) and used_sets:  # both at once: does the generator add what copies do not?
            both = {key: ArrayDataset.concat([copies[key], syn], name=f"{syn.name}+copies")
                    for key, syn in used_sets.items()}
            weights = {key: torch.cat([torch.full((len(copies[key]),), run.cfg.eval.augmented_weight),
                                       torch.full((len(syn),), run.cfg.eval.synthetic_weight)])
                       for key, syn in used_sets.items()}
            rows += _frozen_synthetic_rows(run, both, "frozen+synthetic+copies", weights=weights)
    if frozen_synthetic(lc):
        for m, sets in sorted(sweep_sets.items()):
            for row in _frozen_synthetic_rows(run, sets, f"frozen+synthetic@{m}"):
                row["sweep"] = True
                rows.append(row)
    return rows


@step("learn", needs=_learn_needs, makes=("learn_histories",))
def step_learn(run: Run) -> None:
    """Fine-tune and evaluate every learner method (module docstring) for each seed and K, then the
    frozen rows with extra supports."""
    cfg, lc = run.cfg, run.cfg.learner
    if lc.frozen_synthetic and not frozen_synthetic(lc):
        run.log("learner.frozen_synthetic applies to learner.model=backbone (the pretrained backbone's frozen "
                "classifiers): no frozen+synthetic rows with learner.model=clip")
    torch.set_grad_enabled(True)
    required = uses_synthetic(lc)
    results, histories, diagnostics = Results(), {}, {}
    used_sets: dict[tuple, ArrayDataset] = {}
    sweep_sets: dict[int, dict[tuple, ArrayDataset]] = {}
    for n_shot in cfg.eval.n_shots:
        for seed in cfg.seeds:
            ctx = SeedContext(run, seed, n_shot, None)
            syn_all, syn = seed_synthetic(run, ctx, required)
            ctx.synthetic = syn
            if syn is not None:
                used_sets[(seed, n_shot)] = syn
            if syn is not None and len(syn) and lc.model == "backbone":
                diagnostics[f"seed{seed}_{n_shot}shot"] = d = synthetic_diagnostics(
                    run.state.backbone.backbone, ctx.real, syn, run.data.novel.num_classes, cfg.eval.logreg_c,
                    cfg.eval.logreg_iters, lc.mmd_bandwidths, run.device)
                run.log(f"synthetic set seed {seed} {n_shot}-shot: " + ", ".join(f"{k} {v}" for k, v in d.items()))
            histories.update(train_methods(run, results, ctx, syn))
            if n_shot in lc.sweep_shots:
                for m, sub in train_sweep(run, results, ctx, syn_all).items():
                    sweep_sets.setdefault(m, {})[(seed, n_shot)] = sub
    run.add_rows(results.rows(run) + frozen_rows(run, used_sets, sweep_sets))
    run.state.learn_histories = histories
    if run.dir is not None:
        write_json(run.dir / "learn_history.json", histories)
        if diagnostics:
            write_json(run.dir / "synthetic_diagnostics.json", diagnostics)


def sweep_spec(lc) -> MethodSpec:
    """The method the sweep trains at m > 0 synthetic images per class (no ablations)."""
    return method_specs(dataclasses.replace(lc, methods=[lc.sweep_method], ablations=[]))[0]


@step("augmented-copies", makes=("synthetic",))
def step_augmented_copies(run: Run) -> None:
    """Fill ``run.state.synthetic`` with augmented copies of each seed's real shots
    (``learner.augmented_copies_per_class`` per class): the generator-free control."""
    m = run.cfg.learner.augmented_copies_per_class
    for n_shot in run.cfg.eval.n_shots:
        for seed in run.cfg.seeds:
            run.state.synthetic[(seed, n_shot)] = augmented_copies(few_shot_set(run.data.novel, n_shot, seed), m, seed)
    run.state.synthetic_source = f"augmented copies of the real shots ({m} per class, random affine)"
    run.state.synthetic_kind = "augmented-copies"
    run.log(f"synthetic set: {run.state.synthetic_source}")


@step("import-synthetic", makes=("synthetic",))
def step_import_synthetic(run: Run) -> None:
    """Fill ``run.state.synthetic`` with images made elsewhere (``synthesis.import_dir``),
    the same set for every seed and K: e.g. a GPU's Stable Diffusion output, or real images of
    the classes from another source as an upper bound on what a generator could give."""
    sc = run.cfg.synthesis  # synthesis.import_dir is a folder: fewgen.app.checks
    syn = import_synthetic(sc.import_dir, run.data.novel, sc.synthetic_per_class)
    for n_shot in run.cfg.eval.n_shots:
        for seed in run.cfg.seeds:
            run.state.synthetic[(seed, n_shot)] = syn
    run.state.synthetic_source = f"imported from {sc.import_dir} ({sc.synthetic_per_class} per class)"
    run.state.synthetic_kind = "imported"
    run.log(f"synthetic set: {run.state.synthetic_source}")


