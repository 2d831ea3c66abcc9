"""Do generated images move each class's prototype toward its class centre? (issue 27)

Frozen Conv-4 of the ``omniglot`` preset (pretrained on the base characters), 1-shot cosine
prototypes on the validation (or novel) characters of the development split. Every row is scored
on the same episodes (the same shots and queries) and reported as its paired difference against
the shot-only prototype, with the 95% CI of the per-episode (all-way: per-query) difference.

Rows, each prototype ``normalize((1 - s) * shot + s * mean(extra))`` over L2-normalised features:

* shot only; a second real shot (the upper bound, s = 0.5);
* + affine copies of the shot (``augmented_copies``), at equal weight and at shares s;
* feature references (not images): Distribution-Calibration-like shift to the 2 nearest base-class
  means, and an E[f(x2) | f(x1)] regressor (a small MLP trained by MSE on pairs of base drawings);
* + steered redrawings (``fewgen.generators.steered``): of POOL random affine redrawings of each
  shot, the M whose mean feature (train backbone) is nearest the regressor's prediction, and as a
  control the first M of the same pool unsteered;
* + images of the deformation generator (``fewgen.generators.deform``) trained through the
  prototype loss on base episodes, scored through the backbone it was trained with (seed 0) and
  through an independently trained backbone it never saw (``pretrain.seed=1``);
* + images of the fusion generator (``fewgen.generators.fusion``, ``--generators fusion:...``): the
  shot fused patch-wise with drawings of its nearest base classes, trained the same way.

``cos->centre`` is the mean cosine of each prototype with its class centre (the normalised mean
feature of the class's drawings other than its two shots): what a generator has to raise.

Each row is also paired against the best real-only row chosen on val (``--reference``, the affine
copies at s=0.25), the comparison issue 27's targets are stated in.

    FEWGEN_CACHE=/tmp/i27/cache python benchmarks/bench_centre_shift.py --split val \\
        --generators --steer affine:100:10 --shares 0.25 0.5 0.75
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def log(s: str) -> None:
    print(s, flush=True)


def parse_spec(spec: str):
    """``"max_shift=0.4,proto_share=0.75"`` -> DeformOptions with those fields changed;
    ``"fusion:neighbours=1,steps=800"`` -> FusionOptions so."""
    from fewgen.generators.deform import DeformOptions
    from fewgen.generators.fusion import FusionOptions

    family, _, fields = spec.rpartition(":")
    families = {"": DeformOptions, "deform": DeformOptions, "fusion": FusionOptions}
    if family not in families:
        raise SystemExit(f"unknown generator family {family!r} in {spec!r}; families: deform (the default), fusion")
    o = families[family]()
    types = {f.name: type(getattr(o, f.name)) for f in dataclasses.fields(o)}
    for item in filter(None, fields.split(",")):
        k, v = item.split("=", 1)
        if k not in types:
            raise SystemExit(f"unknown {type(o).__name__} field {k!r}; fields: {', '.join(types)}")
        setattr(o, k, v.lower() in ("1", "true") if types[k] is bool else types[k](v))
    return o


def generator_class(o):
    from fewgen.generators.deform import DeformGenerator, DeformOptions
    from fewgen.generators.fusion import FusionGenerator

    return DeformGenerator if type(o) is DeformOptions else FusionGenerator


def load_backbones(specs: list[tuple[str, list[str]]], data, cache) -> dict:
    """Each (name, overrides) of ``specs``: the omniglot preset's backbone with those overrides,
    pretrained on ``data``'s base classes through ``cache`` (or loaded from it), by name."""
    from fewgen.app.config import load_config
    from fewgen.pretrain import pretrain_backbone

    backbones = {}
    for name, overrides in specs:
        cfg = load_config("omniglot", list(overrides))
        pb = pretrain_backbone(cfg.backbone, cfg.pretrain, data, cache, "cpu", log, progress=False)
        backbones[name] = pb
        log(f"backbone {name} ({', '.join(overrides)}): {pb.key}, best val {pb.best_val:.2f}")
    return backbones


