"""Choosing DPM-Solver++'s settings on BASE classes only (no novel class, no test image).

The base generator samples 20 unrotated Omniglot base classes (every 33rd of the development
split's base characters), ``--per-class`` images each from fixed seeds, with DDIM 50 steps and
with DPM-Solver++ 20 steps under several diffusers settings; each set's FID/KID is measured
against the real images of those classes with the omniglot preset's Conv-4 as feature network.
The two variants within 2.5% of DDIM 50 became the samplers ``dpmsolver++-logsnr`` and
``dpmsolver++-full`` (no lambda clipping); the novel-class check is
``bench_generators.py --sampler-check --sampler-candidates ...``. Prints a table and writes JSON:

    G=~/.cache/fewgen/generators/<key>   # fewgen run datadream 'pipeline=[generator]'
    FEWGEN_DATA=../shared/data python benchmarks/bench_sampler_base.py --generator $G
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from fewgen.app.config import pretrain_options

VARIANTS = {  # name -> (sampler, steps, DPMSolverMultistepScheduler overrides)
    "ddim 50": ("ddim", 50, {}),
    "dpm++ 20, time-uniform (dpmsolver++)": ("dpmsolver++", 20, {}),
    "dpm++ 20, log-SNR-uniform (dpmsolver++-logsnr)": ("dpmsolver++-logsnr", 20, {}),
    "dpm++ 20, karras sigmas": ("dpmsolver++", 20, {"use_karras_sigmas": True}),
    "dpm++ 20, trailing spacing": ("dpmsolver++", 20, {"timestep_spacing": "trailing"}),
    "dpm++ 20, third order": ("dpmsolver++", 20, {"solver_order": 3}),
    "dpm++ 20, no lambda clipping": ("dpmsolver++", 20, {"lambda_min_clipped": -float("inf")}),
    # without clipping x0 (DDIM does not clip): from the lambda of DDIM 50's first step (t = 980, -3.5), or not
    "dpm++ 20, no thresholding": ("dpmsolver++", 20, {"thresholding": False}),
    "dpm++ 20, no thresholding, lambda clip -3.5": ("dpmsolver++", 20, {"thresholding": False,
                                                                        "lambda_min_clipped": -3.5}),
    "dpm++ 20, log-SNR, no thresholding, lambda clip -3.5": ("dpmsolver++", 20, {
        "thresholding": False, "lambda_min_clipped": -3.5, "use_lu_lambdas": True}),
    "dpm++ 20, leading spacing, no thresholding": ("dpmsolver++", 20, {"thresholding": False,
                                                                       "timestep_spacing": "leading"}),
    # over the full noise range: no lambda clipping, with the other step spacings
    "dpm++ 20, karras sigmas, no lambda clipping": ("dpmsolver++", 20, {"use_karras_sigmas": True,
                                                                        "lambda_min_clipped": -float("inf")}),
    "dpm++ 20, log-SNR, no lambda clipping": ("dpmsolver++", 20, {"use_lu_lambdas": True,
                                                                  "lambda_min_clipped": -float("inf")}),
}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--generator", required=True, help="a saved base generator folder")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/bench_sampler_base.json")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), metavar="NAME",
                   help="run only these (and ddim 50 unless --out has it); rows of the same generator and "
                        "--per-class already in --out are kept")
    args = p.parse_args(argv)
    out = Path(args.out)
    old = json.loads(out.read_text()) if args.variants and out.exists() else {}
    if old.get("generator") != args.generator or old.get("per_class") != args.per_class:
        old = {}
    have_ref = any(r["variant"] == "ddim 50" for r in old.get("rows", []))
    run = [*([] if have_ref else ["ddim 50"]), *[v for v in args.variants if v != "ddim 50"]] \
        if args.variants else list(VARIANTS)
    torch.set_num_threads(args.threads)

    from diffusers import DPMSolverMultistepScheduler

    import fewgen.generators.diffusion as diffusion
    from fewgen.app.config import load_config
    from fewgen.cache import ArtifactCache
    from fewgen.data import load_dataset
    from fewgen.evaluation.generative import FeatureNet, fid_kid
    from fewgen.pretrain import pretrain_backbone

    gen = diffusion.DiffusionGenerator.load(args.generator)
    data = load_dataset("omniglot", None, 28)
    names = data.base.class_names
    plain = [i for i, n in enumerate(names) if "rot" not in n]
    classes = plain[::max(1, len(plain) // 20)][:20]
    real = torch.cat([data.base.images[data.base.labels == c] for c in classes])
    pb = pretrain_backbone(*pretrain_options(load_config("omniglot", [])), data, ArtifactCache(None), "cpu", print, progress=False)
    feature_net = FeatureNet(pb.backbone.eval())
    labels = [c for c in classes for _ in range(args.per_class)]
    build = diffusion.build_sampler
    rows = []
    print(f"{len(classes)} base classes x {args.per_class} images; {len(real)} real images")
    for name in run:
        sampler, steps, overrides = VARIANTS[name]
        def variant(noise_scheduler, s, overrides=overrides):
            if s != "dpmsolver++" or not overrides:
                return build(noise_scheduler, s)
            return DPMSolverMultistepScheduler.from_config(build(noise_scheduler, s).config, **overrides)
        diffusion.build_sampler = variant
        t = time.time()
        try:
            fake = gen.sample(labels, seeds=list(range(len(labels))), steps=steps, guidance=2.0, sampler=sampler,
                              batch_size=50)
        except Exception as e:  # noqa: BLE001 - a diffusers setting that does not run with this schedule
            rows.append({"variant": name, "error": repr(e)[:200]})
            print(f"{name:<50} fails: {rows[-1]['error']}")
            continue
        finally:
            diffusion.build_sampler = build
        s = fid_kid(real, fake, feature_net, kid_subsets=50, kid_subset_size=100)
        rows.append({"variant": name, "fid": round(s["fid"], 2), "kid": round(s["kid"], 5),
                     "seconds": round(time.time() - t, 1)})
        print(f"{name:<50} FID {rows[-1]['fid']:>8.2f}  KID {rows[-1]['kid']:>10.2f}  {rows[-1]['seconds']:>6.1f}s",
              flush=True)
    if old:
        ran = {r["variant"] for r in rows}
        rows = [r for r in old["rows"] if r["variant"] not in ran] + rows
        rows.sort(key=lambda r: list(VARIANTS).index(r["variant"]) if r["variant"] in VARIANTS else len(VARIANTS))
    ref = next(r["fid"] for r in rows if r["variant"] == "ddim 50")
    for r in rows:
        if "fid" in r:
            r["fid_vs_ddim50_pct"] = round(100 * (r["fid"] / ref - 1), 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"generator": args.generator, "per_class": args.per_class,
                                          "classes": [names[c] for c in classes], "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
