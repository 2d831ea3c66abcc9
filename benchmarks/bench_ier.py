"""IER vs cross-entropy pretraining on Omniglot (development split), side by side.

Trains ``ce`` (the reference: RFS-style CE with rotation classes), ``ier`` and ``ier-distill``
with the same epochs and data through ``fewgen.app.runner.run`` on the ``omniglot`` preset, so
every recipe is evaluated on the same saved episodes with the same frozen-feature
classifiers. Each variant runs in its own subprocess so its peak RSS (``ru_maxrss``) is its
own. Prints a table and writes JSON (rows, per-epoch loss curves, timings, peak memory).

    FEWGEN_DATA=/work/shared/data python benchmarks/bench_ier.py --epochs 4 --threads 1
    python benchmarks/bench_ier.py --ablations   # also ier with each term switched off

``ier-distill`` reuses the finished ``ier`` run from the cache as its generation 0, so its
``pretrain_s`` covers the distillation generation(s) only; ``train_s_total`` adds the ier time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Equal optimiser steps and forward passes: CE steps over 4 x 13280 rotation-class images,
# 128 a step (415 steps/epoch); IER over the 13280 unrotated images, 32 a step x 4 rotation
# views = 128 forwarded (415 steps/epoch), each view labelled with its rotation class.
IER = ["pretrain.batch_size=32"]
VARIANTS = {
    "ce": ["pretrain.recipe=ce"],
    "ier": ["pretrain.recipe=ier", *IER],
    "ier-distill": ["pretrain.recipe=ier-distill", *IER],
    # ablations: one term off at a time
    "ier-no-equivariant": ["pretrain.recipe=ier", *IER, "pretrain.ier.equivariant_weight=0"],
    "ier-no-invariant": ["pretrain.recipe=ier", *IER, "pretrain.ier.invariant_weight=0"],
    "ier-no-ce": ["pretrain.recipe=ier", *IER, "pretrain.ier.ce_weight=0"],
    # the invariant loss at temperature 0.1 instead of 1 (it stays flat at 1)
    "ier-temp0.1": ["pretrain.recipe=ier", *IER, "pretrain.ier.temperature=0.1"],
    # rotation classes dropped: the class head learns the 664 unrotated classes only
    "ier-drop": ["pretrain.recipe=ier", *IER, "pretrain.ier.rotation_classes=drop"],
}
ABLATIONS = ["ier-no-equivariant", "ier-no-invariant", "ier-temp0.1", "ier-drop"]


def common_overrides(a: argparse.Namespace) -> list[str]:
    return [
        f"pretrain.epochs={a.epochs}", f"eval.episodes={a.episodes}", f"seeds={json.dumps(a.seeds)}",
        f"num_threads={a.threads}", f"cache_dir={a.cache}", "eval.all_way=false", "device=cpu",
        *([f"pretrain.max_steps_per_epoch={a.max_steps}"] if a.max_steps else []),
        *a.override,
    ]


def run_one(a: argparse.Namespace) -> None:
    """Child process: one variant through the pipeline; JSON result on stdout's last line."""
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    cfg = load_config(a.preset, VARIANTS[a.one] + common_overrides(a))
    cfg.name = a.one
    t0 = time.time()
    r = run(cfg, out_dir=Path(a.workdir) / a.one, overwrite=True, progress=False, quiet=True)
    pb = r.state.backbone
    out = {
        "variant": a.one, "overrides": VARIANTS[a.one] + common_overrides(a), "wall_s": round(time.time() - t0, 1),
        "pretrain_s": r.timings.get("pretrain"), "evaluate_s": r.timings.get("evaluate"),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "best_epoch": pb.best_epoch, "best_val": pb.best_val, "history": pb.history,
        "rows": [row | {"method": a.one} for row in r.rows],
    }
    print("RESULT " + json.dumps(out))