def trained_generator(o, spec: str, pb, data, cache):
    """The generator of options ``o`` (deformation or fusion) trained through backbone ``pb`` on the
    base classes, from the artifact cache (keyed by the options, the backbone and the base content) or
    trained there (resumable from its training state)."""
    cls = generator_class(o)
    parts = {"options": dataclasses.asdict(o), "backbone": pb.key, "base": data.base.digest()}
    entry = cache.entry(f"{cls.family}-generators", parts)
    if cache.ready(entry, log):
        log(f"{cls.family} generator {spec!r} from cache {entry}")
        gen = cls.load(entry / "generator.safetensors")
        if cls.family == "fusion":
            gen.prepare(pb.backbone.eval(), data.base)
        return gen
    gen = cls(data.base.image_shape[0], o)
    gen.fit(pb.backbone, data.base, checkpoint=entry / "train-state.safetensors", log=log)
    gen.save(entry / "generator.safetensors")
    cache.mark_done(entry, {"spec": spec}, files=["generator.safetensors"])
    return gen


def prototypes(shot: torch.Tensor, extra: torch.Tensor | None = None, share: float = 0.0) -> torch.Tensor:
    """Cosine prototypes (C, D) from shot features (C, D) and extra features (C, m, D)."""
    p = F.normalize(shot, dim=-1)
    if extra is not None:
        p = (1 - share) * p + share * F.normalize(extra, dim=-1).mean(1)
    return F.normalize(p, dim=-1)


def episode_acc(protos: torch.Tensor, feats: torch.Tensor, episodes) -> torch.Tensor:
    """Per-episode accuracy (E,) of class prototypes (C, D) on the episodes' queries."""
    e, n, q = episodes.query.shape
    queries = F.normalize(feats[episodes.query.reshape(e, -1)], dim=-1)
    pred = (queries @ protos[episodes.classes].transpose(1, 2)).argmax(-1)
    return (pred == torch.arange(n).repeat_interleave(q)).double().mean(1)


def all_way_correct(protos: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor, query_idx: torch.Tensor):
    return ((F.normalize(feats[query_idx], dim=-1) @ protos.T).argmax(-1) == labels[query_idx]).double()


def train_regressor(base_feats: torch.Tensor, base_labels: torch.Tensor, seed: int = 0):
    """E[f(x2) | f(x1)] on normalised base features (``fewgen.generators.steered``), as a function."""
    from fewgen.generators.steered import SteeredOptions, train_centre_regressor

    reg, _ = train_centre_regressor(base_feats, base_labels, SteeredOptions(seed=seed))
    return lambda z: F.normalize(reg(z), dim=-1).detach()


def paired(values: torch.Tensor, reference: torch.Tensor) -> tuple[float, float]:
    from fewgen.evaluation.protocol import mean_ci95

    m, h = mean_ci95((values - reference).numpy() * 100)
    return m, h


def save_grid(path: Path, shots: torch.Tensor, generated: torch.Tensor, second: torch.Tensor, per_row: int) -> None:
    """A PNG: per class, its shot, ``per_row`` generated images, then its second real drawing."""
    from PIL import Image

    rows = []
    for c in range(len(shots)):
        cells = [shots[c], *generated[c, :per_row], second[c]]
        rows.append(torch.cat([torch.nn.functional.pad(x[0], (1, 1, 1, 1), value=128) for x in cells], 1))
    Image.fromarray(torch.cat(rows, 0).numpy()).resize((rows[0].shape[1] * 3, len(rows) * rows[0].shape[0] * 3),
                                                       Image.NEAREST).save(path)


