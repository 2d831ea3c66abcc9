"""Batched logistic regression vs scikit-learn fitted per episode (the RFS / IER reference).

Same features (the preset's pretrained backbone on the novel classes), same episodes.
Prints a table and writes JSON. Example:

    FEWGEN_DATA=../shared/data python benchmarks/bench_logreg.py --preset omniglot --episodes 600
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def sklearn_per_episode(features: torch.Tensor, episodes, c: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression  # imported (and warmed up) before timing

    feats = F.normalize(features.double(), dim=-1).numpy()
    n_way, n_shot, n_query = episodes.n_way, episodes.n_shot, episodes.n_query
    y_sup = np.repeat(np.arange(n_way), n_shot)
    y_q = np.repeat(np.arange(n_way), n_query)
    accs = []
    for e in range(episodes.n_episodes):
        clf = LogisticRegression(C=c, max_iter=1000)
        clf.fit(feats[episodes.support[e].reshape(-1).numpy()], y_sup)
        accs.append((clf.predict(feats[episodes.query[e].reshape(-1).numpy()]) == y_q).mean())
    return np.asarray(accs)


def _first(episodes):
    """The first episode alone, for warm-up."""
    import dataclasses

    return dataclasses.replace(episodes, classes=episodes.classes[:1], support=episodes.support[:1],
                               query=episodes.query[:1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="omniglot")
    p.add_argument("--episodes", type=int, default=600)
    p.add_argument("--ways", type=int, nargs="+", default=None, help="default: the preset's eval.n_ways")
    p.add_argument("--shots", type=int, nargs="+", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=9, help="timed runs of the batched solver (median reported)")
    p.add_argument("--out", default="benchmarks/results/bench_logreg.json")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. pretrain.epochs=2")
    args = p.parse_args(argv)

    from fewgen.app.config import load_config
    from fewgen.app.runner import load_data
    from fewgen.cache import ArtifactCache
    from fewgen.data.fewshot import sample_episodes
    from fewgen.evaluation.features import extract_features
    from fewgen.evaluation.protocol import episode_accuracies, mean_ci95
    from fewgen.pretrain import pretrain_backbone

    cfg = load_config(args.preset, args.overrides)
    data = load_data(cfg.data, cfg.backbone)
    pb = pretrain_backbone(cfg.backbone, cfg.pretrain, data, ArtifactCache(cfg.cache_dir), log=lambda m: None, progress=False)
    feats = extract_features(pb.backbone, data.novel)
    c = cfg.eval.logreg_c
    rows = []
    for n_way in args.ways or cfg.eval.n_ways:
        for n_shot in args.shots or cfg.eval.n_shots:
            ep = sample_episodes(data.novel, n_way, n_shot, cfg.eval.n_query, args.episodes, args.seed)
            sklearn_per_episode(feats, _first(ep), c)  # warm-up: imports and first-call costs
            t = time.perf_counter()
            sk = sklearn_per_episode(feats, ep, c)
            t_sk = time.perf_counter() - t
            kwargs = {"c": c, "max_iter": cfg.eval.logreg_iters}
            episode_accuracies(feats, _first(ep), "logreg", classifier_kwargs=kwargs)  # warm-up
            times = []
            for _ in range(args.repeats):  # ~0.1 s each: the median of a few damps scheduler noise
                t = time.perf_counter()
                ours = episode_accuracies(feats, ep, "logreg", classifier_kwargs=kwargs).numpy()
                times.append(time.perf_counter() - t)
            e = ep.n_episodes
            t_ours = float(np.median(times))
            m_sk, ci_sk = mean_ci95(sk * 100)
            m_ours, ci_ours = mean_ci95(ours * 100)
            rows.append({
                "n_way": n_way, "n_shot": n_shot, "episodes": e,
                "sklearn_acc": round(m_sk, 3), "sklearn_ci95": round(ci_sk, 3), "sklearn_s": round(t_sk, 3),
                "batched_acc": round(m_ours, 3), "batched_ci95": round(ci_ours, 3), "batched_s": round(t_ours, 3),
                "acc_diff": round(m_ours - m_sk, 3), "speedup": round(t_sk / t_ours, 1),
            })
    header = f"{'setting':<14}{'sklearn acc':>18}{'batched acc':>18}{'diff':>8}{'sklearn s':>11}{'batched s':>11}{'speedup':>9}"
    print(f"features: {cfg.backbone.name} ({pb.key}) on {data.name} novel, {feats.shape[0]} images x {feats.shape[1]} dims; "
          f"torch threads {torch.get_num_threads()}")
    print(header)
    for r in rows:
        print(f"{r['n_way']:>3}-way {r['n_shot']}-shot"
              f"{r['sklearn_acc']:>11.2f} +-{r['sklearn_ci95']:>4.2f}{r['batched_acc']:>11.2f} +-{r['batched_ci95']:>4.2f}"
              f"{r['acc_diff']:>8.2f}{r['sklearn_s']:>11.2f}{r['batched_s']:>11.3f}{r['speedup']:>8.1f}x")
    total_sk, total_ours = sum(r["sklearn_s"] for r in rows), sum(r["batched_s"] for r in rows)
    print(f"{'all settings':<14}{'':>36}{'':>8}{total_sk:>11.2f}{total_ours:>11.3f}{total_sk / total_ours:>8.1f}x")
    result = {"preset": args.preset, "backbone_key": pb.key, "threads": torch.get_num_threads(),
              "timing": f"scikit-learn: one pass over the episodes after a warm-up fit; batched: the pipeline's "
                        f"episode_accuracies, median of {args.repeats} passes after a warm-up; both include "
                        f"gathering the features and predicting the queries",
              "total_sklearn_s": round(total_sk, 3), "total_batched_s": round(total_ours, 3),
              "total_speedup": round(total_sk / total_ours, 1), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
