"""Pipeline steps for few-shot GAN adaptation: ``gan-source`` and ``gan-adapt``.

``gan-source`` cuts the run's data into a source domain, the target's training shots and
held-out real target images (:func:`generation_setup`), and pretrains (or loads) the source
GAN. ``gan-adapt`` adapts it with every method in ``gan.methods`` for the same number of
iterations, tracks realism / intra-diversity / FID every ``gan.adapt.track_every`` iterations,
computes the final metrics (fewgen.evaluation.generative) and writes, in the run folder,
``gan/<method>_samples_seed<s>.png``, ``gan/curves.png``, ``gan/tracking.json`` and one
metrics row per method (``source`` = the unadapted GAN), means over the run's seeds (each
seed draws its own shots):

    {method, setup, n_shot, iters, n_samples, seeds, fid, kid, intra_diversity, realism,
     precision, recall, nearest_shot_distance, shot_spread, <each>_std, per_seed: {metric: [...]}}

with no ``accuracy`` / ``ci95`` keys (they are not classification results).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from fewgen.app.runner import Run, step
from fewgen.app.steps.core import tensorboard_dir
from fewgen.errors import FewgenError
from fewgen.gan.model import (
    AdaptSettings,
    Generator,
    adapt_gan,
    create_adapter,
    gan_adapt_settings,
    gan_arch,
    gan_train_settings,
    method_kwargs,
    pretrained_source_gan,
    sample,
)
from fewgen.gan.setup import GenerationSetup, generation_setup
from fewgen.keys import key_parts
from fewgen.reports.figures import plot_gan_curves as plot_curves
from fewgen.reports.grids import save_grid
from fewgen.reports.tables import format_generation_table
from fewgen.utils import content_digest, path_digest, write_json

METRIC_KEYS = ("fid", "kid", "intra_diversity", "realism", "precision", "recall", "nearest_shot_distance")


@step("gan-source", makes=("gan_source", "gan_setups"))
def step_gan_source(run: Run) -> None:
    gc = run.cfg.gan
    setups = {seed: generation_setup(gc, run.data, seed, run.cfg.name) for seed in run.cfg.seeds}
    for setup in setups.values():
        run.log(f"generation setup: {setup.description}")
    setup = setups[run.cfg.seeds[0]]  # the source images are the same for every seed
    arch = gan_arch(gc, setup.source.shape[1])
    src = pretrained_source_gan(setup.source, arch, gan_train_settings(gc), run.cache, run.log, run.device,
                                progress=run.progress, log_dir=tensorboard_dir(run, "gan-source"))
    run.state.gan_setups = setups
    run.state.gan_source = src
    if run.dir is not None:
        out = run.dir / "gan"
        for seed, st in setups.items():
            save_grid(st.shots, out / f"shots_seed{seed}.png")
        save_grid(sample(src.generator, 50, seed=0, device=run.device), out / "source_samples.png")
        write_json(out / "source_history.json", {"cache_key": src.key, "history": src.history,
                                                  "setup": setup.description})


def _metric_tools(run: Run, setup: GenerationSetup):
    """The metrics network (and its cache key) and the perceptual distance."""
    from fewgen.evaluation.generative import PerceptualDistance, load_feature_net

    gc = run.cfg.gan
    if gc.feature_net:
        net = load_feature_net(gc.feature_net, in_chans=setup.source.shape[1], backbone_name=run.cfg.backbone.name,
                               device=run.device, **run.cfg.backbone.kwargs)
        net_key = path_digest(gc.feature_net.removeprefix("clip:"))  # the weights' content, not their path
        backbone = net.backbone
    elif run.state.backbone is not None:
        pb = run.state.backbone
        net, net_key, backbone = load_feature_net(pb.backbone), pb.key, pb.backbone
    else:
        raise FewgenError("gan-adapt needs a metrics network: put 'pretrain' before it in pipeline, or set gan.feature_net")
    if gc.lpips_weights:
        distance = PerceptualDistance(lpips_weights=gc.lpips_weights)
    elif hasattr(backbone, "forward_maps"):
        distance = PerceptualDistance(backbone)
    else:
        raise FewgenError("intra-diversity needs a backbone with forward_maps or gan.lpips_weights=<LPIPS-AlexNet file>")
    return net, net_key, distance


@step("gan-adapt", needs=lambda cfg: ("gan_source",) if cfg.gan.feature_net else ("gan_source", "backbone"))
def step_gan_adapt(run: Run) -> None:
    from fewgen.evaluation.generative import RealismClassifier, embed

    gc = run.cfg.gan
    setups: dict[int, GenerationSetup] = run.state.gan_setups
    src = run.state.gan_source
    first = setups[run.cfg.seeds[0]]
    net, net_key, distance = _metric_tools(run, first)
    lpips_key = path_digest(gc.lpips_weights) if gc.lpips_weights else None
    out = run.dir / "gan" if run.dir is not None else None
    per_seed: dict[str, list[dict]] = {"source": [], **{m: [] for m in gc.methods}}
    tracking: dict[str, dict[int, list[dict]]] = {m: {} for m in gc.methods}
    for seed, setup in setups.items():
        # trained on real target images that are not this seed's shots, against real source images
        realism = RealismClassifier(net).fit(setup.target_eval, setup.source, seed=seed)
        run.log(f"seed {seed}: realism classifier (target vs source, real images): held-out balanced accuracy "
                f"{realism.holdout_accuracy:.3f}")
        real_feats = embed(net, setup.target_eval)
        track = _tracker(gc, setup, net, distance, realism, real_feats, seed, run.device)
        per_seed["source"].append(_final_metrics(gc, src.generator, setup, net, distance, realism, seed, run.device))
        settings = gan_adapt_settings(gc, seed)
        for name in gc.methods:
            method = create_adapter(name, **method_kwargs(gc, name))
            parts = key_parts("gan-adapted", run.cfg, source=src.key, shots=content_digest(setup.shots),
                              target=content_digest(setup.target_eval), method=name, seed=seed,
                              feature_net=net_key, lpips=lpips_key)
            result = _adapt_cached(run, method, src, setup, settings, parts, track)
            metrics = _final_metrics(gc, result.generator, setup, net, distance, realism, seed, run.device)
            per_seed[name].append(metrics)
            tracking[name][seed] = result.tracking
            run.log(f"seed {seed} {name}: " + "  ".join(f"{k} {metrics[k]:.4f}" for k in METRIC_KEYS))
            if out is not None:
                save_grid(sample(result.generator, 50, seed=seed, device=run.device),
                          out / f"{name}_samples_seed{seed}.png")
    rows = []
    for name, values in per_seed.items():
        row = {"method": name, "setup": run.cfg.name, "n_shot": gc.n_shots,
               "iters": 0 if name == "source" else gc.adapt.iters, "n_samples": gc.eval_samples,
               "seeds": list(setups), "uses_synthetic": True}  # metrics of generated images
        # no accuracy / ci95 keys: these rows are not classification results (reports skip them)
        for k in (*METRIC_KEYS, "shot_spread"):
            vals = [v[k] for v in values]
            row[k] = float(np.mean(vals))
            row[f"{k}_std"] = float(np.std(vals))
        row["per_seed"] = {k: [v[k] for v in values] for k in (*METRIC_KEYS, "kid_std")}
        rows.append(row)
    if out is not None:
        write_json(out / "tracking.json", {"setup": first.description, "track_every": gc.adapt.track_every,
                                           "tracking": tracking})
        plot_curves(tracking, out / "curves.png", title=first.description.split(";")[0])
        write_json(out / "generation.json", {"setup": first.description, "seeds": list(setups), "rows": rows})
    run.log(f"means over seeds {list(setups)}:\n" + format_generation_table(rows))
    run.add_rows(rows)


def _tracker(gc, setup: GenerationSetup, net, distance, realism, real_feats: torch.Tensor, seed: int, device):
    """Realism, intra-diversity and FID of ``gc.track_samples`` samples from fixed latents."""
    from fewgen.evaluation.generative import embed, fid_from_features, intra_cluster_diversity

    def track(G: Generator) -> dict:
        fake = sample(G, gc.track_samples, seed=seed + 1, device=device)
        return {"realism": float(realism.predict_proba(fake).mean()),
                "intra_diversity": intra_cluster_diversity(fake, setup.shots, distance)["intra_diversity"],
                "fid": fid_from_features(real_feats, embed(net, fake))}
    return track


def _final_metrics(gc, G: Generator, setup: GenerationSetup, net, distance, realism, seed: int, device) -> dict:
    from fewgen.evaluation.generative import generation_metrics

    fake = sample(G, gc.eval_samples, seed=seed + 2, device=device)
    return generation_metrics(fake, setup.shots, setup.target_eval, net, distance, realism,
                              kid_subset_size=gc.kid_subset_size, seed=seed)


def _adapt_cached(run: Run, method, src, setup: GenerationSetup, settings: AdaptSettings, parts: dict, track):
    from fewgen.checkpoint import load_model, save_model
    from fewgen.gan.model import AdaptResult, Discriminator
    from fewgen.utils import read_json

    arch = src.generator.arch

    def load(entry: Path) -> AdaptResult:
        G, D = Generator(arch), Discriminator(arch)
        load_model(entry / "generator.safetensors", G)
        load_model(entry / "discriminator.safetensors", D)
        info = read_json(entry / "history.json")
        return AdaptResult(G.to(run.device).eval(), D.to(run.device).eval(), info["history"], info["tracking"])

    def build(entry: Path) -> AdaptResult:
        result = adapt_gan(method, src, setup.shots, settings, entry, track, run.log, run.device,
                           progress=run.progress,
                           log_dir=tensorboard_dir(run, "gan-adapt", f"{method.name}-seed{settings.seed}"))
        save_model(entry / "generator.safetensors", result.generator, {"method": method.name})
        save_model(entry / "discriminator.safetensors", result.discriminator, {"method": method.name})
        write_json(entry / "history.json", {"history": result.history, "tracking": result.tracking})
        (entry / "state.safetensors").unlink(missing_ok=True)
        run.cache.mark_done(entry, {"iters": settings.iters})
        return result

    return run.cache.build_or_load("gan-adapted", parts, build, load, run.log, what=f"{method.name}: adapted GAN")