def score_draw(a, seed: int, split, data, backbones: dict, deformers: list, generators: list | None,
               scores: dict) -> tuple:
    """Score every row on the shot draw and episodes of few-shot seed ``seed``, appending each row's
    per-episode and per-query accuracies to ``scores``; returns this draw's shots and images (grids)."""
    from fewgen.data.fewshot import all_way_split, few_shot_indices, sample_episodes
    from fewgen.evaluation.features import extract_features
    from fewgen.learners.synthetic import augmented_copies

    # 2 shots per class: the first is the shot, the second the upper bound; queries exclude both
    shots2 = few_shot_indices(split, 2, seed)
    shot_idx, second_idx = shots2[:, 0], shots2[:, 1]
    episodes = sample_episodes(split, a.n_way, 2, a.n_query, a.episodes, seed)
    _, all_query = all_way_split(split, 2, seed)
    n_classes = split.num_classes
    shot_set = split.subset(shot_idx, name=f"{split.name}/shots-s{seed}")
    copies = augmented_copies(shot_set, a.copies, seed)
    copy_table = torch.stack([(copies.labels == c).nonzero().squeeze(1) for c in range(n_classes)])

    generated_images: dict[str, torch.Tensor] = {}
    for spec, o, gen, train_s in deformers:
        m = max(a.per_shot)
        train_bb = backbones["train"].backbone.eval()
        images = gen.generate(split.images[shot_idx], m, seed=seed,
                              backbone=train_bb if gen.family == "fusion" else None)
        generated_images[spec] = images.view(n_classes, m, *images.shape[1:])
        if generators is not None:  # the generator's own figures, on the first draw
            untrained = type(gen)(data.base.image_shape[0], o)
            if gen.family == "fusion":
                untrained.prepare(train_bb, data.base)
            loss = gen.episode_loss(train_bb, split, 50, seed)
            loss0 = untrained.episode_loss(train_bb, split, 50, seed)
            change = (images.float() - split.images[shot_idx].repeat_interleave(m, 0).float()).abs().mean().item() / 255
            log(f"{gen.family} generator {spec!r}: {a.split} prototype loss {loss:.4f} (untrained: {loss0:.4f}); "
                f"mean pixel change {change:.3f}; {train_s:.0f} s")
            generators.append({"spec": spec, "options": dataclasses.asdict(o), "split_loss": loss,
                               "split_loss_untrained": loss0, "pixel_change": change, "train_s": round(train_s, 1),
                               "history_first100": float(np.mean(gen.history[:100])) if gen.history else None,
                               "history_last100": float(np.mean(gen.history[-100:])) if gen.history else None})

    steered: dict[str, torch.Tensor] = {}
    if a.steer:
        from fewgen.generators.steered import SteeredOptions, SteeredRedrawings, affine_pool

        bb = backbones["train"].backbone.eval()
        shots = split.images[shot_idx]
        for spec in a.steer:
            kind, pool_n, m, *rest = spec.split(":")
            mild = dict(degrees=15.0, translate=0.1, scale=(0.85, 1.15), shear=10.0) if kind == "copies" else {}
            target = "pixel+regressor" if rest[1:] == ["pixel"] else "regressor"
            # the pool and the predictors are seeded by the draw: each draw is also a generator run
            o = SteeredOptions(pool=int(pool_n), keep=int(m), seed=seed, regressors=int(rest[0]) if rest else 1,
                               target=target, **mild)
            steerer = SteeredRedrawings(o).fit(bb, data.base)
            steered[spec] = steerer.generate(bb, shots).view(n_classes, o.keep, *shots.shape[1:])
            steered[spec + " (unsteered)"] = affine_pool(shots, o)[:, :o.keep]
            log(f"seed {seed}: steered {spec}: kept {m} of {pool_n} per shot")

    for bname, pb in backbones.items():
        bb = pb.backbone.eval()
        feats = extract_features(bb, split)
        labels = split.labels
        shot, second = feats[shot_idx], feats[second_idx]
        centre_mask = torch.ones(len(split), dtype=torch.bool)
        centre_mask[shots2.reshape(-1)] = False
        centres = F.normalize(torch.stack([F.normalize(feats[(labels == c) & centre_mask], dim=-1).mean(0)
                                           for c in range(n_classes)]), dim=-1)
        copy_feats = extract_features(bb, copies.images)[copy_table]
        base_feats = extract_features(bb, data.base)

        candidates: list[tuple[str, str, torch.Tensor]] = [("shot only", "", prototypes(shot)),
                                                           ("second real shot", "s=0.5",
                                                            prototypes(shot, second[:, None], 0.5))]
        candidates.append((f"+ {a.copies} affine copies", "equal weights",
                           prototypes(shot, copy_feats, a.copies / (a.copies + 1))))
        candidates += [(f"+ {a.copies} affine copies", f"s={s}", prototypes(shot, copy_feats, s)) for s in a.shares]
        # feature references per backbone, fitted on its own base features
        base_means = F.normalize(torch.stack([F.normalize(base_feats[data.base.labels == c], dim=-1).mean(0)
                                              for c in range(data.base.num_classes)]), dim=-1)
        nearest = (F.normalize(shot, dim=-1) @ base_means.T).topk(2, dim=1).indices
        candidates += [("feature ref: DC-like 2 nearest base means", f"s={s}",
                        prototypes(shot, base_means[nearest], s)) for s in a.shares]
        regress = train_regressor(base_feats, data.base.labels, seed=seed)
        predicted = regress(shot)[:, None]
        candidates += [("feature ref: E[f2|f1] regressor", f"s={s}", prototypes(shot, predicted, s))
                       for s in a.shares]
        for spec, images in generated_images.items():
            gen_feats = extract_features(bb, images.reshape(-1, *images.shape[2:])).view(n_classes, images.shape[1], -1)
            family = "fusion" if spec.startswith("fusion:") else "deform"
            candidates += [(f"+ {family} [{spec}]", f"m={m} s={s}", prototypes(shot, gen_feats[:, :m], s))
                           for m in a.per_shot for s in a.shares]
        for spec, images in steered.items():
            st_feats = extract_features(bb, images.reshape(-1, *images.shape[2:])).view(n_classes, images.shape[1], -1)
            candidates += [(f"+ redrawings [{spec}]", f"s={s}", prototypes(shot, st_feats, s)) for s in a.shares]

        for row, setting, protos in candidates:
            scores.setdefault((bname, row, setting), []).append(
                (episode_acc(protos, feats, episodes), all_way_correct(protos, feats, labels, all_query),
                 (protos * centres).sum(1).mean().item()))
        log(f"seed {seed}, backbone {bname}: {len(candidates)} rows scored")
    return shot_idx, second_idx, generated_images, steered


