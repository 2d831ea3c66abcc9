"""Which centre predictor moves a 1-shot prototype furthest toward its class? (issue 27)

Feature space only (no images): each predictor maps a shot to where the class's other drawings are
predicted to lie, and the prototype is ``normalize((1 - s) shot + s pred)``. Scored on the
validation (or novel) characters over several shot draws, paired against 20 affine copies of the
shot at s=0.25 (the best real-only row), with the 95% CI over the draws. Predictors (``--predictors``),
all fitted on the base classes only:

* ``regressor``: E[f(x2) | f(x1)] by MSE on base pairs (``fewgen.generators.steered``), one seed;
* ``regressor-x5``: the mean of five such regressors (seeds 0-4);
* ``corrector``: a residual MLP h trained with the prototype loss on base episodes (20-way 1-shot,
  the prototype built with h at share s_train=0.5, cosine logits at temperature 10), as in the issue's probe.

  These three are fitted once (seeds 0-4). The ones below are fitted again on every draw, seeded by
  it, and each is also paired against ``regressor (per draw)``, the regressor fitted the same way:

* ``knn-offset``: analogy transfer (Hariharan & Girshick 2017): the shot plus the softmax-weighted
  mean, over its k nearest base drawings b, of ``mean(b's class without b) - f(b)``;
* ``pixel``: a copy of the backbone fine-tuned on the base images (``--pixel-epochs``, Adam 1e-4) so
  that its feature of each drawing points at the mean feature (frozen backbone) of the drawing's
  class without it: a predictor that reads the pixels, not the 64 features
  (``fewgen.generators.steered.train_pixel_predictor``, the steered redrawings' ``target=pixel+regressor``);
* ``pixel+regressor``: the normalised mean of the two.

``--set-level`` adds rows that move each prototype using the episode's other prototypes (the
regressor's, s=0.75): pushed away from its soft-nearest others, or the episode's mean prototype
subtracted; each 20-way episode then has its own prototypes.

    FEWGEN_CACHE=/tmp/i27/cache python benchmarks/probe_centre_predictors.py --split val --backbone train
    FEWGEN_CACHE=/tmp/i27/cache python benchmarks/probe_centre_predictors.py --split val --backbone train \
        --predictors knn-offset pixel pixel+regressor --set-level --shares 0.5 0.75 0.9 1.0
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def train_corrector(feats: torch.Tensor, labels: torch.Tensor, steps: int, seed: int, share: float = 0.5,
                    n_way: int = 20, n_query: int = 5, scale: float = 10.0, hidden: int = 256) -> nn.Module:
    """h(f) = f + mlp(f) on normalised features, trained so that prototypes (1-s) f_shot + s h(f_shot)
    classify base queries (cross-entropy of cosine logits)."""
    from fewgen.generators.steered import CentreRegressor
    from fewgen.training import run_steps

    f = F.normalize(feats.float(), dim=-1)
    by_class = [torch.nonzero(labels == c).squeeze(1) for c in labels.unique()]
    by_class = [ix for ix in by_class if len(ix) > n_query]
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    h = CentreRegressor(f.shape[1], hidden)
    opt = torch.optim.Adam(h.parameters(), 1e-3, weight_decay=1e-5)

    def step_loss(step: int) -> torch.Tensor:
        classes = torch.randperm(len(by_class), generator=g)[:n_way]
        shots, queries = [], []
        for c in classes.tolist():
            ix = by_class[c][torch.randperm(len(by_class[c]), generator=g)[:1 + n_query]]
            shots.append(ix[0])
            queries.append(ix[1:])
        s_f = f[torch.stack(shots)]
        q_f = f[torch.cat(queries)]
        p = F.normalize((1 - share) * s_f + share * F.normalize(h(s_f), dim=-1), dim=-1)
        y = torch.arange(n_way).repeat_interleave(n_query)
        return F.cross_entropy(scale * q_f @ p.T, y)

    run_steps(step_loss, opt, None, steps, name="corrector")
    return h.eval()


def knn_offset(shot: torch.Tensor, base_feats: torch.Tensor, base_loo: torch.Tensor, k: int,
               temperature: float = 20.0) -> torch.Tensor:
    """The shot plus the similarity-weighted mean offset (class mean without b, minus f(b)) of its k
    nearest base drawings b: where its class's other drawings lie, by analogy."""
    s = F.normalize(shot, dim=-1)
    b = F.normalize(base_feats, dim=-1)
    top = (s @ b.T).topk(k, dim=1)
    w = torch.softmax(top.values * temperature, 1)[..., None]
    return F.normalize(s + (w * (base_loo[top.indices] - b[top.indices])).sum(1), dim=-1)


