"""Few-shot image generation: TGAN, FreezeD, CDC and DCL side by side, plus a metrics check.

Runs the ``dcl-omniglot`` and ``dcl-pacs`` presets through ``fewgen.app.runner.run`` (every
method adapts the same cached source GAN for the same iterations and is measured with the
same samples count, feature network and held-out target images), prints one table per setup
and writes the rows and the tracked curves as JSON. ``--metrics-check`` also compares
fewgen's FID / KID with the reference ways (SciPy ``sqrtm`` FID, torchmetrics FID and KID)
on Gaussian features, side by side with timings.

    FEWGEN_DATA=/work/shared/data python benchmarks/bench_fsig.py --out benchmarks/results/bench_fsig.json
    python benchmarks/bench_fsig.py --presets dcl-pacs --override gan.adapt.iters=200
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def metrics_check(n: int = 1000, dim: int = 64, seed: int = 0) -> list[dict]:
    import numpy as np
    import scipy.linalg
    import torch
    from torchmetrics.image.fid import _compute_fid
    from torchmetrics.image.kid import poly_mmd

    from fewgen.evaluation.generative import fid_from_features, kid_from_features

    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, dim))
    b = rng.normal(0.2, 1.3, size=(n, dim)) @ rng.normal(0, 0.3, size=(dim, dim)) + a.mean(0)
    rows = []
    t = time.perf_counter()
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    ref = float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(scipy.linalg.sqrtm(s1 @ s2).real))
    rows.append({"metric": "FID", "implementation": "numpy + scipy.linalg.sqrtm (reference)", "value": ref,
                 "seconds": time.perf_counter() - t})
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    t = time.perf_counter()
    tm = float(_compute_fid(ta.mean(0), torch.cov(ta.T), tb.mean(0), torch.cov(tb.T)))
    rows.append({"metric": "FID", "implementation": "torchmetrics _compute_fid", "value": tm,
                 "seconds": time.perf_counter() - t})
    t = time.perf_counter()
    rows.append({"metric": "FID", "implementation": "fewgen fid_from_features (torchmetrics over given features)", "value": fid_from_features(ta, tb),
                 "seconds": time.perf_counter() - t})
    t = time.perf_counter()
    ours, _ = kid_from_features(ta, tb, subsets=1, subset_size=n)
    rows.append({"metric": "KID (all samples)", "implementation": "fewgen kid_from_features (torchmetrics over given features)", "value": ours,
                 "seconds": time.perf_counter() - t})
    t = time.perf_counter()
    rows.append({"metric": "KID (all samples)", "implementation": "torchmetrics poly_mmd (reference)",
                 "value": float(poly_mmd(ta, tb)), "seconds": time.perf_counter() - t})
    return rows


def run_preset(preset: str, out_dir: Path, overrides: list[str]) -> dict:
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    cfg = load_config(preset, overrides)
    t = time.time()
    r = run(cfg, out_dir / preset, overwrite=True, progress=False, quiet=True)
    gen = json.loads((r.dir / "gan" / "generation.json").read_text())
    tracking = json.loads((r.dir / "gan" / "tracking.json").read_text())
    return {"preset": preset, "setup": gen["setup"], "rows": gen["rows"], "tracking": tracking["tracking"],
            "seconds": round(time.time() - t, 1), "run_dir": str(r.dir)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", nargs="*", default=["dcl-omniglot", "dcl-pacs"])
    p.add_argument("--override", nargs="*", default=[], help="key=value overrides for every preset")
    p.add_argument("--runs", default="runs/bench_fsig", help="folder for the run directories")
    p.add_argument("--metrics-check", action="store_true", help="also compare FID/KID with the reference ways")
    p.add_argument("--out", default="benchmarks/results/bench_fsig.json")
    a = p.parse_args()
    from fewgen.reports.tables import format_generation_table

    result: dict = {"setups": []}
    if a.metrics_check:
        result["metrics_check"] = metrics_check()
        print("metrics check (Gaussian features, n=1000, D=64)")
        for r in result["metrics_check"]:
            print(f"  {r['metric']:<18} {r['implementation']:<42} {r['value']:.6f}  {r['seconds'] * 1e3:.1f} ms")
    for preset in a.presets:
        res = run_preset(preset, Path(a.runs), a.override)
        result["setups"].append(res)
        print(f"\n{preset}: {res['setup']}  ({res['seconds']} s)")
        print(format_generation_table(res["rows"]))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