def fmt(row: dict | None) -> str:
    return "-" if row is None else f"{row['accuracy']:.2f} ± {row['ci95']:.2f}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="omniglot")
    p.add_argument("--epochs", type=int, default=4, help="pretraining epochs, the same for every recipe")
    p.add_argument("--episodes", type=int, default=600, help="episodes per (seed, N, K)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="cap steps per epoch (smoke runs only)")
    p.add_argument("--variants", nargs="+", default=["ce", "ier", "ier-distill"], choices=list(VARIANTS))
    p.add_argument("--ablations", action="store_true", help=f"also run {', '.join(ABLATIONS)}")
    p.add_argument("--override", nargs="*", default=[], help="extra key=value config overrides for every variant")
    p.add_argument("--cache", default=os.environ.get("FEWGEN_CACHE", "/tmp/fewgen-bench-ier/cache"))
    p.add_argument("--workdir", default="/tmp/fewgen-bench-ier/runs")
    p.add_argument("--out", default="benchmarks/results/bench_ier.json")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="combine earlier result files (e.g. main run + ablations run) into --out and print the table")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.one:
        run_one(a)
        return 0
    if a.merge:
        merged: dict[str, dict] = {}
        for path in a.merge:
            data = json.loads(Path(path).read_text())
            merged.update(data["results"])
        for key in ("preset", "epochs", "episodes", "seeds", "threads"):  # as run, not this call's defaults
            setattr(a, key, data[key])
        _finish(Path(a.out), a, merged)
        return 0
    variants = a.variants + (ABLATIONS if a.ablations else [])
    results: dict[str, dict] = {}
    out_path = Path(a.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    for v in variants:
        cmd = [sys.executable, __file__, "--one", v, *sys.argv[1:]] if argv is None else \
            [sys.executable, __file__, "--one", v, *argv]
        print(f"== {v}", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
            results[v] = {"variant": v, "error": proc.stderr[-2000:]}
            continue
        results[v] = json.loads(lines[-1][len("RESULT "):])
        _write(out_path, a, results)
    _finish(out_path, a, results)
    return 0


def _finish(out_path: Path, a: argparse.Namespace, results: dict) -> None:
    if "pretrain_s" in results.get("ier-distill", {}) and "pretrain_s" in results.get("ier", {}):
        results["ier-distill"]["train_s_total"] = round(results["ier-distill"]["pretrain_s"] + results["ier"]["pretrain_s"], 1)
    _write(out_path, a, results)
    print(table(results))


def _row(res: dict, clf: str, n_way: int, n_shot: int) -> dict | None:
    for r in res.get("rows", []):
        if r.get("classifier") == clf and r["n_way"] == n_way and r["n_shot"] == n_shot and not r.get("all_way"):
            return r
    return None


def comparison(results: dict) -> list[dict]:
    """ier / ier-distill minus ce on each setting, against the sum of the two 95% CIs."""
    out = []
    if "ce" not in results or "rows" not in results["ce"]:
        return out
    for v, res in results.items():
        if v == "ce" or "rows" not in res:
            continue
        for clf in ("logreg", "proto"):
            for n_way, n_shot in [(5, 1), (5, 5), (20, 1), (20, 5)]:
                a, b = _row(res, clf, n_way, n_shot), _row(results["ce"], clf, n_way, n_shot)
                if a and b:
                    diff, ci = a["accuracy"] - b["accuracy"], a["ci95"] + b["ci95"]
                    verdict = "better" if diff > ci else "worse" if diff < -ci else "within CIs"
                    out.append({"variant": v, "classifier": clf, "n_way": n_way, "n_shot": n_shot,
                                "minus_ce": round(diff, 2), "ci_sum": round(ci, 2), "verdict": verdict})
    return out


def table(results: dict) -> str:
    head = f"{'variant':<20}{'clf':<8}{'5w1s':>15}{'5w5s':>15}{'20w1s':>15}{'20w5s':>15}{'train s':>10}{'peak MB':>9}{'best ep':>8}"
    lines = [head, "-" * len(head)]
    for v, res in results.items():
        if "rows" not in res:
            lines.append(f"{v:<20}failed")
            continue
        for clf in ("logreg", "proto"):
            cells = [fmt(_row(res, clf, w, s)) for w, s in [(5, 1), (5, 5), (20, 1), (20, 5)]]
            train = res.get("train_s_total", res["pretrain_s"])
            lines.append(f"{v:<20}{clf:<8}" + "".join(f"{c:>15}" for c in cells)
                         + f"{train:>10.0f}{res['peak_rss_mb']:>9.0f}{res['best_epoch']:>8}")
    comp = [c for c in comparison(results) if c["n_way"] == 20 and c["n_shot"] == 1]
    if comp:
        lines.append("\n20-way 1-shot minus ce (better/worse: |difference| > sum of the two 95% CIs):")
        for c in comp:
            lines.append(f"  {c['variant']:<20}{c['classifier']:<8}{c['minus_ce']:+.2f} (CI sum {c['ci_sum']:.2f})"
                         f" {c['verdict']}")
    return "\n".join(lines)


def _write(path: Path, a: argparse.Namespace, results: dict) -> None:
    payload = {"benchmark": "bench_ier", "preset": a.preset, "epochs": a.epochs, "episodes": a.episodes,
               "seeds": a.seeds, "threads": a.threads, "variants": {v: VARIANTS[v] for v in results}, "results": results,
               "comparison": comparison(results)}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
