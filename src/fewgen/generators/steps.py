"""Pipeline steps of the generator stage: ``generator``, ``adapt``, ``synthesize``.

* ``generator``: train (or load from the cache, or resume) the base generator on
  ``run.data.base``; ``run.artifacts["generator"]``. With ``generator.kind=stable-diffusion``
  it loads the pipeline named by ``generator.model`` instead.
* ``adapt``: per seed in ``cfg.seeds`` and K in ``cfg.eval.n_shots``, DataDream LoRA on
  ``few_shot_set(novel, K, seed)`` only; ``run.artifacts["adapters"][(seed, K)]``.
* ``synthesize``: ``run.artifacts["synthetic"][(seed, K)]``, an ArrayDataset of
  ``synthesis.synthetic_per_class`` images per novel class, labels indexing
  ``run.data.novel.class_names``, same shape as the real images; with
  ``synthesis.zero_shot=true`` the unadapted base generator draws them from the class names.
  Real-vs-synthetic grids go to ``<run>/grids/``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.keys import key_parts
from fewgen.pipeline import STEPS, Run
from fewgen.synthesis.sharding import process_context
from fewgen.utils import write_json

#: values of generator.kind
GENERATOR_KINDS = ("diffusion", "exemplar", "stable-diffusion")


def generator_parts(run: Run, encoder_key: str | None = None) -> dict:
    """Cache-key parts of the base generator: its config, the content of the base images and, for
    an exemplar generator conditioned on features, the backbone's key."""
    return key_parts("generators", run.cfg, base=run.data.base.digest(), encoder=encoder_key)


def _norm_groups(channels: list[int]) -> int:
    return 8 if min(channels) % 8 == 0 else 1


def diffusion_config(run: Run):
    from fewgen.generators.diffusion import DiffusionConfig

    g = run.cfg.generator
    c, s = run.data.base.image_shape[0], run.data.base.image_shape[1]
    return DiffusionConfig(image_size=s, channels=c, block_out_channels=list(g.block_out_channels),
                           attention_levels=list(g.attention_levels), cond_dim=g.cond_dim, cond_mode=g.cond_mode,
                           norm_num_groups=_norm_groups(g.block_out_channels))


def exemplar_config(run: Run, feat_dim: int):
    from fewgen.generators.exemplar import ExemplarConfig

    g = run.cfg.generator
    c, s = run.data.base.image_shape[0], run.data.base.image_shape[1]
    return ExemplarConfig(image_size=s, channels=c, block_out_channels=list(g.block_out_channels),
                          attention_levels=list(g.attention_levels), norm_num_groups=_norm_groups(g.block_out_channels),
                          cond_mode=g.exemplar_cond, cond_dim=g.cond_dim, n_tokens=g.exemplar_tokens,
                          feat_dim=feat_dim, p_uncond=g.exemplar_dropout, t_dist=g.exemplar_t_dist,
                          exemplar_aug=g.exemplar_aug, pair_aug=g.exemplar_pair_aug, rotations=g.exemplar_rotations)


def _encoder(run: Run):
    """The frozen pretrained backbone an exemplar generator reads its exemplars with (None for the
    class-token generator and for exemplar_cond=channels)."""
    g = run.cfg.generator
    if g.kind != "exemplar" or g.exemplar_cond == "channels":
        return None
    if "backbone" not in run.artifacts:
        raise FewgenError(f"generator.kind=exemplar with exemplar_cond={g.exemplar_cond} reads exemplars with the "
                          "pretrained backbone: put 'pretrain' before 'generator' in pipeline (or use "
                          "generator.exemplar_cond=channels)")
    return run.artifacts["backbone"]


