"""Pipeline step ``domainfusion``: the leave-one-domain-out comparison of ERM, offline synthetic
augmentation and DomainFusion (latent distillation, online augmentation, both).

Per target domain, one class-conditional diffusion model (``fewgen.generators.diffusion``) is
trained on the images of the SOURCE domains only, cached, and shared frozen by every method and
seed; or, with ``domainfusion.generator`` set, a Stable Diffusion model (a local diffusers folder
or hub id) serves every target in its latent space, conditioned on one prompt per class. Per
(target, seed, method), the classifier's per-image test correctness is cached, so an
interrupted comparison resumes where it stopped.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch

from fewgen.app.runner import Run, step
from fewgen.app.steps.core import tensorboard_dir
from fewgen.backbones import create_backbone
from fewgen.checkpoint import load_model, load_tensors, save_tensors
from fewgen.data.images import resize
from fewgen.dg.algorithms import DG_ALGORITHMS, train_algorithm
from fewgen.dg.protocol import (
    DGClassifier,
    DGSplit,
    DGTrainOptions,
    DGTrainSettings,
    dg_rows,
    leave_one_domain_out,
)
from fewgen.errors import FewgenError
from fewgen.generators.denoisers import PixelDiffusionAdapter, freeze
from fewgen.keys import key_parts
from fewgen.utils import (
    path_digest,
    seed_everything,
    seed_hash,
    stable_hash,
    write_json,
)


def uses_generator(method: str) -> bool:
    return DG_ALGORITHMS.get(method).uses_generator


def stable_diffusion_generator(run: Run):
    """``domainfusion.generator`` (Stable Diffusion) as a frozen latent denoiser, with its cache key.
    Never trained here, so the same model serves every target (DomainFusion's setting)."""
    from fewgen.generators.denoisers import LatentDiffusionAdapter

    d = run.cfg.domainfusion
    adapter = LatentDiffusionAdapter.from_pretrained(d.generator, run.data.full.class_names, d.prompt,
                                                     device=run.device, guidance=d.guidance)
    freeze(adapter)
    with torch.no_grad():  # a fingerprint of the weights and prompts: cached results follow the model, not its path
        sums = [float(p.double().sum()) for p in adapter.parameters()] + [float(adapter.prompt_embeds.double().sum())]
    return adapter, stable_hash({"kind": "stable-diffusion", "prompt": d.prompt, "guidance": d.guidance,
                                 "weights": stable_hash(sums)}), 0.0


def source_generator(run: Run, target: str):
    """The diffusion model of ``target``'s source domains (trained once, cached), frozen."""
    from fewgen.generators.diffusion import DiffusionGenerator

    d, o = run.cfg.domainfusion, run.cfg.domainfusion.diffusion
    full = run.data.full
    sources = [n for n in full.domain_names if n != target]
    gcfg = o.model_config(full.image_shape[0])
    parts = key_parts("dg-diffusion", run.cfg, data=full.digest(), sources=sources)

    def load(entry: Path) -> tuple[DiffusionGenerator, float]:
        from fewgen.utils import read_json

        return DiffusionGenerator.load(entry, device=run.device), read_json(entry / "train.json")["seconds"]

    def build(entry: Path) -> tuple[DiffusionGenerator, float]:
        from fewgen.data.base import ArrayDataset

        src = full.select_domains(sources)
        low = resize(src.float_images(), o.image_size)
        train = ArrayDataset((low * 255).round().to(torch.uint8), src.labels, src.class_names, name=f"{src.name}-gen")
        gen = DiffusionGenerator(gcfg, full.class_names, device=run.device)
        run.log(f"[domainfusion] training the diffusion model of sources {sources} ({len(train)} images at "
                f"{o.image_size}px, {gen.num_parameters()} parameters, {o.steps} steps)")
        t0 = time.time()
        gen.fit(train, steps=o.steps, batch_size=o.batch_size, lr=o.lr, seed=seed_hash("dg-gen", target),
                state_path=entry / "state.safetensors", save_every=50, log=run.log,
                log_every=max(1, o.steps // 8), progress=run.progress,
                log_dir=tensorboard_dir(run, "domainfusion", f"generator-{target}"))
        seconds = time.time() - t0
        gen.save(entry, {"sources": sources})
        write_json(entry / "train.json", {"seconds": round(seconds, 1), "sources": sources})
        (entry / "state.safetensors").unlink(missing_ok=True)
        run.cache.mark_done(entry, {"seconds": round(seconds, 1)})
        return gen, seconds

    gen, seconds = run.cache.build_or_load("dg-diffusion", parts, build, load, run.log)
    adapter = PixelDiffusionAdapter(gen, full.image_shape[-1], guidance=d.guidance)
    freeze(adapter)
    return adapter, stable_hash(parts), seconds


def new_classifier(run: Run, num_classes: int, seed: int, target: str) -> DGClassifier:
    """The same initial weights for every method under one (seed, target): a paired comparison."""
    seed_everything(seed_hash("dg-init", seed, target))
    b = run.cfg.backbone
    backbone = create_backbone(b.name, in_chans=run.data.full.image_shape[0], **b.kwargs)
    pretrained = run.cfg.domainfusion.pretrained
    if pretrained:
        try:
            load_model(pretrained, backbone)
        except RuntimeError as e:
            raise FewgenError(f"domainfusion.pretrained {pretrained} does not fit backbone {b.name!r} "
                              f"({str(e).splitlines()[0]}); give a checkpoint of the same backbone") from None
    return DGClassifier(backbone, num_classes)


def train_method(run: Run, method: str, split: DGSplit, seed: int, generator) -> dict:
    """Train one registered method (``fewgen.dg.algorithms``) on one split."""
    d = run.cfg.domainfusion
    settings = DGTrainSettings(**DGTrainOptions.of(d), seed=seed)
    return train_algorithm(method, split, new_classifier(run, split.train.num_classes, seed, split.target), settings,
                           d, generator, seed, run.device, run.log if run.progress else (lambda m: None),
                           progress=run.progress,
                           log_dir=tensorboard_dir(run, "domainfusion", f"{method}-{split.target}-seed{seed}"))


def cached_method(run: Run, method: str, split: DGSplit, seed: int, gen_state) -> dict:
    d = run.cfg.domainfusion
    parts = key_parts("dg-result", run.cfg, data=run.data.full.digest(), target=split.target, seed=seed,
                      method=method, generator=gen_state[1] if uses_generator(method) else None,
                      pretrained=path_digest(d.pretrained) if d.pretrained else None)

    def load(entry: Path) -> dict:
        tensors, meta = load_tensors(entry / "result.safetensors")
        return {"correct": tensors["correct"].bool(), **meta}

    def build(entry: Path) -> dict:
        out = train_method(run, method, split, seed, gen_state[0] if uses_generator(method) else None)
        meta = {k: v for k, v in out.items() if k != "correct"}
        save_tensors(entry / "result.safetensors", {"correct": out["correct"].to(torch.uint8)}, meta)
        run.cache.mark_done(entry, {"method": method, "target": split.target, "seed": seed})
        return out

    return run.cache.build_or_load("dg-result", parts, build, load, run.log)


@step("domainfusion", generative=True)
def step_domainfusion(run: Run) -> None:
    """Leave-one-domain-out: every method x target x seed; rows per method and target + average."""
    d = run.cfg.domainfusion
    full = run.data.full  # a domain dataset with these targets: fewgen.app.checks, before the run starts
    targets = d.targets or list(full.domain_names)
    seeds = list(run.cfg.seeds)
    correct = {m: {t: [] for t in targets} for m in d.methods}
    info = {m: {t: [] for t in targets} for m in d.methods}
    gen_seconds = {}
    needs_generator = any(uses_generator(m) for m in d.methods)
    shared = stable_diffusion_generator(run) if needs_generator and d.generator else None
    for target in targets:
        gen_state = None
        if needs_generator:
            gen_state = shared or source_generator(run, target)
            gen_seconds[target] = round(gen_state[2], 1)
        for seed in seeds:
            split = leave_one_domain_out(full, target, d.val_fraction, seed)
            for method in d.methods:
                out = cached_method(run, method, split, seed, gen_state)
                correct[method][target].append(out["correct"])
                info[method][target].append({k: v for k, v in out.items() if k != "correct"})
                run.log(f"[domainfusion] {method:12s} target {target:14s} seed {seed}: "
                        f"{float(out['correct'].double().mean() * 100):.2f}% (val {out['best_val']:.2f}% at epoch "
                        f"{out['best_epoch']}, {out['images_generated']} generated, {out['wall_s']}s)")
    rows = []
    for method in d.methods:
        per_target = {
            t: {"images_generated": round(sum(i["images_generated"] for i in info[method][t]) / len(seeds)),
                "wall_s": round(sum(i["wall_s"] for i in info[method][t]) / len(seeds), 1),
                "best_epochs": [i["best_epoch"] for i in info[method][t]],
                "source_val": round(sum(i["best_val"] for i in info[method][t]) / len(seeds), 3),
                "generator_train_s": gen_seconds.get(t, 0.0) if uses_generator(method) else 0.0}
            for t in targets}
        rows += dg_rows(method, correct[method], seeds, per_target, uses_synthetic=uses_generator(method))
    if run.dir is not None:
        write_json(run.dir / "domainfusion.json", {"info": info, "generator_train_s": gen_seconds,
                                                   "config": dataclasses.asdict(d)})
    run.add_rows(rows)
