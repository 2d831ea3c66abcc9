"""Which centre predictor moves a 1-shot prototype furthest toward its class? (issue 27)

Feature space only (no images): each predictor maps a shot's frozen feature to where the class's other
drawings are predicted to lie, and the prototype is ``normalize((1 - s) shot + s pred)``. Scored on
the validation (or novel) characters over several shot draws, paired against 20 affine copies of the
shot at s=0.25 (the best real-only row), with the 95% CI over the draws. Predictors, all fitted on
base features only:

* ``regressor``: E[f(x2) | f(x1)] by MSE on base pairs (``fewgen.generators.steered``), one seed;
* ``regressor x5``: the mean of five such regressors (seeds 0-4);
* ``corrector``: a residual MLP h trained with the prototype loss on base episodes (20-way 1-shot,
  the prototype built with h at share s_train=0.5, cosine logits at temperature 10), as in the issue's probe.

    FEWGEN_CACHE=/tmp/i27/cache python benchmarks/probe_centre_predictors.py --split val --backbone train
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("FEWGEN_DATA", "/work/shared/data"))
    ap.add_argument("--split", choices=("val", "novel"), default="val")
    ap.add_argument("--backbone", choices=("train", "indep"), default="train")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--corrector-steps", type=int, default=3000)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out or f"benchmarks/results/probe_centre_predictors_{a.split}_{a.backbone}.json")

    from bench_centre_shift import all_way_correct, episode_acc, prototypes

    from fewgen.app.config import load_config
    from fewgen.cache import ArtifactCache
    from fewgen.data import load_dataset
    from fewgen.data.fewshot import all_way_split, few_shot_indices, sample_episodes
    from fewgen.evaluation.features import extract_features
    from fewgen.evaluation.protocol import mean_ci95
    from fewgen.generators.steered import SteeredOptions, train_centre_regressor
    from fewgen.learners.synthetic import augmented_copies
    from fewgen.pretrain import pretrain_backbone

    t0 = time.time()
    data = load_dataset("omniglot", a.root)
    split = data.split(a.split)
    cfg = load_config("omniglot", [f"pretrain.seed={0 if a.backbone == 'train' else 1}"])
    bb = pretrain_backbone(cfg.backbone, cfg.pretrain, data, ArtifactCache(), "cpu", print, progress=False).backbone.eval()
    base_f, feats = extract_features(bb, data.base), extract_features(bb, split)
    regs = [train_centre_regressor(base_f, data.base.labels, SteeredOptions(seed=s))[0] for s in range(5)]
    corrector = train_corrector(base_f, data.base.labels, a.corrector_steps, seed=0)
    print(f"predictors fitted ({time.time() - t0:.0f}s)", flush=True)

    def predict(fn, shot):
        with torch.no_grad():
            return F.normalize(fn(shot), dim=-1)[:, None]

    units: dict[str, list[tuple[float, float, float]]] = {}
    for seed in range(a.draws):
        shots2 = few_shot_indices(split, 2, seed)
        si, s2 = shots2[:, 0], shots2[:, 1]
        eps = sample_episodes(split, 20, 2, 15, a.episodes, seed)
        _, allq = all_way_split(split, 2, seed)
        shot = feats[si]
        copies = augmented_copies(split.subset(si, name=f"s{seed}"), 20, seed)
        table = torch.stack([(copies.labels == c).nonzero().squeeze(1) for c in range(split.num_classes)])
        preds = {"regressor (seed 0)": predict(regs[0], shot),
                 "regressor x5 (mean of seeds 0-4)": F.normalize(torch.stack([predict(r, shot) for r in regs]).mean(0), dim=-1),
                 "corrector (prototype loss)": predict(corrector, shot)}
        cands = {"shot only": prototypes(shot), "second real shot, s=0.5": prototypes(shot, feats[s2][:, None], 0.5),
                 "20 affine copies, s=0.25": prototypes(shot, extract_features(bb, copies.images)[table], 0.25)}
        for name, pred in preds.items():
            for s in (0.25, 0.5, 0.75):
                cands[f"{name}, s={s}"] = prototypes(shot, pred, s)
        scores = {n: (episode_acc(p, feats, eps).mean().item(), all_way_correct(p, feats, split.labels, allq).mean().item())
                  for n, p in cands.items()}
        ref = scores["20 affine copies, s=0.25"]
        for n, (e, w) in scores.items():
            units.setdefault(n, []).append((100 * (e - ref[0]), 100 * (w - ref[1]), 100 * e))
        print(f"draw {seed} done ({time.time() - t0:.0f}s)", flush=True)
    rows = []
    print(f"[{a.split}, {a.backbone}] against 20 affine copies at s=0.25; 95% CI over {a.draws} shot draws")
    print("| row | 20-way accuracy | 20-way difference | all-way difference |\n|---|---|---|---|")
    for n, v in units.items():
        v = np.array(v)
        d20, h20 = mean_ci95(v[:, 0])
        dall, hall = mean_ci95(v[:, 1])
        rows.append({"row": n, "acc_20way": round(float(v[:, 2].mean()), 2), "diff_20way": round(d20, 3),
                     "ci95_20way": round(h20, 3), "diff_allway": round(dall, 3), "ci95_allway": round(hall, 3)})
        print(f"| {n} | {v[:, 2].mean():.2f} | {d20:+.2f} +- {h20:.2f} | {dall:+.2f} +- {hall:.2f} |")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "rows": rows, "seconds": round(time.time() - t0, 1)}, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