def train_or_load_generator(run: Run):
    """The base pixel generator for the run's data and config (class-token or exemplar), through the
    artifact cache."""
    from fewgen.generators.diffusion import DiffusionGenerator
    from fewgen.generators.exemplar import ExemplarDiffusion

    g = run.cfg.generator
    pb = _encoder(run)
    encoder = None if pb is None else pb.backbone
    parts = generator_parts(run, None if pb is None else pb.key)
    entry = run.cache.entry("generators", parts)
    key = run.cache.key(parts)

    def load():
        if g.kind == "exemplar":
            return ExemplarDiffusion.load(entry, encoder, run.device)
        return DiffusionGenerator.load(entry, run.device)

    if run.cache.ready(entry, run.log):
        gen = load()
        run.log(f"generator from cache {entry}")
    else:
        ctx = process_context()
        if ctx.is_main:
            torch.manual_seed(g.seed)
            if g.kind == "exemplar":
                feat_dim = getattr(encoder, "num_features", 0) if encoder is not None else g.cond_dim
                gen = ExemplarDiffusion(exemplar_config(run, feat_dim), encoder, run.device)
                what = f"exemplar-conditioned ({g.exemplar_cond}) diffusion generator"
            else:
                gen = DiffusionGenerator(diffusion_config(run), run.data.base.class_names, run.device)
                what = "base diffusion generator"
            run.log(f"training the {what} ({gen.num_parameters() / 1e6:.2f}M parameters) for {g.train_steps} steps "
                    f"on {len(run.data.base)} base images")
            res = gen.fit(run.data.base, steps=g.train_steps, batch_size=g.batch_size, lr=g.lr, seed=g.seed,
                          state_path=entry / "training_state.safetensors", log=run.log, log_every=100)
            gen.save(entry, {"steps": g.train_steps})
            (entry / "training_state.safetensors").unlink(missing_ok=True)
            run.cache.mark_done(entry, {"steps": g.train_steps, "images_per_s": round(res.images_per_s, 1),
                                        "train_s": round(res.seconds, 1)})
        ctx.barrier()
        gen = load()
    gen.trained_key = key
    return gen


@STEPS.register("generator", generative=True)
def step_generator(run: Run) -> None:
    g = run.cfg.generator
    if g.kind == "stable-diffusion":
        from fewgen.generators.stable_diffusion import StableDiffusionGenerator

        if not g.model:
            raise FewgenError("generator.kind=stable-diffusion needs generator.model=<local folder or hub id>")
        run.artifacts["generator"] = StableDiffusionGenerator(g.model, device=run.device, dtype=g.dtype,
                                                              prompt=g.prompt, resolution=g.resolution)
        return
    run.artifacts["generator"] = train_or_load_generator(run)


# ----------------------------------------------------------------------------- adapt


def datadream_config(run: Run):
    from fewgen.generators.datadream import DataDreamConfig

    g = run.cfg.generator
    return DataDreamConfig(mode=g.adapt_mode, rank=g.lora_rank, alpha=float(g.lora_rank),
                           steps_per_class=g.adapt_steps_per_class, batch_size=g.adapt_batch_size, lr=g.adapt_lr,
                           seed=g.seed)


def _need_generator(run: Run, step: str):
    if "generator" not in run.artifacts:
        raise FewgenError(f"the {step} step needs a generator: put 'generator' before it in pipeline")
    return run.artifacts["generator"]


@STEPS.register("adapt", generative=True)
def step_adapt(run: Run) -> None:
    from fewgen.data.fewshot import few_shot_set

    gen = _need_generator(run, "adapt")
    dd = datadream_config(run)
    ctx = process_context()
    adapters = run.artifacts.setdefault("adapters", {})
    for seed in run.cfg.seeds:
        for k in run.cfg.eval.n_shots:
            few = few_shot_set(run.data.novel, k, seed)
            parts = key_parts("adapters", run.cfg, generator=gen.state_key(), few_shot=few.digest())
            entry = run.cache.entry("adapters", parts)
            adapters[(seed, k)] = gen.adapt(few, dd, entry, run.cache, ctx, run.log) \
                if hasattr(gen, "adapt") else _adapt_pixel(run, gen, few, dd, entry, ctx)
            run.artifacts.setdefault("adapter_entries", []).append(entry)


def _adapt_pixel(run: Run, gen, few, dd, entry: Path, ctx):
    from fewgen.generators.datadream import DataDreamAdapter, train_datadream
    from fewgen.generators.exemplar import train_exemplar_datadream

    if run.cache.ready(entry, run.log):
        run.log(f"DataDream {dd.mode} adapter from cache {entry}")
        return DataDreamAdapter.load(entry)
    run.log(f"DataDream {dd.mode}: {few.num_classes} classes x {len(few) // few.num_classes} shots, "
            f"{dd.steps_per_class * few.num_classes} steps in total")
    train = train_exemplar_datadream if gen.kind == "exemplar-diffusion" else train_datadream
    t0 = time.time()
    adapter = train(gen, few, dd, ctx, run.log)
    if ctx.is_main:
        adapter.save(entry)
        run.cache.mark_done(entry, {"mode": dd.mode, "classes": few.num_classes, "train_s": round(time.time() - t0, 1)})
    ctx.barrier()
    return adapter


# ----------------------------------------------------------------------------- synthesize


