"""DomainFusion on PACS (leave-one-domain-out): the comparison table and its claims.

Runs the ``domainfusion`` preset (every result is cached, so a finished run is only read back)
or reads an existing run directory, prints per-domain and average accuracy with CIs, wall time
and images generated for ERM, ERM + offline img2img images, DomainFusion with latent
distillation, with online augmentation, and with both, and checks the paper's claims:

* DomainFusion (both) beats ERM on average by >= 2 points with non-overlapping 95% CIs;
* it uses fewer generated images than the offline-augmentation row it matches or beats.

Side by side with the reference way: fewgen's ``latent_distillation_loss`` against the loss
written out directly with diffusers' ``DDPMScheduler.add_noise`` and the UNet (same draw).

    python benchmarks/bench_domainfusion.py                       # the preset, FEWGEN_DATA=../shared/data
    python benchmarks/bench_domainfusion.py --from-run runs/domainfusion
    python benchmarks/bench_domainfusion.py --set seeds=[0] domainfusion.epochs=2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def reference_check() -> dict:
    """fewgen's L_LD vs the same loss written out with diffusers directly."""
    import torch.nn.functional as F

    from fewgen.backbones import create_backbone
    from fewgen.dg.domainfusion import PixelDiffusionAdapter, freeze, latent_distillation_loss
    from fewgen.dg.protocol import DGClassifier
    from fewgen.generators.diffusion import DiffusionConfig, DiffusionGenerator

    torch.manual_seed(0)
    gen = DiffusionGenerator(DiffusionConfig(image_size=16, channels=3, block_out_channels=[16, 32],
                                             attention_levels=[False, False], cond_mode="class"),
                             [str(i) for i in range(7)])
    model = PixelDiffusionAdapter(gen, 32)
    freeze(model)
    clf = DGClassifier(create_backbone("conv4", in_chans=3, hidden=32, out_channels=64), 7)
    x, y = torch.rand(16, 3, 32, 32), torch.randint(0, 7, (16,))
    logits = clf(x)
    t0 = time.perf_counter()
    ours = latent_distillation_loss(model, x, y, logits, (50, 400), torch.Generator().manual_seed(5))
    t_ours = time.perf_counter() - t0
    g = torch.Generator().manual_seed(5)
    t0 = time.perf_counter()
    p = logits.softmax(1)[torch.arange(16), y]
    x0 = F.interpolate(x * p[:, None, None, None], size=(16, 16), mode="area") * 2 - 1
    t = torch.randint(50, 401, (16,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    x_t = gen.noise_scheduler.add_noise(x0, noise, t)
    tok, pooled = gen.conditioner(y)
    ref = F.mse_loss(gen.unet(x_t, t, encoder_hidden_states=tok, class_labels=pooled).sample, noise)
    t_ref = time.perf_counter() - t0
    return {"fewgen_loss": ours.item(), "reference_loss": ref.item(), "abs_diff": abs(ours.item() - ref.item()),
            "fewgen_ms": round(t_ours * 1000, 1), "reference_ms": round(t_ref * 1000, 1)}


@torch.no_grad()
def generator_diagnostics(cache_dir: str, data_root: str | None, image_size: int = 32, n: int = 512) -> list[dict]:
    """Is the frozen generator's noise prediction informative for latent distillation?

    For each cached source-domain generator: the eps-MSE at t in [50, 400] on n held-in source
    images with (a) the true label, (b) a wrong label, and (c) the image scaled by p = 0.5 and
    0.1 (true label). L_LD can only teach the classifier something if (b) > (a) and (c) > (a).
    """
    from fewgen.data import load_dataset
    from fewgen.dg.domainfusion import PixelDiffusionAdapter
    from fewgen.generators.diffusion import DiffusionGenerator

    out = []
    full = load_dataset("pacs", data_root, image_size).full
    for entry in sorted(Path(cache_dir, "dg-diffusion").glob("*/done")):
        entry = entry.parent
        info = json.loads((entry / "train.json").read_text())
        gen = DiffusionGenerator.load(entry)
        model = PixelDiffusionAdapter(gen, image_size)
        src = full.select_domains(info["sources"])
        idx = torch.randperm(len(src), generator=torch.Generator().manual_seed(0))[:n]
        x, y = src.float_images(idx), src.labels[idx]
        wrong = (y + torch.randint(1, 7, y.shape, generator=torch.Generator().manual_seed(1))) % 7
        res = {"sources": info["sources"], "train_s": info["seconds"]}
        for name, scale, labels in (("true", 1.0, y), ("wrong_label", 1.0, wrong), ("p=0.5", 0.5, y),
                                    ("p=0.1", 0.1, y)):
            g = torch.Generator().manual_seed(2)
            x0 = model.encode(x * scale)
            t = torch.randint(50, 401, (len(x0),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            eps = torch.cat([model.predict_noise(model.add_noise(a, b, c), c, d) for a, b, c, d in zip(
                x0.split(128), noise.split(128), t.split(128), labels.split(128))])
            res[f"mse_{name}"] = round(float((eps - noise).pow(2).mean()), 5)
        out.append(res)
    return out


def rows_from_cache(cache_dir: str, seeds: list[int], preset_overrides: list[str]) -> list[dict]:
    """Rows from the finished (target, seed, method) results in a cache, without training anything:
    only targets whose every method has every one of ``seeds`` done (a partial comparison)."""
    from fewgen.app.config import load_config
    from fewgen.cache import ArtifactCache
    from fewgen.checkpoint import load_tensors
    from fewgen.dg.protocol import dg_rows
    from fewgen.keys import RULES

    cfg = load_config("domainfusion", preset_overrides)
    want = json.loads(json.dumps(RULES["dg-result"].fields(cfg)))
    cache = ArtifactCache(cache_dir)
    found: dict = {}
    for key_file in Path(cache_dir, "dg-result").glob("*/key.json"):
        key = json.loads(key_file.read_text())
        if key.get("config") != want or not cache.ready(key_file.parent):
            continue
        tensors, meta = load_tensors(key_file.parent / "result.safetensors")
        inputs = key["inputs"]
        found[(inputs["method"], inputs["target"], inputs["seed"])] = (tensors["correct"].bool(), meta)
    methods = cfg.domainfusion.methods
    targets = [t for t in ("art_painting", "cartoon", "photo", "sketch")
               if all((m, t, s) in found for m in methods for s in seeds)]
    rows = []
    for m in methods:
        correct = {t: [found[(m, t, s)][0] for s in seeds] for t in targets}
        extra = {t: {"images_generated": round(np.mean([found[(m, t, s)][1]["images_generated"] for s in seeds])),
                     "wall_s": round(float(np.mean([found[(m, t, s)][1]["wall_s"] for s in seeds])), 1)}
                 for t in targets}
        rows += dg_rows(m, correct, seeds, extra, uses_synthetic=m != "erm")
    return rows


def claims(rows: list[dict]) -> dict:
    by = {(r["method"], r["domain"]): r for r in rows}
    out: dict = {}
    if ("df", "average") in by and ("erm", "average") in by:
        df, erm = by[("df", "average")], by[("erm", "average")]
        gain = df["accuracy"] - erm["accuracy"]
        lo_df, hi_erm = df["accuracy"] - df["ci95"], erm["accuracy"] + erm["ci95"]
        paired = np.array(df["seed_accuracies"]) - np.array(erm["seed_accuracies"])
        out["df_minus_erm_average"] = round(gain, 3)
        out["df_minus_erm_per_seed"] = [round(float(v), 3) for v in paired]
        out["ci95_non_overlapping"] = bool(lo_df > hi_erm)
        out["ci95_seeds_non_overlapping"] = bool(df["accuracy"] - df["ci95_seeds"] > erm["accuracy"] + erm["ci95_seeds"])
        out["claim_beats_erm_by_2_with_separate_ci"] = bool(gain >= 2.0 and lo_df > hi_erm)
    if ("df", "average") in by and ("erm+offline", "average") in by:
        df, off = by[("df", "average")], by[("erm+offline", "average")]
        out["df_minus_offline_average"] = round(df["accuracy"] - off["accuracy"], 3)
        out["df_images_per_run"] = df["images_generated"]
        out["offline_images_per_run"] = off["images_generated"]
        out["claim_fewer_images_than_offline_it_matches"] = bool(
            df["images_generated"] < off["images_generated"] and df["accuracy"] >= off["accuracy"])
    return out


def table(rows: list[dict]) -> str:
    head = f"{'method':12s} {'domain':13s} {'accuracy':>16s} {'ci95 (seeds)':>13s} {'generated':>10s} {'wall_s':>8s}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['method']:12s} {r['domain']:13s} {r['accuracy']:8.2f} +- {r['ci95']:5.2f} "
                     f"{r.get('ci95_seeds', float('nan')):13.2f} {r.get('images_generated', 0):10} "
                     f"{r.get('wall_s', 0):8.1f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--from-run", help="read metrics.json of an existing run instead of running the preset")
    ap.add_argument("--set", nargs="*", default=[], help="config overrides for the preset (key=value)")
    ap.add_argument("--run-dir", default="runs/bench_domainfusion", help="run directory when running the preset")
    ap.add_argument("--out", default="benchmarks/results/bench_domainfusion.json")
    ap.add_argument("--from-cache", help="build rows from finished results in this cache (no training)")
    ap.add_argument("--seeds", nargs="*", type=int, default=[0, 1], help="seeds for --from-cache")
    ap.add_argument("--diagnose-cache", help="artifact cache whose dg-diffusion generators to diagnose")
    ap.add_argument("--data-root", default=None, help="data root for the diagnostics (default $FEWGEN_DATA)")
    args = ap.parse_args(argv)
    t0 = time.time()
    if args.from_cache:
        rows = rows_from_cache(args.from_cache, args.seeds, args.set)
        config_note = f"finished results in {args.from_cache}, seeds {args.seeds}, preset domainfusion {' '.join(args.set)}"
    elif args.from_run:
        run_dir = Path(args.from_run)
        config_note = str(run_dir / "config.yaml")
    else:
        from fewgen.app.config import load_config
        from fewgen.app.runner import run

        cfg = load_config("domainfusion", args.set)
        run(cfg, args.run_dir, overwrite=True, progress=False)
        run_dir = Path(args.run_dir)
        config_note = f"preset domainfusion {' '.join(args.set)}".strip()
    if not args.from_cache:
        rows = json.loads((run_dir / "metrics.json").read_text())["rows"]
    print(table(rows))
    result = {"config": config_note, "rows": rows, "claims": claims(rows), "reference": reference_check(),
              "seconds": round(time.time() - t0, 1)}
    if args.diagnose_cache:
        result["generator_diagnostics"] = generator_diagnostics(args.diagnose_cache, args.data_root)
    print(json.dumps({k: result[k] for k in ("claims", "reference", "generator_diagnostics") if k in result},
                     indent=2))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