def summarise(a, scores: dict, n_classes: int) -> list[dict]:
    """One row per (backbone, row, setting): accuracies over all draws, the paired difference against
    shot only and against the best real-only row (``--reference``) with the 95% CI of the per-episode
    (all-way: per-query) difference pooled over draws, and, with several draws, the 95% CI over the
    draws' mean differences (``*_draws``): the shots and the generators' seeds vary with the draw,
    which the per-episode CI of one draw does not see."""
    best_row, best_setting = a.reference.format(copies=a.copies).split("|")
    rows = []
    for bname in dict.fromkeys(b for b, _, _ in scores):
        mine = {(r, s): v for (b, r, s), v in scores.items() if b == bname}
        ref = mine[("shot only", "")]
        if (best_row, best_setting) not in mine:
            raise SystemExit(f"--reference {a.reference!r} names no row")
        best = mine[(best_row, best_setting)]
        for (row, setting), per_draw in mine.items():
            out = {"backbone": bname, "row": row, "setting": setting, "draws": len(per_draw),
                   f"acc_{a.n_way}way": round(torch.cat([e for e, _, _ in per_draw]).mean().item() * 100, 2),
                   "acc_allway": round(torch.cat([w for _, w, _ in per_draw]).mean().item() * 100, 2),
                   "cos_centre": round(float(np.mean([c for _, _, c in per_draw])), 4)}
            for tag, against in (("diff", ref), ("vs_best_real", best)):
                for i, way in ((0, f"{a.n_way}way"), (1, "allway")):
                    d, h = paired(torch.cat([x[i] for x in per_draw]), torch.cat([y[i] for y in against]))
                    out[f"{tag}_{way}"], out[f"{tag}_ci95_{way}" if tag != "diff" else f"ci95_{way}"] = round(d, 3), round(h, 3)
                    if len(per_draw) > 1:
                        from fewgen.evaluation.protocol import mean_ci95

                        _, hd = mean_ci95([(x[i].mean() - y[i].mean()).item() * 100
                                           for x, y in zip(per_draw, against, strict=True)])
                        out[f"{tag}_ci95_draws_{way}"] = round(hd, 3)
            rows.append(out)
    return rows



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("FEWGEN_DATA", "/work/shared/data"))
    ap.add_argument("--cache", default=None, help="artifact cache (default $FEWGEN_CACHE)")
    ap.add_argument("--split", default="val", choices=("val", "novel"))
    ap.add_argument("--n-way", type=int, default=20)
    ap.add_argument("--n-query", type=int, default=15)
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="few-shot seeds: each draws its own shots and episodes (and seeds the steered pools and "
                         "regressors); with several, each difference also gets a CI over the draws")
    ap.add_argument("--generators", nargs="*", default=["max_shift=0.2"],
                    help="generators trained through the classifier, each as comma-separated DeformOptions fields, or "
                         "FAMILY:FIELDS (deform: DeformOptions, fusion: FusionOptions)")
    ap.add_argument("--shares", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--per-shot", nargs="+", type=int, default=[5, 20])
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--steer", nargs="*", default=[],
                    help="steered redrawings (fewgen.generators.steered), each KIND:POOL:M[:R[:pixel]] (KIND affine: its "
                         "default distortion, or copies: the milder one of the affine copies): POOL random redrawings of "
                         "each shot, of which the M whose mean feature (train backbone) is nearest the regressor's "
                         "prediction are kept; R regressors averaged, default 1; pixel: steered toward the mean of the "
                         "regressor's and the pixel predictor's predictions, target=pixel+regressor)")
    ap.add_argument("--reference", default="+ {copies} affine copies|s=0.25",
                    help="ROW|SETTING of the best real-only row (chosen on val): every row's paired difference "
                         "against it is reported too")
    ap.add_argument("--pretrain", nargs="*", default=[], help="overrides of the omniglot preset's pretraining")
    ap.add_argument("--backbones", nargs="+", default=["train=pretrain.seed=0", "indep=pretrain.seed=1"],
                    help="NAME=OVERRIDE[,OVERRIDE...]: the backbones every row is scored through, each the omniglot "
                         "preset's with --pretrain and these overrides; the first (the generators read it) must be "
                         "named train, e.g. add resnet12=backbone.name=resnet12-small,pretrain.seed=1,pretrain.epochs=6")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    ref_row, ref_setting = a.reference.format(copies=a.copies).split("|")
    if ref_row == f"+ {a.copies} affine copies" and ref_setting.startswith("s=") and \
            float(ref_setting[2:]) not in a.shares:
        raise SystemExit(f"--reference {a.reference!r} needs share {ref_setting[2:]} in --shares {a.shares}")
    specs = [(b.split("=", 1)[0], [o for o in b.split("=", 1)[1].split(",") if o]) if "=" in b else (b, [])
             for b in a.backbones]
    if specs[0][0] != "train" or len({n for n, _ in specs}) != len(specs):
        raise SystemExit(f"--backbones {a.backbones}: the first must be named train and the names must differ")
    torch.set_num_threads(a.threads)
    out = Path(a.out or f"benchmarks/results/bench_centre_shift{'' if a.split == 'val' else '_' + a.split}.json")

    from fewgen.cache import ArtifactCache
    from fewgen.data import load_dataset

    t0 = time.time()
    cache = ArtifactCache(a.cache)
    data = load_dataset("omniglot", a.root)
    split = data.split(a.split)
    backbones = load_backbones([(name, [*a.pretrain, *overrides]) for name, overrides in specs], data, cache)

    n_classes = split.num_classes
    generators, deformers = [], []
    for spec in a.generators:
        o = parse_spec(spec)
        t = time.time()
        gen = trained_generator(o, spec, backbones["train"], data, cache)
        deformers.append((spec, o, gen, time.time() - t))

    # (backbone, row, setting) -> per shot draw: (per-episode acc, per-query all-way acc, cos->centre)
    scores: dict[tuple[str, str, str], list[tuple[torch.Tensor, torch.Tensor, float]]] = {}
    for seed in a.seeds:
        grids = score_draw(a, seed, split, data, backbones, deformers, generators if seed == a.seeds[0] else None,
                           scores)
        if seed == a.seeds[0]:
            first_draw = grids
    rows = summarise(a, scores, n_classes)
    shot_idx, second_idx, generated_images, steered = first_draw

    for spec, images in steered.items():
        if "unsteered" not in spec:
            grid = out.with_name(out.stem + "_steered_" + spec.replace(":", "-") + ".png")
            grid.parent.mkdir(parents=True, exist_ok=True)
            save_grid(grid, split.images[shot_idx[:10]], images[:10], split.images[second_idx[:10]], 7)
    if generated_images:
        spec = next(iter(generated_images))
        grid = out.with_suffix(".png")
        grid.parent.mkdir(parents=True, exist_ok=True)
        save_grid(grid, split.images[shot_idx[:10]], generated_images[spec][:10], split.images[second_idx[:10]], 7)
        log(f"image grid (shot | 7 generated | second real drawing), {spec!r}: {grid}")

    head = (f"| backbone | row | setting | {a.n_way}-way 1-shot | diff (95% CI) | vs best real-only | "
            f"all-way ({n_classes}) 1-shot | diff (95% CI) | vs best real-only | cos->centre |")
    print(f"diff: paired against shot only; vs best real-only: paired against {a.reference.format(copies=a.copies)}")
    print(head)
    print("|" + "---|" * 10)
    if len(a.seeds) > 1:
        print(f"{len(a.seeds)} shot draws (seeds {a.seeds}): each +- is the per-episode (all-way: per-query) CI "
              "pooled over draws, then [+- the CI over the draws' mean differences]")

    def cell(r: dict, tag: str, way: str) -> str:
        ci = r[f"{tag}_ci95_{way}" if tag != "diff" else f"ci95_{way}"]
        draws = r.get(f"{tag}_ci95_draws_{way}")
        return f"{r[f'{tag}_{way}']:+.2f} +- {ci:.2f}" + ("" if draws is None else f" [+- {draws:.2f}]")

    for r in rows:
        w = f"{a.n_way}way"
        print(f"| {r['backbone']} | {r['row']} | {r['setting']} | {r[f'acc_{w}']:.2f} | {cell(r, 'diff', w)} | "
              f"{cell(r, 'vs_best_real', w)} | {r['acc_allway']:.2f} | {cell(r, 'diff', 'allway')} | "
              f"{cell(r, 'vs_best_real', 'allway')} | {r['cos_centre']:.4f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "split": a.split, "classes": n_classes,
                               "backbones": {k: {"key": v.key, "best_val": v.best_val} for k, v in backbones.items()},
                               "generators": generators, "rows": rows, "seconds": round(time.time() - t0, 1)},
                              indent=2))
    log(f"wrote {out} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