def synthesis_label(run: Run, exemplar: bool, adapter) -> str:
    """A short name of how a set was made (dataset names, logs)."""
    s, g = run.cfg.synthesis, run.cfg.generator
    how = f"sdedit{'+'.join(f'{v:g}' for v in s.sdedit_strengths)}" if s.sdedit_strengths else "noise"
    if exemplar:
        return f"exemplar-{g.exemplar_cond}-{how}" + ("" if adapter is None else f"-datadream-{g.adapt_mode}")
    return f"{'zero-shot' if adapter is None else 'datadream-' + g.adapt_mode}-{how}"


def run_synthesis_spec(run: Run, gen, adapter=None, few_shot: ArrayDataset | None = None):
    """The spec of one synthetic set of this run: the synthesis config, the generator and adapter
    keys, the novel classes and the few-shot set SDEdit starts from (``fewgen.keys``, kind
    ``synthetic``)."""
    from fewgen.synthesis.cache import synthesis_spec

    novel = run.data.novel
    return synthesis_spec(run.cfg.synthesis, run.cfg.generator, generator=gen.state_key(),
                          adapter=None if adapter is None else adapter.key, class_names=list(novel.class_names),
                          image_shape=list(novel.image_shape),
                          stable_diffusion=getattr(gen, "kind", "") == "stable-diffusion",
                          sources=None if few_shot is None else few_shot.digest())


def pixel_sample_fn(gen, spec, adapter=None, sources: list[torch.Tensor] | None = None):
    """sample_fn(class index, seeds, image indices) for the synthesis cache: the adapted generator
    (class tokens + LoRA) or the base one from class names (zero-shot); from pure noise, or SDEdit
    from ``sources[c]`` (class c's shots, uint8 (K, C, H, W)) when ``spec.strengths`` is set."""
    from fewgen.generators.datadream import AdaptedDiffusion
    from fewgen.synthesis.cache import sdedit_or_sample

    if adapter is not None:
        adapted = AdaptedDiffusion(gen, adapter)
        model, labels, use_class = adapted.gen, adapted.labels, True
    else:
        import copy

        if not gen.conditioner.use_name:
            raise FewgenError("zero-shot synthesis needs a name-conditioned generator (generator.cond_mode=name or "
                              "class+name); or adapt it first (put 'adapt' before 'synthesize')")
        adapted = None
        model = copy.deepcopy(gen)
        labels, use_class = model.add_classes(spec.class_names), False
    kw = {"steps": spec.steps, "guidance": spec.guidance, "sampler": spec.sampler, "batch_size": spec.chunk,
          "precision": spec.precision, "use_class": use_class}

    def fn(c, seeds, indices):
        if adapted is not None:
            adapted.use(c)
        return sdedit_or_sample(
            spec, None if sources is None else sources[c], seeds, indices,
            sample=lambda s: model.sample([labels[c]] * len(s), seeds=list(s), **kw),
            img2img=lambda x, strength, s: model.img2img(x, [labels[c]] * len(x), strength=strength, seeds=list(s),
                                                          **kw))
    return fn


def exemplar_sample_fn(gen, spec, adapter=None, sources: list[torch.Tensor] | None = None):
    """sample_fn(class index, seeds, image indices) of an exemplar generator: image i of class c is
    conditioned on its shot ``sources[c][i mod K]`` (or, ``exemplar_condition=mean``, on the mean
    feature of the class's shots) and starts from pure noise or, with ``spec.strengths``, from
    that shot noised to its strength (SDEdit)."""
    from fewgen.generators.exemplar import AdaptedExemplar

    if sources is None:
        raise FewgenError("the exemplar generator draws from the shots: give each class's shots")
    import copy

    model = copy.deepcopy(gen) if adapter is None else AdaptedExemplar(gen, adapter)  # one copy per stream
    mean = spec.extra.get("exemplar_condition") == "mean"

    def fn(c, seeds, indices):
        if adapter is not None:
            model.use(c)
        shots = sources[c]
        starts = [spec.start(i, len(shots)) for i in indices]
        exemplars = shots[torch.tensor([j for j, _ in starts])]
        feats = None
        if mean and gen.cfg.uses_features:
            from fewgen.generators.diffusion import to_model_space

            feats = model.gen.encode(to_model_space(shots)) if adapter is not None else model.encode(to_model_space(shots))
            feats = feats.mean(0, keepdim=True).expand(len(seeds), -1)
        return model.sdedit(exemplars, [1.0 if s is None else s for _, s in starts], list(seeds), steps=spec.steps,
                            guidance=spec.guidance, sampler=spec.sampler, precision=spec.precision,
                            batch_size=spec.chunk, feats=feats)
    return fn


