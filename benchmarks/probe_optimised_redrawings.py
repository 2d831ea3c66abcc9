"""Do steered redrawings realise more of the predicted centre shift when each is also optimised? (issue 27)

Steered redrawings (``fewgen.generators.steered``) choose, of POOL random affine redrawings of
each shot, the KEEP whose mean feature lies nearest the regressor's prediction of the class centre.
They realise about half of the regressor's own gain (docs/results/synthetic.md, section 6). Here each
kept redrawing is then warped by a smooth displacement field (``fewgen.generators.deform.warp``, a
GRID x GRID lattice bounded by ``max_shift * tanh``), optimised per class by Adam through the frozen
backbone so that the redrawings' normalised mean feature moves toward the prediction, with the
deformation generator's smoothness and magnitude penalties. The images are rounded to uint8 before
they are scored.

Images optimised through one backbone can move its features without looking like drawings, so every
row is also scored through an independently trained backbone (``pretrain.seed=1``) that took no
part in the choice or the optimisation. Rows are paired, on the same episodes, against the shot
alone and against the best real-only row chosen on validation (20 affine copies, s = 0.25); with
several draws each difference also gets the 95% CI over the draws' mean differences.

    FEWGEN_CACHE=/tmp/i27/cache python benchmarks/probe_optimised_redrawings.py --split val --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_centre_shift import (  # noqa: E402
    all_way_correct,
    episode_acc,
    load_backbones,
    log,
    prototypes,
    save_grid,
)


def optimise(backbone, images: torch.Tensor, target: torch.Tensor, max_shift: float, steps: int, grid: int,
             w_smooth: float, w_magnitude: float, lr: float) -> torch.Tensor:
    """Warp ``images`` (N, M, C, H, W) uint8, the M redrawings of each of N classes, so that each
    class's normalised mean feature moves toward ``target`` (N, D); returns uint8 of the same shape."""
    from fewgen.data.images import to_uint8
    from fewgen.generators.deform import displacement_penalties, warp

    n, m = images.shape[:2]
    x = images.flatten(0, 1).float() / 255.0
    raw = torch.zeros(n * m, 2, grid, grid, requires_grad=True)
    opt = torch.optim.Adam([raw], lr=lr)
    backbone.eval().requires_grad_(False)
    for _ in range(steps):
        offsets = max_shift * torch.tanh(raw)
        f = F.normalize(backbone.forward_features(warp(x, offsets)), dim=-1).view(n, m, -1)
        cos = (F.normalize(f.mean(1), dim=-1) * target).sum(-1).mean()
        smooth, magnitude = displacement_penalties(offsets, max_shift)
        loss = -cos + w_smooth * smooth + w_magnitude * magnitude
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = to_uint8(warp(x, max_shift * torch.tanh(raw)))
    return out.view(images.shape)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=os.environ.get("FEWGEN_DATA", "/work/shared/data"))
    ap.add_argument("--cache", default=None)
    ap.add_argument("--split", default="val", choices=("val", "novel"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n-way", type=int, default=20)
    ap.add_argument("--n-query", type=int, default=15)
    ap.add_argument("--episodes", type=int, default=1000)
    ap.add_argument("--pool", type=int, default=400)
    ap.add_argument("--keep", type=int, default=10)
    ap.add_argument("--max-shifts", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--grid", type=int, default=5)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--w-smooth", type=float, default=0.1)
    ap.add_argument("--w-magnitude", type=float, default=0.01)
    ap.add_argument("--shares", type=float, nargs="+", default=[0.5, 0.75])
    ap.add_argument("--copies", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    out = Path(a.out or f"benchmarks/results/probe_optimised_redrawings_{a.split}.json")

    from fewgen.cache import ArtifactCache
    from fewgen.data import load_dataset
    from fewgen.data.fewshot import all_way_split, few_shot_indices, sample_episodes
    from fewgen.evaluation.features import extract_features
    from fewgen.evaluation.protocol import mean_ci95
    from fewgen.generators.steered import SteeredOptions, SteeredRedrawings
    from fewgen.learners.synthetic import augmented_copies

    t0 = time.time()
    cache = ArtifactCache(a.cache)
    data = load_dataset("omniglot", a.root)
    split = data.split(a.split)
    backbones = {name: pb.backbone for name, pb in load_backbones(
        [("train", ["pretrain.seed=0"]), ("indep", ["pretrain.seed=1"])], data, cache).items()}
    n_classes = split.num_classes
    scores: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for seed in a.seeds:
        shots2 = few_shot_indices(split, 2, seed)
        shot_idx = shots2[:, 0]
        episodes = sample_episodes(split, a.n_way, 2, a.n_query, a.episodes, seed)
        _, all_query = all_way_split(split, 2, seed)
        shots = split.images[shot_idx]
        copies = augmented_copies(split.subset(shot_idx, name=f"shots-s{seed}"), a.copies, seed)
        copy_table = torch.stack([(copies.labels == c).nonzero().squeeze(1) for c in range(n_classes)])
        bb = backbones["train"]
        steerer = SteeredRedrawings(SteeredOptions(pool=a.pool, keep=a.keep, seed=seed)).fit(bb, data.base)
        target = steerer.predicted_centres(bb, shots)
        steered = steerer.generate(bb, shots).view(n_classes, a.keep, *shots.shape[1:])
        sets = {"steered": steered}
        for ms in a.max_shifts:
            t = time.time()
            sets[f"steered + optimised warp, max_shift={ms}"] = optimise(
                bb, steered, target, ms, a.steps, a.grid, a.w_smooth, a.w_magnitude, a.lr)
            change = (sets[f"steered + optimised warp, max_shift={ms}"].float() - steered.float()).abs().mean() / 255
            log(f"seed {seed}: optimised max_shift={ms} in {time.time() - t:.0f}s, mean pixel change {change:.3f}")
        for name, images in sets.items():  # how near the prediction each set's mean feature lies
            f = F.normalize(extract_features(bb, images.flatten(0, 1)), dim=-1).view(n_classes, a.keep, -1)
            log(f"seed {seed}: {name}: cos(mean feature, prediction) {(F.normalize(f.mean(1), dim=-1) * target).sum(-1).mean():.4f}")
        if seed == a.seeds[0]:
            for name, images in sets.items():
                if name != "steered":
                    grid_path = out.with_name(out.stem + f"_{name.split('=')[-1]}.png")
                    grid_path.parent.mkdir(parents=True, exist_ok=True)
                    save_grid(grid_path, shots[:10], images[:10], steered[:10, :1].squeeze(1), 7)
        for bname, b in backbones.items():
            feats = extract_features(b, split)
            shot = feats[shot_idx]
            rows = [("shot only", prototypes(shot)),
                    (f"{a.copies} affine copies, s=0.25 (best real-only)",
                     prototypes(shot, extract_features(b, copies.images)[copy_table], 0.25))]
            if bname == "train":  # the feature reference: the prediction itself
                rows += [(f"feature ref: the regressor's prediction, s={s}", prototypes(shot, target[:, None], s))
                         for s in a.shares]
            for name, images in sets.items():
                f = extract_features(b, images.flatten(0, 1)).view(n_classes, a.keep, -1)
                rows += [(f"{name}, s={s}", prototypes(shot, f, s)) for s in a.shares]
            for row, protos in rows:
                scores.setdefault((bname, row), []).append(
                    (episode_acc(protos, feats, episodes), all_way_correct(protos, feats, split.labels, all_query)))
        log(f"seed {seed} scored ({time.time() - t0:.0f}s)")

    results = []
    for (bname, row), per_draw in scores.items():
        ref = scores[(bname, f"{a.copies} affine copies, s=0.25 (best real-only)")]
        r = {"backbone": bname, "row": row, "draws": len(per_draw)}
        for i, way in ((0, f"{a.n_way}way"), (1, "allway")):
            r[f"acc_{way}"] = round(torch.cat([x[i] for x in per_draw]).mean().item() * 100, 2)
            d, h = mean_ci95((torch.cat([x[i] for x in per_draw]) - torch.cat([y[i] for y in ref])).numpy() * 100)
            r[f"vs_best_real_{way}"], r[f"ci95_{way}"] = round(d, 3), round(h, 3)
            if len(per_draw) > 1:
                _, hd = mean_ci95([(x[i].mean() - y[i].mean()).item() * 100 for x, y in zip(per_draw, ref, strict=True)])
                r[f"ci95_draws_{way}"] = round(hd, 3)
        results.append(r)
    head = f"| backbone | row | {a.n_way}-way | vs best real-only | all-way | vs best real-only |\n|---|---|---|---|---|---|"
    lines = [head] + [
        f"| {r['backbone']} | {r['row']} | {r[f'acc_{a.n_way}way']:.2f} | {r[f'vs_best_real_{a.n_way}way']:+.2f} "
        f"+- {r[f'ci95_{a.n_way}way']:.2f} [+- {r.get(f'ci95_draws_{a.n_way}way', float('nan')):.2f}] | "
        f"{r['acc_allway']:.2f} | {r['vs_best_real_allway']:+.2f} +- {r['ci95_allway']:.2f} "
        f"[+- {r.get('ci95_draws_allway', float('nan')):.2f}] |" for r in results]
    print("\n".join(lines))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"config": vars(a), "split": a.split, "classes": n_classes, "rows": results,
                               "seconds": round(time.time() - t0, 1)}, indent=1))
    log(f"wrote {out} ({time.time() - t0:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
