"""Does a centre regressor trained on classes the backbone never saw beat one trained on base pairs?
(issue 27; docs/results/synthetic.md section 6)

Frozen Conv-4 of the ``omniglot`` preset (``--backbone train``: pretrain seed 0; ``indep``: seed 1).
The 100 validation characters are split into two folds of 50; for each fold, E[f(x2) | f(x1)]
regressors (``fewgen.generators.steered.train_centre_regressor``) are trained on pairs of the
*other* fold's drawings (classes the backbone never saw; 300, 1000 and 3000 steps) and, as the
reference, on pairs of base drawings. Each is scored on 5 shot draws of the fold (20-way 1-shot
episodes and all-way over its 50 characters), every prototype ``normalize((1 - s) shot + s pred)``,
paired against 20 affine copies of the shot at s=0.25 (the best real-only row). The 95% CI is over
the 10 (fold, draw) units.

    FEWGEN_CACHE=/tmp/i27/cache python benchmarks/probe_heldout_regressor.py --backbone train
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


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("FEWGEN_DATA", "/work/shared/data"))
    ap.add_argument("--backbone", choices=("train", "indep"), default="train")
    ap.add_argument("--draws", type=int, default=5)
    ap.add_argument("--episodes", type=int, default=300, help="20-way episodes per draw")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(a.out or f"benchmarks/results/probe_heldout_regressor_{a.backbone}.json")

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
    val = data.split("val")
    cfg = load_config("omniglot", [f"pretrain.seed={0 if a.backbone == 'train' else 1}"])
    bb = pretrain_backbone(cfg.backbone, cfg.pretrain, data, ArtifactCache(), "cpu", print, progress=False).backbone.eval()
    base_reg = train_centre_regressor(extract_features(bb, data.base), data.base.labels, SteeredOptions(seed=0))[0]
    perm = torch.randperm(val.num_classes, generator=torch.Generator().manual_seed(7))
    half = val.num_classes // 2
    folds = [sorted(perm[:half].tolist()), sorted(perm[half:].tolist())]
    units: dict[str, list[tuple[float, float, float]]] = {}
    for k in range(2):
        train_part = val.select_classes(folds[k], name=f"fold{k}")
        test_part = val.select_classes(folds[1 - k], name=f"fold{1 - k}")
        f_train, feats = extract_features(bb, train_part), extract_features(bb, test_part)
        regs = {"base pairs": base_reg}
        for steps in (300, 1000, 3000):
            regs[f"held-out pairs, {steps} steps"] = train_centre_regressor(
                f_train, train_part.labels, SteeredOptions(seed=0, regressor_steps=steps))[0]
        for seed in range(a.draws):
            shots2 = few_shot_indices(test_part, 2, seed)
            si, s2 = shots2[:, 0], shots2[:, 1]
            eps = sample_episodes(test_part, 20, 2, 15, a.episodes, seed)
            _, allq = all_way_split(test_part, 2, seed)
            shot = feats[si]
            copies = augmented_copies(test_part.subset(si, name=f"s{seed}"), 20, seed)
            table = torch.stack([(copies.labels == c).nonzero().squeeze(1) for c in range(test_part.num_classes)])
            cands = {"shot only": prototypes(shot), "second real shot, s=0.5": prototypes(shot, feats[s2][:, None], 0.5),
                     "20 affine copies, s=0.25": prototypes(shot, extract_features(bb, copies.images)[table], 0.25)}
            for name, reg in regs.items():
                with torch.no_grad():
                    pred = F.normalize(reg(shot), dim=-1)[:, None]
                for s in (0.25, 0.5, 0.75):
                    cands[f"regressor on {name}, s={s}"] = prototypes(shot, pred, s)
            scores = {n: (episode_acc(p, feats, eps).mean().item(), all_way_correct(p, feats, test_part.labels, allq).mean().item())
                      for n, p in cands.items()}
            ref = scores["20 affine copies, s=0.25"]
            for n, (e, w) in scores.items():
                units.setdefault(n, []).append((100 * (e - ref[0]), 100 * (w - ref[1]), 100 * e))
    rows = []
    print(f"[{a.backbone}] against 20 affine copies at s=0.25; 95% CI over {2 * a.draws} (fold, draw) units")
    print("| row | 20-way accuracy | 20-way difference | all-way (50) difference |\n|---|---|---|---|")
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
