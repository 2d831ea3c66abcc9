"""Generated images judged against held-out real ones, per generator and mode (issue: images that
carry their class).

For each generator (the class-token DataDream generator, with its LoRA or zero-shot from the class
names; the exemplar generator conditioned on backbone features or on the exemplar's pixels, with and
without DataDream LoRA on top) and each mode (from pure noise, or SDEdit from the shots), the
preset's pipeline runs up to ``synthesize`` on the first ``--classes`` novel classes (few-shot seed 0,
K = ``--shots``), through one shared cache: the backbone and each generator are trained once. Each
synthetic set is scored in the pretrained backbone's feature space against the real images of its
classes that are not shots:

* ``label_fidelity``: share of generated images a logistic regression fitted on the shots labels right;
* ``synthetic_only_acc``: a logistic regression fitted on the generated images alone, on the held-out
  real images (all ``--classes`` classes at once; chance 100 / classes);
* ``nn_dist_generated`` / ``nn_dist_real``: mean cosine distance to the nearest shot of the class, of
  the generated and of held-out real images (copies of the shot score 0);
* ``fid``, ``kid``: against the held-out real images (backbone features);
* ``intra_class_diversity``: mean pairwise cosine distance among a class's generated images;
* ``images_per_s`` of synthesis and the generator's (and adapter's) training seconds, from the cache.

    python benchmarks/bench_synthetic.py --preset omniglot-synthetic --classes 20 --per-class 20 \\
        --out benchmarks/results/bench_synthetic.json

``--split val`` scores every validation class instead (for choosing settings; the novel classes
are then never touched).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from fewgen.app.config import load_config
from fewgen.app.runner import load_data, run
from fewgen.cache import ArtifactCache
from fewgen.data.fewshot import few_shot_indices, few_shot_set
from fewgen.evaluation.features import extract_features

GENERATORS = {
    "class-token+lora": ["generator.kind=diffusion"],
    "class-token (names)": ["generator.kind=diffusion", "generator.diffusion.cond_mode=class+name"],
    "exemplar-features": ["generator.kind=exemplar", "generator.exemplar.cond=features"],
    "exemplar-features+lora": ["generator.kind=exemplar", "generator.exemplar.cond=features"],
    "exemplar-channels": ["generator.kind=exemplar", "generator.exemplar.cond=channels"],
    "exemplar-channels+lora": ["generator.kind=exemplar", "generator.exemplar.cond=channels"],
}


def same_unet(cfg) -> None:
    """A class-token row trains the preset's UNet (its exemplar section's shape and training), so the
    generator kinds differ only in their conditioning."""
    import dataclasses

    from fewgen.generators.pixels import PixelUNetOptions

    if cfg.generator.kind == "diffusion":
        for f in dataclasses.fields(PixelUNetOptions):
            setattr(cfg.generator.diffusion, f.name, getattr(cfg.generator.exemplar, f.name))


def pipeline_for(name: str) -> str:
    adapt = name.endswith("+lora")
    return f"pipeline=[pretrain,generator,{'adapt,' if adapt else ''}synthesize]"


def scores(backbone, shots, syn, held, held_labels, n_classes: int) -> dict:
    from fewgen.evaluation.classifiers import LogisticRegression
    from fewgen.evaluation.generative import fid_from_features, kid_from_features

    fs = F.normalize(extract_features(backbone, syn.images), dim=-1)
    fr = F.normalize(extract_features(backbone, shots.images), dim=-1)
    fh = F.normalize(extract_features(backbone, held), dim=-1)
    shot_clf = LogisticRegression(max_iter=1000).fit(fr[None], shots.labels[None], n_classes=n_classes)
    fidelity = float((shot_clf.predict(fs[None])[0] == syn.labels).double().mean() * 100)
    syn_clf = LogisticRegression(max_iter=1000).fit(fs[None], syn.labels[None], n_classes=n_classes)
    syn_only = float((syn_clf.predict(fh[None])[0] == held_labels).double().mean() * 100)

    def nn_dist(feats, labels):
        out = []
        for c in range(n_classes):
            f = feats[labels == c]
            if len(f):
                out.append(float((1 - (f @ fr[shots.labels == c].t()).max(1).values).mean()))
        return sum(out) / len(out)

    intra = []
    for c in range(n_classes):
        f = fs[syn.labels == c]
        if len(f) > 1:
            sim = f @ f.t()
            intra.append(1 - float((sim.sum() - sim.diag().sum()) / (len(f) * (len(f) - 1))))
    raw_s, raw_h = extract_features(backbone, syn.images), extract_features(backbone, held)
    kid, _ = kid_from_features(raw_h, raw_s, subsets=50, subset_size=100)
    return {"label_fidelity": round(fidelity, 2), "synthetic_only_acc": round(syn_only, 2),
            "chance": round(100 / n_classes, 2), "nn_dist_generated": round(nn_dist(fs, syn.labels), 4),
            "nn_dist_real": round(nn_dist(fh, held_labels), 4), "fid": round(fid_from_features(raw_h, raw_s), 3),
            "kid": round(kid, 5),
            "intra_class_diversity": round(sum(intra) / len(intra), 4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="omniglot-synthetic")
    p.add_argument("--set", nargs="*", default=[], help="key=value overrides for every run")
    p.add_argument("--generators", nargs="*", default=list(GENERATORS), choices=list(GENERATORS))
    p.add_argument("--modes", nargs="*", default=["noise", "sdedit"], choices=["noise", "sdedit"])
    p.add_argument("--strengths", default="[0.25,0.5,0.75]", help="SDEdit strengths of the sdedit mode")
    p.add_argument("--classes", type=int, default=20)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--split", default="novel", choices=["novel", "val"])
    p.add_argument("--cache", default=None, help="artifact cache (default: fewgen's)")
    p.add_argument("--out", default="benchmarks/results/bench_synthetic.json")
    args = p.parse_args(argv)

    base_cfg = load_config(args.preset, [*args.set, f"data.eval_split={args.split}"])
    data = load_data(base_cfg.data, base_cfg.backbone)
    novel = data.novel
    if args.classes > novel.num_classes:
        sys.exit(f"--classes {args.classes} is more than the {novel.num_classes} classes of the {args.split} split")
    chosen = novel.class_names[:args.classes]
    # the same base and val classes as the preset (so its cached backbone and generators are reused);
    # only the classes drawn from change
    split = [f"data.base_classes={json.dumps(data.base.class_names)}",
             f"data.val_classes={json.dumps(data.val.class_names)}"]
    if args.split == "novel":
        split.append(f"data.novel_classes={json.dumps(chosen)}")
    else:  # every val class: restricting them would change the backbone they select
        split = ["data.eval_split=val"]
        args.classes = novel.num_classes
    common = [*args.set, *split, "seeds=[0]", f"eval.n_shots=[{args.shots}]",
              f"synthesis.synthetic_per_class={args.per_class}", "synthesis.grid_classes=8"]
    if args.cache:
        common.append(f"cache_dir={args.cache}")
    results = {"preset": args.preset, "split": args.split, "classes": args.classes, "shots": args.shots,
               "per_class": args.per_class, "overrides": args.set, "rows": []}
    out_root = Path(tempfile.mkdtemp(prefix="bench-synthetic-"))
    for gen_name in args.generators:
        for mode in args.modes:
            strengths = args.strengths if mode == "sdedit" else "[]"
            overrides = [*common, *GENERATORS[gen_name], pipeline_for(gen_name),
                         f"synthesis.sdedit_strengths={strengths}"]
            cfg = load_config(args.preset, overrides)
            same_unet(cfg)
            t0 = time.time()
            r = run(cfg, out_root / f"{gen_name}-{mode}".replace(" ", "_"), progress=False, quiet=True)
            r_novel = r.data.novel
            shots = few_shot_set(r_novel, args.shots, 0)
            syn = r.state.synthetic[(0, args.shots)]
            held = torch.ones(len(r_novel), dtype=torch.bool)
            held[few_shot_indices(r_novel, args.shots, 0).reshape(-1)] = False
            cache = ArtifactCache(cfg.cache_dir)
            gen = r.state.generator
            gen_info = cache.done_info(cache.root / "generators" / gen.trained_key) if gen.trained_key else {}
            sets = json.loads((r.dir / "synthetic_sets.json").read_text())
            syn_info = cache.done_info(Path(sets[f"seed0_{args.shots}shot"]["path"]))
            adapt_s = sum(cache.done_info(e).get("train_s", 0.0) for e in r.state.adapter_entries)
            row = {"generator": gen_name, "mode": mode if mode == "noise" else f"sdedit {strengths}",
                   **scores(r.state.backbone.backbone, shots, syn, r_novel.images[held], r_novel.labels[held],
                            r_novel.num_classes),
                   "images": len(syn), "images_per_s": round(syn_info["generated"] / syn_info["seconds"], 1)
                   if syn_info.get("generated") else None,
                   "generator_train_s": gen_info.get("train_s"), "adapter_train_s": round(adapt_s, 1),
                   "generator_parameters": gen.num_parameters(), "wall_s": round(time.time() - t0, 1),
                   "grids": str(r.dir / "grids")}
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print_table(results["rows"])
    return 0


def print_table(rows: list[dict]) -> None:
    cols = ["generator", "mode", "label_fidelity", "synthetic_only_acc", "nn_dist_generated", "nn_dist_real", "fid",
            "kid", "intra_class_diversity", "images_per_s", "generator_train_s"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    sys.exit(main())
