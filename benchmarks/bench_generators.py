"""Generators on Omniglot (development split, novel classes): quality and speed.

Quality, per few-shot setting (K = 1, 5; few-shot seed 0) on the first ``--classes`` novel
classes: synthetic sets from (a) the unadapted base generator, zero-shot from the class
names, (b) DataDream ``cls`` and (c) DataDream ``dset`` (equal total LoRA steps), each scored
against held-out real images of the same classes (the images outside the 5-shot set):

* FID and KID (torchmetrics) with the foundation's pretrained Conv-4 as the feature network;
* accuracy on the held-out real images of a logistic regression trained on features of the
  synthetic images only (all-way over the chosen classes; chance = 1 / classes).

Sampler check: DPM-Solver++ with 20 steps (``--sampler-candidates``: time-uniform steps
``dpmsolver++``, steps uniform in log-SNR ``dpmsolver++-logsnr``, or time-uniform without lambda
clipping ``dpmsolver++-full``) against DDIM with 50 on the same adapter, per synthesis seed
(``--sampler-seeds``); each also sampled with the UNet in bfloat16 (``synthesis.precision``).

Speed, against the reference way (DataDream's ``generate.py``: for each class, reload the
generator from disk, load that class's LoRA file with diffusers' ``load_lora_adapter`` and
generate its images in batches of ``--ref-batch``, 10 as in DataDream): fewgen loads once,
switches per-class LoRA weights in memory, and generates chunks of ``--chunk`` images through
the synthesis cache, in one stream and in ``--streams`` parallel streams (``synthesis.streams``,
default one per thread, each with its own copy of the generator; the bytes must not change).
Both run in float32 and with the UNet in bfloat16 autocast (DataDream itself samples in float16
on its GPUs); ``speedup`` is against the float32 reference,
``speedup_same_precision`` against the reference at the same precision. Same sampler, steps
and guidance; images per second on this machine. Every way runs ``--speed-repeats`` times,
interleaved (reference, fewgen, reference, ...), and the table gives medians: the per-repeat
speed-ups compare runs made under the same machine load.

    python benchmarks/bench_generators.py --generator /tmp/g4/omni_base --classes 20 --per-class 10
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from fewgen.app.config import load_config
from fewgen.cache import ArtifactCache
from fewgen.data import load_dataset
from fewgen.data.fewshot import few_shot_indices, few_shot_set
from fewgen.generators.datadream import (
    DataDreamAdapter,
    DataDreamConfig,
    train_datadream,
)
from fewgen.generators.diffusion import (
    SAMPLERS,
    DiffusionConfig,
    DiffusionGenerator,
    pixel_sample_fn,
)
from fewgen.generators.sampling import sampling_streams
from fewgen.synthesis.store import SynthesisCache, SynthesisSpec, write_png


def feature_scores(real_test, real_labels, fake, fake_labels, feature_net, n_classes):
    """FID / KID against the held-out real images, and synthetic-only classifier accuracy."""
    from sklearn.linear_model import LogisticRegression

    from fewgen.evaluation.generative import fid_kid

    scores = fid_kid(real_test, fake, feature_net, kid_subsets=50, kid_subset_size=100)
    f_fake = feature_net(fake).numpy()
    f_real = feature_net(real_test).numpy()
    clf = LogisticRegression(max_iter=2000, C=1.0).fit(f_fake, fake_labels.numpy())
    acc = float((clf.predict(f_real) == real_labels.numpy()).mean() * 100)
    return {"fid": round(scores["fid"], 3), "kid": round(scores["kid"], 5), "kid_std": round(scores["kid_std"], 5),
            "synthetic_only_acc": round(acc, 2), "n_fake": len(fake), "n_real": len(real_test),
            "chance": round(100 / n_classes, 2)}


def real_shot_accuracy(few, real_test, real_labels, feature_net):
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=2000, C=1.0).fit(feature_net(few.images).numpy(), few.labels.numpy())
    return round(float((clf.predict(feature_net(real_test).numpy()) == real_labels.numpy()).mean() * 100), 2)


def get_adapter(cache: ArtifactCache, gen, few, dd: DataDreamConfig, log):
    parts = {"kind": "datadream", "generator": gen.state_key(), "datadream": dd.__dict__, "few_shot": few.digest()}
    entry = cache.entry("adapters", parts)
    if cache.ready(entry, log):  # the training time recorded when it was made
        return DataDreamAdapter.load(entry), cache.done_info(entry).get("train_s", 0.0)
    t = time.time()
    ad = train_datadream(gen, few, dd, log=log)
    ad.save(entry)
    dt = time.time() - t
    cache.mark_done(entry, {"mode": dd.mode, "train_s": round(dt, 1)})
    return ad, dt


def synth(store, gen, names, per_class, shape, sampler, steps, guidance, adapter=None, chunk=16,
          precision="float32", seed=0, streams=1):
    spec = SynthesisSpec(generator_key=gen.state_key(), class_names=names, prompts=list(names), per_class=per_class,
                         image_shape=shape, adapter_key=None if adapter is None else adapter.key, sampler=sampler,
                         steps=steps, guidance=guidance, seed=seed, chunk=chunk, precision=precision,
                         extra={"zero_shot": adapter is None})
    t = time.time()
    streams = 1 if store.cache.is_done(store.path(spec)) else streams  # a cached set needs no model copies
    ds = store.synthesize(spec, [pixel_sample_fn(gen, spec, adapter) for _ in range(streams)])
    return ds, time.time() - t


def reference_generate(gen_dir: Path, adapter_dir: Path, n_classes: int, per_class: int, steps: int,
                       guidance: float, sampler: str, batch: int, out_dir: Path, precision: str = "float32") -> float:
    """DataDream generate.py's way: per class, reload the generator and that class's LoRA file."""
    info = json.loads((adapter_dir / "adapter_config.json").read_text())
    from fewgen.checkpoint import load_tensors

    emb = load_tensors(adapter_dir / "class_embeddings.safetensors")[0]["class_embeddings"]
    t = time.time()
    for c in range(n_classes):
        gen = DiffusionGenerator.load(gen_dir)  # reload per class
        (label,) = gen.add_classes([info["class_names"][c]], init=emb[c:c + 1])
        gen.unet.load_lora_adapter(str(adapter_dir / f"class_{c:04d}" / "pytorch_lora_weights.safetensors"),
                                   prefix="unet", adapter_name=f"class{c}")
        for i in range(0, per_class, batch):
            n = min(batch, per_class - i)
            seeds = [hash((c, i + k)) % (2**31) for k in range(n)]
            imgs = gen.sample([label] * n, seeds=seeds, steps=steps, guidance=guidance, sampler=sampler,
                              precision=precision)
            for k in range(n):
                write_png(out_dir / f"{c:04d}" / f"{i + k:05d}.png", imgs[k])
    return time.time() - t


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--generator", help="trained base generator folder (generator.json); trained here if absent")
    p.add_argument("--train-steps", type=int, default=2000)
    p.add_argument("--classes", type=int, default=20, help="first N novel classes")
    p.add_argument("--per-class", type=int, default=10, help="synthetic images per class")
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--modes", nargs="+", default=["zero-shot", "cls", "dset"])
    p.add_argument("--steps-per-class", type=int, default=15, help="DataDream LoRA steps per class")
    p.add_argument("--adapt-batch", type=int, default=8)
    p.add_argument("--adapt-lr", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++ steps for the quality sets")
    p.add_argument("--guidance", type=float, default=2.0)
    p.add_argument("--sampler-check", action="store_true", help="DDIM 50 vs DPM-Solver++ 20 on dset at the last K, "
                   "float32 and bfloat16")
    p.add_argument("--sampler-candidates", nargs="+", default=["dpmsolver++", "dpmsolver++-logsnr"],
                   choices=[s for s in SAMPLERS if s != "ddim"], help="the 20-step samplers the check compares")
    p.add_argument("--sampler-seeds", type=int, nargs="+", default=[0],
                   help="synthesis seeds of the sampler check (each a new set of initial noises); FID gaps are "
                        "reported per seed and as mean and std over seeds")
    p.add_argument("--sampler-converged", action="store_true",
                   help="also DPM-Solver++ 50 on the first seed (is 20 steps converged?)")
    p.add_argument("--sampler-per-class", type=int, help="synthetic images per class in the sampler check "
                   "(default --per-class; FID of 10 per class moves ~5%% between seeds)")
    p.add_argument("--speed", action="store_true", help="fewgen vs the reference way, cls adapters at the first K")
    p.add_argument("--speed-classes", type=int, default=5)
    p.add_argument("--speed-per-class", type=int, default=40, help="DataDream generates 100+ per class")
    p.add_argument("--speed-repeats", type=int, default=3,
                   help="timed runs of every way, interleaved; medians are reported (timings here move 10-20%%)")
    p.add_argument("--ref-batch", type=int, default=10, help="the reference's batch (DataDream generate.py: bs=10)")
    p.add_argument("--chunk", type=int, default=40, help="fewgen's images per chunk (synthesis.chunk)")
    p.add_argument("--pretrain", nargs="*", default=[], help="overrides of the omniglot preset's pretraining")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--streams", type=int, default=None,
                   help="fewgen's parallel sampling streams (synthesis.streams; default: one per thread)")
    p.add_argument("--cache", default=os.environ.get("FEWGEN_CACHE", "/tmp/fewgen_bench_cache"))
    p.add_argument("--out", default="benchmarks/results/bench_generators.json")
    p.add_argument("--merge", nargs="*", help="only print the table of these JSON results together")
    args = p.parse_args(argv)
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        rows = [r for part in parts for r in part["rows"]]
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"parts": [{"file": f, "config": part["config"]} for f, part in
                                                        zip(args.merge, parts, strict=True)], "rows": rows}, indent=2))
        print_table(rows)
        return 0
    torch.set_num_threads(args.threads)
    log = lambda s: print(s, flush=True)  # noqa: E731
    cache = ArtifactCache(args.cache)
    store = SynthesisCache(cache)
    data = load_dataset("omniglot", None, 28)
    novel = data.novel.select_classes(list(range(args.classes)), name=data.novel.name)
    names = novel.class_names
    max_k = max(5, *args.shots)
    held_mask = torch.ones(len(novel), dtype=torch.bool)
    held_mask[few_shot_indices(novel, max_k, 0).reshape(-1)] = False
    real_test, real_labels = novel.images[held_mask], novel.labels[held_mask]

    from fewgen.evaluation.generative import FeatureNet
    from fewgen.pretrain import pretrain_backbone

    cfg = load_config("omniglot", args.pretrain)
    pb = pretrain_backbone(cfg.backbone, cfg.pretrain, data, cache, "cpu", log, progress=False)
    feature_net = FeatureNet(pb.backbone.eval())
    log(f"feature network: conv4 backbone {pb.key} (best val {pb.best_val:.1f}%); "
        f"{len(real_test)} held-out real images of {args.classes} novel classes")

    if args.generator and (Path(args.generator) / "generator.json").exists():
        gen = DiffusionGenerator.load(args.generator)
        gen.trained_key = f"file:{args.generator}:{os.path.getmtime(Path(args.generator) / 'generator.safetensors')}"
    else:
        torch.manual_seed(0)
        gen = DiffusionGenerator(DiffusionConfig(block_out_channels=[16, 32, 32], cond_dim=32), data.base.class_names)
        gen.fit(data.base, steps=args.train_steps, batch_size=32, lr=2e-3, log=log)
        args.generator = tempfile.mkdtemp()
        gen.save(args.generator)
    log(f"base generator: {gen.num_parameters() / 1e6:.2f}M parameters, cond_mode {gen.cfg.cond_mode}")

    rows: list[dict] = []
    results = {"config": vars(args), "rows": rows}

    def emit(row):
        rows.append(row)
        log(json.dumps(row))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))

    zs = None
    adapters = {}
    for k in args.shots:
        few = few_shot_set(novel, k, 0)
        emit({"setting": f"{k}-shot", "method": f"real {k} shots (reference)", "synthetic_only_acc": None,
              "real_shot_acc": real_shot_accuracy(few, real_test, real_labels, feature_net)})
        for mode in args.modes:
            if mode == "zero-shot":
                if zs is None:
                    ds, dt = synth(store, gen, names, args.per_class, novel.image_shape, "dpmsolver++", args.steps,
                                   args.guidance)
                    zs = (ds, dt)
                ds, dt = zs
                row = {"method": "base, zero-shot from name", "adapt_s": 0.0}
            else:
                dd = DataDreamConfig(mode=mode, rank=args.rank, alpha=float(args.rank),
                                     steps_per_class=args.steps_per_class, batch_size=args.adapt_batch,
                                     lr=args.adapt_lr, seed=0)
                ad, t_adapt = get_adapter(cache, gen, few, dd, log)
                adapters[(k, mode)] = ad
                ds, dt = synth(store, gen, names, args.per_class, novel.image_shape, "dpmsolver++", args.steps,
                               args.guidance, ad)
                row = {"method": f"DataDream {mode}", "adapt_s": round(t_adapt, 1),
                       "lora_steps_total": sum(h["steps"] for h in ad.history)}
            scores = feature_scores(real_test, real_labels, ds.images, ds.labels, feature_net, args.classes)
            emit({"setting": f"{k}-shot", **row, "sampler": f"dpmsolver++ {args.steps}", "synth_s": round(dt, 1),
                  **scores})

    if args.sampler_check:
        k = args.shots[-1]
        ad = adapters.get((k, "dset"))
        if ad is None:
            few = few_shot_set(novel, k, 0)
            ad, _ = get_adapter(cache, gen, few, DataDreamConfig(mode="dset", rank=args.rank, alpha=float(args.rank),
                                                                 steps_per_class=args.steps_per_class,
                                                                 batch_size=args.adapt_batch, lr=args.adapt_lr), log)
        combos = [("ddim", 50, "float32"), ("ddim", 50, "bfloat16"),
                  *[(s, args.steps, prec) for s in args.sampler_candidates for prec in ("float32", "bfloat16")]]
        n_pc = args.sampler_per_class or args.per_class
        fids: dict[tuple, list[float]] = {}
        for seed in args.sampler_seeds:
            extra = [("dpmsolver++", 50, "float32")] \
                if args.sampler_converged and seed == args.sampler_seeds[0] else []
            for sampler, steps, prec in combos + extra:
                ds, dt = synth(store, gen, names, n_pc, novel.image_shape, sampler, steps, args.guidance, ad,
                               precision=prec, seed=seed, streams=sampling_streams(args.streams, "cpu"))
                scores = feature_scores(real_test, real_labels, ds.images, ds.labels, feature_net, args.classes)
                fids.setdefault((sampler, steps, prec), []).append(scores["fid"])
                emit({"setting": f"{k}-shot", "method": f"sampler check: DataDream dset, {sampler} {steps}, {prec}, "
                      f"{n_pc}/class, seed {seed}", "sampler": f"{sampler} {steps}", "precision": prec, "seed": seed,
                      "synth_s": round(dt, 1), **scores})
        if len(args.sampler_seeds) > 1:
            for ref_prec in ("float32", "bfloat16"):
                ref = fids[("ddim", 50, ref_prec)]
                for combo in combos:
                    if combo[0] == "ddim":
                        continue
                    gaps = torch.tensor([100 * (f / r - 1) for f, r in zip(fids[combo], ref, strict=True)])
                    emit({"setting": f"{k}-shot", "method": f"sampler check, {len(ref)} seeds: {combo[0]} {combo[1]} "
                          f"{combo[2]} vs DDIM 50 {ref_prec}", "sampler": f"{combo[0]} {combo[1]}",
                          "precision": combo[2], "fid": round(float(torch.tensor(fids[combo]).mean()), 2),
                          "ref_fid": round(float(torch.tensor(ref).mean()), 2),
                          "fid_gap_pct_mean": round(float(gaps.mean()), 2),
                          "fid_gap_pct_std": round(float(gaps.std()), 2),
                          "fid_gap_pct_per_seed": [round(float(g), 2) for g in gaps]})

    if args.speed:
        k = args.shots[0]
        few = few_shot_set(novel, k, 0)
        ad = adapters.get((k, "cls"))
        if ad is None:
            ad, _ = get_adapter(cache, gen, few, DataDreamConfig(mode="cls", rank=args.rank, alpha=float(args.rank),
                                                                 steps_per_class=args.steps_per_class,
                                                                 batch_size=args.adapt_batch, lr=args.adapt_lr), log)
        adapter_dir = Path(tempfile.mkdtemp())
        ad.save(adapter_dir)
        nc, npc = args.speed_classes, args.speed_per_class
        n_img = nc * npc
        ref_out = Path(tempfile.mkdtemp())
        sub_ad = copy.copy(ad)
        sub_ad.class_names, sub_ad.lora = ad.class_names[:nc], ad.lora[:nc]
        sub_ad.class_embeddings = ad.class_embeddings[:nc]
        streams = sampling_streams(args.streams, "cpu")

        def ours(prec: str, n_streams: int) -> tuple[float, dict]:
            tmp_store = SynthesisCache(Path(tempfile.mkdtemp()))
            t0 = time.time()
            base = DiffusionGenerator.load(args.generator)  # loaded once, included in the time
            base.trained_key = gen.trained_key
            spec = SynthesisSpec(generator_key=base.state_key(), class_names=names[:nc], prompts=names[:nc],
                                 per_class=npc, image_shape=novel.image_shape, adapter_key=sub_ad.key,
                                 sampler="dpmsolver++", steps=args.steps, guidance=args.guidance,
                                 chunk=args.chunk, precision=prec)
            tmp_store.synthesize(spec, [pixel_sample_fn(base, spec, sub_ad) for _ in range(n_streams)])
            dt = time.time() - t0
            entry = tmp_store.path(spec)
            files = {str(f.relative_to(entry)): f.read_bytes() for f in sorted(entry.rglob("*.png"))}
            shutil.rmtree(tmp_store.cache.root, ignore_errors=True)
            return dt, files

        # repeats interleave every way, so each repeat's ratios compare runs made under the same load
        ways = [("ref", p, 0) for p in ("float32", "bfloat16")] + \
               [("ours", p, s) for p in ("float32", "bfloat16") for s in sorted({1, streams})]
        times: dict[tuple, list[float]] = {w: [] for w in ways}
        same_bytes: dict[tuple, bool] = {}
        for rep in range(args.speed_repeats):
            files1: dict[str, dict] = {}
            for way in ways:
                kind, prec, n_streams = way
                if kind == "ref":
                    dt = reference_generate(Path(args.generator), adapter_dir, nc, npc, args.steps, args.guidance,
                                            "dpmsolver++", args.ref_batch, ref_out, precision=prec)
                else:
                    dt, files = ours(prec, n_streams)
                    files1.setdefault(prec, files)
                    same_bytes[way] = same_bytes.get(way, True) and files == files1[prec]
                times[way].append(dt)
                log(f"speed repeat {rep + 1}/{args.speed_repeats}: {kind} {prec} {n_streams or ''} {dt:.1f}s")

        def median(xs: list[float]) -> float:
            return float(torch.tensor(xs).median())  # the lower middle for an even count

        for way in ways:
            kind, prec, n_streams = way
            t, ref32, ref_p = times[way], times[("ref", "float32", 0)], times[("ref", prec, 0)]
            row = {"setting": f"{k}-shot", "sampler": f"dpmsolver++ {args.steps}", "images": n_img,
                   "repeats": len(t), "seconds": round(median(t), 2), "seconds_runs": [round(x, 2) for x in t],
                   "images_per_s": round(n_img / median(t), 3),
                   "speedup": round(median([r / x for r, x in zip(ref32, t, strict=True)]), 2),
                   "speedup_same_precision": round(median([r / x for r, x in zip(ref_p, t, strict=True)]), 2),
                   "speedup_same_precision_runs": [round(r / x, 2) for r, x in zip(ref_p, t, strict=True)]}
            if kind == "ref":
                row["method"] = f"speed: reference (reload per class, diffusers LoRA loader, batch {args.ref_batch}), {prec}"
            else:
                th = max(1, args.threads // n_streams)
                row["method"] = (f"speed: fewgen (load once, LoRA swap, chunks of {args.chunk}, {n_streams} "
                                 f"stream{'s' if n_streams > 1 else ''} of {th} thread{'s' if th > 1 else ''}), {prec}")
                row["same_bytes_as_1_stream"] = same_bytes[way]
            emit(row)
        for d in (adapter_dir, ref_out):
            shutil.rmtree(d, ignore_errors=True)
    print_table(rows)
    return 0


def print_table(rows):
    cols = ["setting", "method", "sampler", "fid", "kid", "synthetic_only_acc", "real_shot_acc", "adapt_s", "synth_s",
            "fid_gap_pct_mean", "fid_gap_pct_std", "images_per_s", "speedup", "speedup_same_precision"]
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join("" if r.get(c) is None else str(r.get(c)) for c in cols))


if __name__ == "__main__":
    sys.exit(main())
