"""Pipeline steps for few-shot GAN adaptation: ``gan-source`` and ``gan-adapt``.

``gan-source`` cuts the run's data into a source domain, the target's training shots and
held-out real target images (:func:`generation_setup`), and pretrains (or loads) the source
GAN. ``gan-adapt`` adapts it with every method in ``gan.methods`` for the same number of
iterations, tracks realism / intra-diversity / FID every ``gan.track_every`` iterations,
computes the final metrics (fewgen.evaluation.generative) and writes, in the run folder,
``gan/<method>_samples_seed<s>.png``, ``gan/curves.png``, ``gan/tracking.json`` and one
metrics row per method (``source`` = the unadapted GAN), means over the run's seeds (each
seed draws its own shots):

    {method, setup, n_shot, iters, n_samples, seeds, fid, kid, intra_diversity, realism,
     precision, recall, nearest_shot_distance, shot_spread, <each>_std, per_seed: {metric: [...]}}

with no ``accuracy`` / ``ci95`` keys (they are not classification results).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.generators.gan import (
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
from fewgen.keys import key_parts
from fewgen.pipeline import STEPS, Run
from fewgen.utils import content_digest, path_digest, write_json

METRIC_KEYS = ("fid", "kid", "intra_diversity", "realism", "precision", "recall", "nearest_shot_distance")


@dataclass
class GenerationSetup:
    """A few-shot generation task. All images uint8 (n, C, H, W) at the GAN's size.

    ``shots`` are the only target images any generator learns from; ``target_eval`` are
    other real target images (metrics and the realism classifier only).
    """

    name: str
    source: torch.Tensor
    shots: torch.Tensor
    target_eval: torch.Tensor
    description: str


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    x = images.float().div(255)
    mode = "area" if images.shape[-1] > size else "bilinear"
    out = F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))
    return (out.clamp(0, 1) * 255).round().to(torch.uint8)


def draw_shots(pool: ArrayDataset, n_shots: int, seed: int) -> torch.Tensor:
    """Indices of ``n_shots`` target images: one from each of ``n_shots`` random classes when there are
    that many classes, else ``n_shots`` random images."""
    g = torch.Generator().manual_seed(seed)
    if len(pool) < n_shots + 5:
        raise FewgenError(f"the target has {len(pool)} images; it needs n_shots ({n_shots}) plus at least 5 "
                          "held-out images for the metrics")
    present = [c for c, idx in enumerate(pool.indices_by_class()) if len(idx)]
    if len(present) >= n_shots:
        by_class = pool.indices_by_class()
        classes = [present[i] for i in torch.randperm(len(present), generator=g)[:n_shots].tolist()]
        return torch.stack([by_class[c][torch.randint(0, len(by_class[c]), (1,), generator=g)][0] for c in classes])
    return torch.randperm(len(pool), generator=g)[:n_shots]


def generation_setup(run: Run, seed: int) -> GenerationSetup:
    """Source / shots (drawn with the few-shot ``seed``) / held-out target from ``run.data`` as ``gan.setup`` says."""
    gc, data = run.cfg.gan, run.data
    full = data.full if data.full is not None else ArrayDataset.concat([data.base, data.val, data.novel])
    if gc.setup == "class-range":
        lo, hi = (gc.target_range + [None, None])[:2]
        if lo is None or hi is None or not 0 <= lo < hi <= full.num_classes:
            raise FewgenError(f"gan.target_range={gc.target_range} must be [first, end) class ids within "
                              f"[0, {full.num_classes}] of {data.name}")
        in_range = (full.labels >= lo) & (full.labels < hi)
        source, target = full.subset(in_range.logical_not().nonzero().squeeze(1)), full.subset(in_range.nonzero().squeeze(1))
        desc = f"{data.name}: target classes [{lo}, {hi}) ({hi - lo} classes), source the other {full.num_classes - hi + lo}"
    elif gc.setup == "domains":
        if not gc.source_domains or not gc.target_domain:
            raise FewgenError("gan.setup=domains needs gan.source_domains (a list) and gan.target_domain")
        if gc.target_domain in gc.source_domains:
            raise FewgenError(f"gan.target_domain {gc.target_domain!r} is also a source domain")
        source, target = full.select_domains(gc.source_domains), full.select_domains([gc.target_domain])
        desc = f"{data.name}: source {'+'.join(gc.source_domains)}, target {gc.target_domain}"
    elif gc.setup == "folder":
        if not gc.target_root:
            raise FewgenError("gan.setup=folder needs gan.target_root=<image folder, one subfolder per class>")
        from fewgen.data import load_dataset

        tdata = load_dataset("imagefolder", gc.target_root, gc.image_size, channels=full.image_shape[0])
        source, target = full, tdata.full
        desc = f"source {data.name}, target folder {gc.target_root}"
    else:
        raise FewgenError(f"unknown gan.setup {gc.setup!r}; use class-range, domains or folder")
    shot_idx = draw_shots(target, gc.n_shots, seed)
    keep = torch.ones(len(target), dtype=torch.bool)
    keep[shot_idx] = False
    size = gc.image_size
    name = run.cfg.name
    return GenerationSetup(name, _resize(source.images, size), _resize(target.images[shot_idx], size),
                           _resize(target.images[keep], size),
                           f"{desc}; {gc.n_shots} shots (seed {seed}), {int(keep.sum())} held-out target images")


def save_grid(images: torch.Tensor, path: Path, nrow: int = 10) -> None:
    """uint8 (n, C, H, W) -> one PNG grid."""
    import numpy as np
    from PIL import Image

    from fewgen.utils import atomic_path

    n, c, h, w = images.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + 1), nrow * (w + 1), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        grid[:, r * (h + 1): r * (h + 1) + h, col * (w + 1): col * (w + 1) + w] = images[i]
    arr = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(np.ascontiguousarray(arr)).save(tmp, format="PNG")


@STEPS.register("gan-source")
def step_gan_source(run: Run) -> None:
    gc = run.cfg.gan
    setups = {seed: generation_setup(run, seed) for seed in run.cfg.seeds}
    for setup in setups.values():
        run.log(f"generation setup: {setup.description}")
    setup = setups[run.cfg.seeds[0]]  # the source images are the same for every seed
    arch = gan_arch(gc, setup.source.shape[1])
    src = pretrained_source_gan(setup.source, arch, gan_train_settings(gc), run.cache, run.log, run.device)
    run.artifacts["gan_setups"] = setups
    run.artifacts["gan_source"] = src
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
    elif "backbone" in run.artifacts:
        pb = run.artifacts["backbone"]
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


@STEPS.register("gan-adapt")
def step_gan_adapt(run: Run) -> None:
    from fewgen.evaluation.generative import RealismClassifier, embed

    if "gan_source" not in run.artifacts:
        raise FewgenError("gan-adapt needs a source GAN: put 'gan-source' before it in pipeline")
    gc = run.cfg.gan
    setups: dict[int, GenerationSetup] = run.artifacts["gan_setups"]
    src = run.artifacts["gan_source"]
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
            entry = run.cache.entry("gan-adapted", parts)
            result = _adapt_cached(run, method, src, setup, settings, entry, track)
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
               "iters": 0 if name == "source" else gc.adapt_iters, "n_samples": gc.eval_samples,
               "seeds": list(setups), "uses_synthetic": True}  # metrics of generated images
        # no accuracy / ci95 keys: these rows are not classification results (reports skip them)
        for k in (*METRIC_KEYS, "shot_spread"):
            vals = [v[k] for v in values]
            row[k] = float(np.mean(vals))
            row[f"{k}_std"] = float(np.std(vals))
        row["per_seed"] = {k: [v[k] for v in values] for k in (*METRIC_KEYS, "kid_std")}
        rows.append(row)
    if out is not None:
        write_json(out / "tracking.json", {"setup": first.description, "track_every": gc.track_every,
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


def _adapt_cached(run: Run, method, src, setup: GenerationSetup, settings: AdaptSettings, entry: Path, track):
    from fewgen.checkpoint import load_model, save_model
    from fewgen.generators.gan import AdaptResult, Discriminator
    from fewgen.utils import read_json

    arch = src.generator.arch
    if run.cache.ready(entry, run.log):
        G, D = Generator(arch), Discriminator(arch)
        load_model(entry / "generator.safetensors", G)
        load_model(entry / "discriminator.safetensors", D)
        info = read_json(entry / "history.json")
        run.log(f"{method.name}: adapted GAN from cache {entry}")
        return AdaptResult(G.to(run.device).eval(), D.to(run.device).eval(), info["history"], info["tracking"])
    result = adapt_gan(method, src, setup.shots, settings, entry, track, run.log, run.device)
    save_model(entry / "generator.safetensors", result.generator, {"method": method.name})
    save_model(entry / "discriminator.safetensors", result.discriminator, {"method": method.name})
    write_json(entry / "history.json", {"history": result.history, "tracking": result.tracking})
    (entry / "state.safetensors").unlink(missing_ok=True)
    run.cache.mark_done(entry, {"iters": settings.iters})
    return result


def format_generation_table(rows: list[dict]) -> str:
    """Mean +- std over seeds of each metric, one line per method."""
    cols = ["method", "fid", "kid", "intra_diversity", "realism", "precision", "recall", "nearest_shot_distance"]
    head = ["method", "FID", "KID", "intra-div", "realism", "prec", "recall", "near-shot"]
    lines = [head]
    for r in rows:
        cells = [r["method"]]
        for c in cols[1:]:
            v, sd = r.get(c), r.get(f"{c}_std")
            digits = 2 if c in ("fid", "kid") else 3
            cell = "-" if v is None else f"{v:.{digits}f}"
            if v is not None and sd is not None and len(r.get("seeds", [])) > 1:
                cell += f"+-{sd:.{digits}f}"
            cells.append(cell)
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines)


def plot_curves(tracking: dict[str, dict[int, list[dict]]], path: Path, title: str = "") -> None:
    """Realism, intra-diversity and FID against adaptation iterations: per method the mean over
    seeds (line) and the range (band)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fewgen.utils import atomic_path

    keys = [("realism", "realism (P(target))"), ("intra_diversity", "intra-cluster diversity"), ("fid", "FID")]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4))
    for ax, (k, label) in zip(axes, keys):
        for method, by_seed in tracking.items():
            runs = [pts for pts in by_seed.values() if pts]
            if not runs:
                continue
            xs = [p["iter"] for p in runs[0]]
            vals = np.array([[p[k] for p in pts] for pts in runs if len(pts) == len(xs)])
            line, = ax.plot(xs, vals.mean(0), marker="o", ms=3, label=method)
            if len(vals) > 1:
                ax.fill_between(xs, vals.min(0), vals.max(0), color=line.get_color(), alpha=0.15)
        ax.set_xlabel("adaptation iteration")
        ax.set_title(label, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