def sampling_streams(streams: int | None, device) -> int:
    """Parallel sampling streams for the pixel generator: ``streams`` if given, else one per torch
    CPU thread (at most 8) on CPU and 1 on GPU."""
    if streams is not None:
        if streams < 1:
            raise FewgenError(f"synthesis.streams must be >= 1, got {streams}")
        return streams
    return 1 if torch.device(device).type != "cpu" else max(1, min(8, torch.get_num_threads()))


@STEPS.register("synthesize", generative=True)
def step_synthesize(run: Run) -> None:
    from fewgen.data.fewshot import few_shot_set
    from fewgen.synthesis.cache import SynthesisCache

    gen = _need_generator(run, "synthesize")
    s = run.cfg.synthesis
    exemplar = getattr(gen, "kind", "") == "exemplar-diffusion"
    zero_shot = s.zero_shot or "adapters" not in run.artifacts
    if zero_shot and not s.zero_shot and not exemplar:
        run.log("no adapters in this run: synthesizing zero-shot from the class names (synthesis.zero_shot)")
    ctx = process_context()
    store = SynthesisCache(run.cache)
    out = run.artifacts.setdefault("synthetic", {})
    info = {}
    for seed in run.cfg.seeds:
        for k in run.cfg.eval.n_shots:
            adapter = None if zero_shot else run.artifacts["adapters"][(seed, k)]
            few = few_shot_set(run.data.novel, k, seed)
            sources = [few.images[ix] for ix in few.indices_by_class()]
            spec = run_synthesis_spec(run, gen, adapter, few)
            if hasattr(gen, "synthesis_sample_fn"):
                fn = gen.synthesis_sample_fn(spec, adapter, run.data.novel.image_shape, sources)
            else:
                streams = sampling_streams(s.streams, gen.device)
                if store.cache.is_done(store.path(spec)):
                    streams = 1  # a cached set: no model copies; a corrupt file is regenerated in one stream
                elif streams > 1:
                    run.log(f"sampling seed {seed}, {k}-shot in {streams} parallel streams (synthesis.streams)")
                make = exemplar_sample_fn if exemplar else pixel_sample_fn
                fn = [make(gen, spec, adapter, sources) for _ in range(streams)]
            ds = store.synthesize(spec, fn, ctx, run.log)
            ds.name = f"synthetic/{synthesis_label(run, exemplar, adapter)}/s{seed}-k{k}"
            out[(seed, k)] = ds
            info[f"seed{seed}_{k}shot"] = {"key": store.key(spec), "path": str(store.path(spec)), "images": len(ds)}
            if run.dir is not None and ctx.is_main and s.grid_classes > 0:
                write_grids(run.dir / "grids" / f"seed{seed}_{k}shot", few, ds, s.grid_classes)
    run.artifacts["synthetic_kind"] = "generated"
    if run.dir is not None and ctx.is_main:
        write_json(run.dir / "synthetic_sets.json", info)


# ----------------------------------------------------------------------------- grids


def image_grid(rows: list[torch.Tensor], pad: int = 2) -> torch.Tensor:
    """Rows of uint8 images (n_i, C, H, W) -> one uint8 image (C, H', W'), rows left-aligned."""
    c, h, w = rows[0].shape[1:]
    n_cols = max(len(r) for r in rows)
    grid = torch.full((c, len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = im
    return grid


def write_grids(folder: Path, few_shot: ArrayDataset, synthetic: ArrayDataset, n_classes: int,
                per_row: int = 10) -> list[Path]:
    """One PNG per novel class (first ``n_classes``): the real shots in the top row, synthetic
    images below; plus ``overview.png`` with one row per class (shots | a gap | synthetic)."""
    from fewgen.synthesis.cache import write_png

    folder.mkdir(parents=True, exist_ok=True)
    real_by, syn_by = few_shot.indices_by_class(), synthetic.indices_by_class()
    written, overview = [], []
    gap = torch.full((1, *few_shot.image_shape), 255, dtype=torch.uint8)
    for c in range(min(n_classes, few_shot.num_classes)):
        real, syn = few_shot.images[real_by[c]], synthetic.images[syn_by[c]]
        rows = [real] + [syn[i:i + per_row] for i in range(0, len(syn), per_row)]
        name = few_shot.class_names[c].replace("/", "_")
        path = folder / f"{c:04d}_{name}.png"
        write_png(path, image_grid(rows))
        written.append(path)
        overview.append(torch.cat([real, gap, syn[:per_row]]))
    if overview:
        write_png(folder / "overview.png", image_grid(overview))
        written.append(folder / "overview.png")
    return written


__all__ = ["step_generator", "step_adapt", "step_synthesize", "write_grids"]
