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
    from fewgen.classifier import fit_classifier
    from fewgen.evaluation.features import cached_features
    from fewgen.evaluation.protocol import ExtraSupport

    cfg, ec = run.cfg, run.cfg.export
    n_shot = max(cfg.eval.n_shots) if ec.n_shot is None else ec.n_shot
    seed = cfg.seeds[0] if ec.seed is None else ec.seed  # among eval.n_shots and seeds: fewgen.app.checks
    pb, novel, lc = run.state.backbone, run.data.novel, cfg.learner
    shots = few_shot_set(novel, n_shot, seed)
    if ec.model == "learner":
        clf, queries = export_learner(run, shots, n_shot, seed), len(novel) - len(shots)
        if queries > 0:
            from fewgen.data.fewshot import all_way_split

            _, qry = all_way_split(novel, n_shot, seed)
            pred = clf.predict_proba(novel.images[qry]).argmax(1)
            correct = int((pred == novel.labels[qry]).sum())
            clf.info["all_way"] = {"queries": int(len(qry)), "correct": correct,
                                   "accuracy": round(100 * correct / len(qry), 3)}
        _save(run, clf, f"fine-tuned CLIP + LoRA ({ec.method}), {novel.num_classes} classes, {len(shots)} shots")
        return
    parts, weights = [], []  # in the order of the learn step's rows: copies, then generated images
    if "copies" in ec.extra:
        copies = augmented_copies(shots, lc.augmented_copies_per_class, seed)
        parts.append(copies)
        weights.append(torch.full((len(copies),), run.cfg.eval.augmented_weight))
    syn = run.state.synthetic.get((seed, n_shot)) if "synthetic" in ec.extra else None
    if syn is not None and len(syn):
        parts.append(syn)
        weights.append(torch.full((len(syn),), run.cfg.eval.synthetic_weight))
    extra = None
    uses_synthetic = syn is not None and len(syn) > 0 and generated(run)
    if parts:
        more = ArrayDataset.concat(parts, name=f"{shots.name}+extra") if len(parts) > 1 else parts[0]
        feats = cached_features(run.cache, pb.key, pb.backbone, more, run.device, run.log)
        w = torch.cat(weights)
        extra = ExtraSupport({(seed, n_shot): feats}, {(seed, n_shot): more.labels},
                             weights={(seed, n_shot): w}, proto_share=run.cfg.eval.proto_share
                             ).for_all_way(seed, n_shot, novel.num_classes, ec.head)
    info = {"fit": {"n_shot": n_shot, "seed": seed, "shots": len(shots), "extra": ec.extra,
                    "synthetic": 0 if syn is None else len(syn),
                    "copies": lc.augmented_copies_per_class * novel.num_classes if "copies" in ec.extra else 0,
                    "synthetic_weight": run.cfg.eval.synthetic_weight, "copies_weight": run.cfg.eval.augmented_weight,
                    "proto_share": run.cfg.eval.proto_share,
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
    _save(run, clf, f"{ec.head}, {novel.num_classes} classes, {len(shots)} shots"
          f"{f' + {len(extra[0])} more ({ec.extra})' if extra is not None else ''}")


def _save(run: Run, clf, what: str) -> None:
    """Write ``<run>/classifier/`` and log what it is and how well it did."""
    import yaml

    if run.dir is not None:
        folder = clf.save(run.dir / "classifier", yaml.safe_dump(dataclasses.asdict(run.cfg), sort_keys=False))
        acc, loo = clf.info.get("all_way"), clf.info.get("leave_one_out")
        run.log(f"classifier ({what}) in {folder.name}/"
                + (f"; {acc['correct']} of the other {acc['queries']} novel images right ({acc['accuracy']:.3f}%)" if acc else "")
                + (f"; estimate from the shots alone (leave one out): {loo['accuracy']:.2f}%"
                   + (f" +- {loo['ci95']:.2f}" if loo["ci95"] is not None else "")
                   + f" ({loo['correct']}/{loo['shots']} shots)" if loo else ""))
    run.state.classifier = clf


def export_learner(run: Run, shots: ArrayDataset, n_shot: int, seed: int):
    """The CLIP + LoRA learner (``learner.model=clip``) trained with ``export.method`` on the export
    shots (and, for a method that uses them, the run's generated images of those shots), as a
    classifier: the LoRA matrices of its image tower over the base CLIP (by folder or hub id and
    content digest) and its class-prompt head as cosine prototypes at CLIP's logit scale, so the
    exported probabilities are the learner's ``softmax(s * cos(image, class))``."""
    import torch.nn.functional as F

    from fewgen.app.steps.learn import SeedContext, synthetic_set, train_one
    from fewgen.backbones.pretrained import clip_lora_from_learner
    from fewgen.classifier import FewgenClassifier
    from fewgen.learners.registry import method_specs

    cfg, lc, ec = run.cfg, run.cfg.learner, run.cfg.export
    spec = next(s for s in method_specs(lc) if s.name == ec.method)  # among learner.methods: fewgen.app.checks
    syn = synthetic_set(run, seed, n_shot, spec.uses_synthetic) if spec.uses_synthetic else None
    ctx = SeedContext(run, seed, n_shot, syn)  # its shots are few_shot_set(novel, n_shot, seed): these
    model, _, seconds = train_one(ctx, spec, syn)
    model = model.cpu().eval()
    with torch.no_grad():
        weights = F.normalize(model.head.class_weights().detach().float(), dim=-1)
    dtype = cfg.backbone.dtype if cfg.backbone.name == "clip" else "float32"
    backbone = clip_lora_from_learner(model, lc.clip_path, dtype)
    info = {"backbone": backbone.spec(),
            "fit": {"n_shot": n_shot, "seed": seed, "shots": len(shots), "method": spec.name,
                    "synthetic": 0 if syn is None else len(syn), "uses_synthetic": syn is not None and len(syn) > 0,
                    "steps": lc.steps, "prompt": lc.clip_prompt, "train_seconds": seconds},
            "novel": run.data.protocol, "run": cfg.name}
    return FewgenClassifier(backbone.eval(), "proto", {"prototypes": weights.contiguous()}, list(shots.class_names),
                            tuple(shots.image_shape), info, temperature=float(model.head.scale))