def set_level(protos: torch.Tensor, kind: str, beta: float, temperature: float = 5.0) -> torch.Tensor:
    """Prototypes (..., n, D) moved using the others of their episode: ``push`` away from their
    soft-nearest others, or ``centre`` (the episode's mean prototype subtracted) by ``beta``."""
    if kind == "centre":
        return F.normalize(protos - beta * protos.mean(-2, keepdim=True), dim=-1)
    n = protos.shape[-2]
    sim = (protos @ protos.transpose(-1, -2)).masked_fill(torch.eye(n, dtype=torch.bool), float("-inf"))
    return F.normalize(protos - beta * torch.softmax(temperature * sim, -1) @ protos, dim=-1)


ONCE = ("regressor", "regressor-x5", "corrector")
PER_DRAW = ("knn-offset", "pixel", "pixel+regressor")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("FEWGEN_DATA", "/work/shared/data"))
    ap.add_argument("--split", choices=("val", "novel"), default="val")
    ap.add_argument("--backbone", choices=("train", "indep"), default="train")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--predictors", nargs="+", choices=ONCE + PER_DRAW, default=list(ONCE))
    ap.add_argument("--shares", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    ap.add_argument("--corrector-steps", type=int, default=3000)
    ap.add_argument("--knn", type=int, default=20, help="base drawings knn-offset averages over")
    ap.add_argument("--pixel-epochs", type=int, default=4)
    ap.add_argument("--set-level", action="store_true", help="add the set-level rows (module docstring)")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out or f"benchmarks/results/probe_centre_predictors_{a.split}_{a.backbone}.json")

    from bench_centre_shift import all_way_correct, episode_acc, load_backbones, prototypes

    from fewgen.cache import ArtifactCache
    from fewgen.data import load_dataset
    from fewgen.data.fewshot import all_way_split, few_shot_indices, sample_episodes
    from fewgen.evaluation.features import extract_features
    from fewgen.evaluation.protocol import mean_ci95
    from fewgen.generators.steered import (
        SteeredOptions,
        leave_one_out_means,
        train_centre_regressor,
        train_pixel_predictor,
    )
    from fewgen.learners.synthetic import augmented_copies

    t0 = time.time()
    data = load_dataset("omniglot", a.root)
    split = data.split(a.split)
    pb = load_backbones([(a.backbone, [f"pretrain.seed={0 if a.backbone == 'train' else 1}"])], data,
                        ArtifactCache())[a.backbone]
    bb = pb.backbone.eval()
    base_f, feats = extract_features(bb, data.base), extract_features(bb, split)
    base_loo = leave_one_out_means(base_f, data.base.labels)

    def predict(fn, x):
        with torch.no_grad():
            return F.normalize(fn(x), dim=-1)

    once = {}
    if {"regressor", "regressor-x5"} & set(a.predictors):
        regs = [train_centre_regressor(base_f, data.base.labels, SteeredOptions(seed=s))[0]
                for s in range(5 if "regressor-x5" in a.predictors else 1)]
        if "regressor" in a.predictors:
            once["regressor (seed 0)"] = lambda shot: predict(regs[0], shot)
        if "regressor-x5" in a.predictors:
            once["regressor x5 (mean of seeds 0-4)"] = lambda shot: F.normalize(
                torch.stack([predict(r, shot) for r in regs]).mean(0), dim=-1)
    if "corrector" in a.predictors:
        corrector = train_corrector(base_f, data.base.labels, a.corrector_steps, seed=0)
        once["corrector (prototype loss)"] = lambda shot: predict(corrector, shot)
    per_draw = [p for p in a.predictors if p in PER_DRAW]
    print(f"predictors fitted ({time.time() - t0:.0f}s)", flush=True)

    units: dict[str, list[tuple[float, float, float]]] = {}
    for seed in range(a.draws):
        shots2 = few_shot_indices(split, 2, seed)
        si, s2 = shots2[:, 0], shots2[:, 1]
        eps = sample_episodes(split, 20, 2, 15, a.episodes, seed)
        _, allq = all_way_split(split, 2, seed)
        shot = feats[si]
        copies = augmented_copies(split.subset(si, name=f"s{seed}"), 20, seed)
        table = torch.stack([(copies.labels == c).nonzero().squeeze(1) for c in range(split.num_classes)])
        preds = {name: fn(shot) for name, fn in once.items()}
        if per_draw:
            reg = train_centre_regressor(base_f, data.base.labels, SteeredOptions(seed=seed))[0]
            preds["regressor (per draw)"] = predict(reg, shot)
            if "knn-offset" in per_draw:
                preds[f"knn-offset (k={a.knn})"] = knn_offset(shot, base_f, base_loo, a.knn)
            if {"pixel", "pixel+regressor"} & set(per_draw):
                g = train_pixel_predictor(bb, data.base, base_f, a.pixel_epochs, seed)
                pixel = F.normalize(extract_features(g, split.images[si]), dim=-1)
                if "pixel" in per_draw:
                    preds["pixel predictor"] = pixel
                if "pixel+regressor" in per_draw:
                    preds["pixel predictor + regressor"] = F.normalize(pixel + preds["regressor (per draw)"], dim=-1)
        cands = {"shot only": prototypes(shot), "second real shot, s=0.5": prototypes(shot, feats[s2][:, None], 0.5),
                 "20 affine copies, s=0.25": prototypes(shot, extract_features(bb, copies.images)[table], 0.25)}
        for name, pred in preds.items():
            for s in a.shares:
                cands[f"{name}, s={s}"] = prototypes(shot, pred[:, None], s)
        scores = {n: (episode_acc(p, feats, eps).mean().item(), all_way_correct(p, feats, split.labels, allq).mean().item())
                  for n, p in cands.items()}
        if a.set_level:
            reg_name = "regressor (per draw)" if "regressor (per draw)" in preds else next(iter(preds))
            e, n, q = eps.query.shape
            queries = F.normalize(feats[eps.query.reshape(e, -1)], dim=-1)
            y = torch.arange(n).repeat_interleave(q)
            for base_row, protos in (("shot only", cands["shot only"]),
                                     (f"{reg_name}, s=0.75", prototypes(shot, preds[reg_name][:, None], 0.75))):
                for kind, beta in (("push", 0.1), ("push", 0.2), ("centre", 0.25), ("centre", 0.5)):
                    per_episode = set_level(protos[eps.classes], kind, beta)
                    acc = ((queries @ per_episode.transpose(1, 2)).argmax(-1) == y).double().mean().item()
                    everyone = set_level(protos, kind, beta)
                    scores[f"set-level {kind} {beta} on {base_row}"] = (
                        acc, all_way_correct(everyone, feats, split.labels, allq).mean().item())
        ref = scores["20 affine copies, s=0.25"]
        for n, (e, w) in scores.items():
            units.setdefault(n, []).append((100 * (e - ref[0]), 100 * (w - ref[1]), 100 * e))
        print(f"draw {seed} done ({time.time() - t0:.0f}s)", flush=True)
    rows = []
    print(f"[{a.split}, {a.backbone}] against 20 affine copies at s=0.25; 95% CI over {a.draws} shot draws")
    print("| row | 20-way accuracy | 20-way difference | all-way difference | vs regressor (per draw), 20-way | all-way |")
    print("|---|---|---|---|---|---|")
    for n, v in units.items():
        v = np.array(v)
        d20, h20 = mean_ci95(v[:, 0])
        dall, hall = mean_ci95(v[:, 1])
        row = {"row": n, "acc_20way": round(float(v[:, 2].mean()), 2), "diff_20way": round(d20, 3),
               "ci95_20way": round(h20, 3), "diff_allway": round(dall, 3), "ci95_allway": round(hall, 3)}
        share = n.rsplit(", s=", 1)[-1] if ", s=" in n else None
        against = f"regressor (per draw), s={share}"
        vs = ""
        if share and against in units and n != against and not n.startswith("regressor"):
            diff = v - np.array(units[against])
            (r20, c20), (rall, call) = mean_ci95(diff[:, 0]), mean_ci95(diff[:, 1])
            row.update(vs_regressor_20way=round(r20, 3), vs_regressor_ci95_20way=round(c20, 3),
                       vs_regressor_allway=round(rall, 3), vs_regressor_ci95_allway=round(call, 3))
            vs = f" {r20:+.2f} +- {c20:.2f} | {rall:+.2f} +- {call:.2f}"
        rows.append(row)
        print(f"| {n} | {v[:, 2].mean():.2f} | {d20:+.2f} +- {h20:.2f} | {dall:+.2f} +- {hall:.2f} |{vs or ' | '} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "backbone_key": pb.key, "rows": rows,
                               "units": units, "seconds": round(time.time() - t0, 1)}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
