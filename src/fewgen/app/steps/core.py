"""The core steps: ``pretrain`` (the base-class backbone, through the cache) and ``evaluate`` (the
frozen-feature classifiers on the run's episodes and the all-way problem), with the frozen
evaluation the other steps reuse (:func:`evaluate_frozen`)."""

from __future__ import annotations

import torch

from fewgen.app.runner import Run, step
from fewgen.utils import write_json


@step("pretrain", makes=("backbone",))
def step_pretrain(run: Run) -> None:
    from fewgen.pretrain import pretrain_backbone

    pb = pretrain_backbone(run.cfg.backbone, run.cfg.pretrain, run.data, run.cache, run.device, run.log, run.progress,
                           log_dir=tensorboard_dir(run, "pretrain"))
    run.state.backbone = pb
    if run.dir is not None:
        write_json(run.dir / "pretrain_history.json",
                   {"history": pb.history, "best_epoch": pb.best_epoch, "best_val": pb.best_val, "cache_key": pb.key})
        if pb.path.is_file():  # a frozen pretrained backbone's path is its model folder: never copied
            copy_into_run(pb.path, run.dir / "checkpoints" / "backbone.safetensors")


def tensorboard_dir(run: Run, *parts: str):
    """The folder a training loop of this run writes its TensorBoard events to,
    ``<run>/tensorboard/<parts...>`` (``tensorboard --logdir <run>/tensorboard`` shows them all);
    None for a run without a folder."""
    return None if run.dir is None else run.dir.joinpath("tensorboard", *parts)


def copy_into_run(src, dst) -> None:
    """A run's own copy of a cached file (a hard link where the file system allows, else a copy), so
    the run keeps it when the cache is cleared."""
    import os
    import shutil

    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def novel_features(run: Run) -> torch.Tensor:
    from fewgen.evaluation.features import cached_features

    pb = run.state.backbone
    return cached_features(run.cache, pb.key, pb.backbone, run.data.novel, run.device, run.log)


def evaluate_frozen(run: Run, features: torch.Tensor, method: str, extra=None, extra_fields=None,
                    n_shots: list[int] | None = None) -> list[dict]:
    """Rows for every (classifier, N, K) and all-way, on the run's shared episodes.

    ``extra``: an :class:`~fewgen.evaluation.protocol.ExtraSupport` (synthetic images added to
    every support, weighted), or None. ``extra_fields`` go into every row (``uses_synthetic``
    among them; False by default). ``n_shots``: the K evaluated (default ``eval.n_shots``)."""
    from fewgen.data.fewshot import all_way_split
    from fewgen.evaluation.protocol import all_way_accuracy, episode_accuracies, summary_row

    cfg, novel = run.cfg, run.data.novel
    n_shots = cfg.eval.n_shots if n_shots is None else n_shots
    n_classes = novel.num_classes
    kw = {"logreg": {"c": cfg.eval.logreg_c, "max_iter": cfg.eval.logreg_iters}}
    fields = {"uses_synthetic": False, **(extra_fields or {})}
    rows = []
    bar = None
    if run.progress:
        from tqdm.auto import tqdm

        total = len(cfg.eval.classifiers) * len(cfg.eval.n_ways) * len(n_shots) * len(cfg.seeds)
        bar = tqdm(total=total, desc=f"evaluate {method}", leave=False)
    for clf in cfg.eval.classifiers:
        for n_way in cfg.eval.n_ways:
            for n_shot in n_shots:
                per_seed = []
                for seed in cfg.seeds:
                    if bar is not None:
                        bar.update()
                    ep = run.episodes(n_way, n_shot, seed)
                    es = None if extra is None else \
                        (lambda classes, s=seed, k=n_shot, c=clf: extra.for_episodes(classes, s, k, n_classes, c))
                    per_seed.append(episode_accuracies(features, ep, clf, classifier_kwargs=kw.get(clf), extra_support=es))
                rows.append(summary_row(method, n_way, n_shot, per_seed, cfg.seeds, classifier=clf,
                                        n_query=cfg.eval.n_query, **fields))
        if cfg.eval.all_way:
            for n_shot in n_shots:
                correct = []
                for seed in cfg.seeds:
                    sup, qry = all_way_split(novel, n_shot, seed)
                    more = None if extra is None else extra.for_all_way(seed, n_shot, n_classes, clf)
                    correct.append(all_way_accuracy(features, novel.labels, sup, qry, clf, kw.get(clf), extra=more))
                row = summary_row(method, n_classes, n_shot, correct, cfg.seeds, classifier=clf, all_way=True, **fields)
                row["queries"], row["episodes"] = row["episodes"], len(cfg.seeds)
                row["seed_accuracies"] = [round(float(c.mean()) * 100, 3) for c in correct]
                rows.append(row)
    if bar is not None:
        bar.close()
    return rows


@step("evaluate", needs=("backbone",))
def step_evaluate(run: Run) -> None:
    from fewgen.backbones.pretrained import is_pretrained

    feats = novel_features(run)
    # rows name how the backbone was made: its pretraining recipe, or the frozen pretrained model (clip, dinov2)
    b = run.cfg.backbone
    rows = evaluate_frozen(run, feats, method=b.name if is_pretrained(b.name) else run.cfg.pretrain.recipe)
    if run.cfg.eval.zero_shot and b.name == "clip":
        rows += zero_shot_rows(run, feats)
    run.add_rows(rows)


def zero_shot_rows(run: Run, features: torch.Tensor) -> list[dict]:
    """CLIP's zero-shot rows (``clip-zero-shot``, classifier ``prompts``) on the run's episodes and the
    all-way queries: the queries of each setting classified by their nearest class prompt."""
    import json

    from fewgen.data.fewshot import all_way_split
    from fewgen.evaluation.protocol import summary_row, zero_shot_accuracies, zero_shot_all_way
    from fewgen.learners.clip import zero_shot_weights

    cfg, novel, pb = run.cfg, run.data.novel, run.state.backbone
    folder = getattr(pb.backbone, "folder", None)
    try:
        model_type = json.loads((folder / "config.json").read_text()).get("model_type") if folder else None
    except (OSError, ValueError):
        model_type = None
    if model_type != "clip":
        run.log(f"zero-shot rows skipped: {cfg.backbone.model} is an image tower without CLIP's text tower "
                "(eval.zero_shot needs a CLIPModel folder or hub id)")
        return []
    weights = zero_shot_weights(folder, list(novel.class_names), cfg.eval.prompt)
    fields = {"uses_synthetic": False, "prompt": cfg.eval.prompt}
    rows = []
    for n_way in cfg.eval.n_ways:
        for n_shot in cfg.eval.n_shots:
            accs = [zero_shot_accuracies(features, weights, run.episodes(n_way, n_shot, seed)) for seed in cfg.seeds]
            rows.append(summary_row("clip-zero-shot", n_way, n_shot, accs, cfg.seeds, classifier="prompts",
                                    n_query=cfg.eval.n_query, **fields))
    if cfg.eval.all_way:
        for n_shot in cfg.eval.n_shots:
            correct = [zero_shot_all_way(features, novel.labels, weights, all_way_split(novel, n_shot, seed)[1])
                       for seed in cfg.seeds]
            row = summary_row("clip-zero-shot", novel.num_classes, n_shot, correct, cfg.seeds, classifier="prompts",
                              all_way=True, **fields)
            row["queries"], row["episodes"] = row["episodes"], len(cfg.seeds)
            rows.append(row)
    run.log(f"zero-shot: {len(rows)} rows from the class prompts {cfg.eval.prompt!r}")
    return rows
