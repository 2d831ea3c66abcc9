"""The ``export`` step: ``<run>/classifier/``, a classifier of every novel class that needs neither
the run nor the cache (``fewgen.classifier``; ``fewgen predict``)."""

from __future__ import annotations

import dataclasses

import torch

from fewgen.app.runner import Run, step
from fewgen.app.steps.learn import generated
from fewgen.data.base import ArrayDataset
from fewgen.data.fewshot import few_shot_set
from fewgen.learners.synthetic import augmented_copies


@step("export", needs=("backbone",), makes=("classifier",))
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
    n_shot = max(cfg.eval.n_shots) if ec.n_shot is None else ec.n_shot
    seed = cfg.seeds[0] if ec.seed is None else ec.seed  # among eval.n_shots and seeds: fewgen.app.checks
    pb, novel, lc = run.state.backbone, run.data.novel, cfg.learner
    shots = few_shot_set(novel, n_shot, seed)
    parts, weights = [], []  # in the order of the learn step's rows: copies, then generated images
    if "copies" in ec.extra:
        copies = augmented_copies(shots, lc.augmented_copies_per_class, seed)
        parts.append(copies)
        weights.append(torch.full((len(copies),), lc.augmented_weight))
    syn = run.state.synthetic.get((seed, n_shot)) if "synthetic" in ec.extra else None
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
                             weights={(seed, n_shot): w}, proto_share=lc.proto_share
                             ).for_all_way(seed, n_shot, novel.num_classes, ec.head)
    info = {"fit": {"n_shot": n_shot, "seed": seed, "shots": len(shots), "extra": ec.extra,
                    "synthetic": 0 if syn is None else len(syn),
                    "copies": lc.augmented_copies_per_class * novel.num_classes if "copies" in ec.extra else 0,
                    "synthetic_weight": lc.synthetic_weight, "copies_weight": lc.augmented_weight,
                    "proto_share": lc.proto_share,
                    "uses_synthetic": uses_synthetic},
            "novel": run.data.protocol, "run": cfg.name}
    arch = (pb.backbone.spec() if hasattr(pb.backbone, "spec")  # a frozen pretrained model: named, not copied
            else {"name": cfg.backbone.name, "kwargs": dict(cfg.backbone.kwargs)})
    clf = fit_classifier(pb.backbone, arch, shots.images,
                         shots.labels, list(novel.class_names), ec.head, cfg.eval.logreg_c, cfg.eval.logreg_iters,
                         extra=extra, info=info)
    queries = len(novel) - len(shots)
    if queries > 0:  # the same images the all-way evaluation classifies
        from fewgen.data.fewshot import all_way_split

        _, qry = all_way_split(novel, n_shot, seed)
        feats = cached_features(run.cache, pb.key, pb.backbone, novel, run.device, run.log)[qry]
        pred = clf._head().predict(feats[None])[0]
        correct = int((pred == novel.labels[qry]).sum())
        clf.info["all_way"] = {"queries": int(len(qry)), "correct": correct,
                               "accuracy": round(100 * correct / len(qry), 3)}
    else:  # no query images (fewgen fit): leave one shot out at a time, with the head alone
        from fewgen.evaluation.protocol import leave_one_out_accuracy, mean_ci95

        feats = cached_features(run.cache, pb.key, pb.backbone, shots, run.device, run.log)
        kw = {"c": cfg.eval.logreg_c, "max_iter": cfg.eval.logreg_iters} if ec.head == "logreg" else {}
        ok = leave_one_out_accuracy(feats, shots.labels, novel.num_classes, ec.head, kw)
        if len(ok):
            mean, half = mean_ci95(ok.numpy() * 100)
            clf.info["leave_one_out"] = {"shots": int(len(ok)), "correct": int(ok.sum()), "accuracy": round(mean, 3),
                                         "ci95": None if half != half else round(half, 3),
                                         "note": "each shot classified by the head fitted on the other shots "
                                                 "(no generated images or copies); classes with one shot left out"}
    if run.dir is not None:
        folder = clf.save(run.dir / "classifier", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
        acc, loo = clf.info.get("all_way"), clf.info.get("leave_one_out")
        run.log(f"classifier ({ec.head}, {novel.num_classes} classes, {len(shots)} shots"
                f"{f' + {len(extra[0])} more ({ec.extra})' if extra is not None else ''}) in {folder.name}/"
                + (f"; {acc['correct']} of the other {acc['queries']} novel images right ({acc['accuracy']:.3f}%)" if acc else "")
                + (f"; estimate from the shots alone (leave one out): {loo['accuracy']:.2f}%"
                   + (f" +- {loo['ci95']:.2f}" if loo["ci95"] is not None else "")
                   + f" ({loo['correct']}/{loo['shots']} shots)" if loo else ""))
    run.state.classifier = clf
