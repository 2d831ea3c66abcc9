"""Pipeline steps of the generator stage: ``generator``, ``adapt``, ``synthesize``.

* ``generator``: train (or load from the cache, or resume) the base generator on
  ``run.data.base`` (class-token or exemplar-conditioned); ``run.state.generator``. With
  ``generator.kind=stable-diffusion`` it loads the pipeline named by ``generator.model`` instead.
* ``adapt``: per seed in ``cfg.seeds`` and K in ``cfg.eval.n_shots``, DataDream LoRA on
  ``few_shot_set(novel, K, seed)`` only; ``run.state.adapters[(seed, K)]``.
* ``synthesize``: ``run.state.synthetic[(seed, K)]``, an ArrayDataset of
  ``synthesis.synthetic_per_class`` images per novel class, labels indexing
  ``run.data.novel.class_names``, same shape as the real images; with
  ``synthesis.zero_shot=true`` the unadapted base generator draws them from the class names.
  Real-vs-synthetic grids go to ``<run>/grids/``.
"""

from __future__ import annotations

import torch

from fewgen.app.runner import Run, step
from fewgen.app.steps.core import tensorboard_dir
from fewgen.data.base import ArrayDataset
from fewgen.data.fewshot import few_shot_set
from fewgen.generators.sampling import sampling_streams
from fewgen.keys import key_parts
from fewgen.reports.grids import write_grids
from fewgen.synthesis.sharding import process_context
from fewgen.utils import write_json

#: values of generator.kind


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


def reads_backbone(cfg) -> bool:
    """Whether the generator reads exemplars through the pretrained backbone."""
    return cfg.generator.kind == "exemplar" and cfg.generator.exemplar_cond != "channels"


def _encoder(run: Run):
    """The frozen pretrained backbone an exemplar generator reads its exemplars with (None for the
    class-token generator and for exemplar_cond=channels)."""
    return run.state.backbone if reads_backbone(run.cfg) else None


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
                          state_path=entry / "training_state.safetensors", log=run.log, log_every=100,
                          progress=run.progress, log_dir=tensorboard_dir(run, "generator"))
            gen.save(entry, {"steps": g.train_steps})
            (entry / "training_state.safetensors").unlink(missing_ok=True)
            run.cache.mark_done(entry, {"steps": g.train_steps, "images_per_s": round(res.images_per_s, 1),
                                        "train_s": round(res.seconds, 1)})
        ctx.barrier()
        gen = load()
    gen.trained_key = key
    return gen


@step("generator", needs=lambda cfg: ("backbone",) if reads_backbone(cfg) else (), makes=("generator",),
      generative=True)
def step_generator(run: Run) -> None:
    g = run.cfg.generator
    if g.kind == "stable-diffusion":
        from fewgen.generators.stable_diffusion import StableDiffusionGenerator

        run.state.generator = StableDiffusionGenerator(g.model, device=run.device, dtype=g.dtype, prompt=g.prompt,
                                                       resolution=g.resolution, attention_slicing=g.attention_slicing,
                                                       vae_slicing=g.vae_slicing, compile=g.compile)
        return
    run.state.generator = train_or_load_generator(run)


# ----------------------------------------------------------------------------- adapt


def datadream_config(run: Run):
    from fewgen.generators.datadream import DataDreamConfig

    g = run.cfg.generator
    return DataDreamConfig(mode=g.adapt_mode, rank=g.lora_rank, alpha=float(g.lora_rank),
                           steps_per_class=g.adapt_steps_per_class, batch_size=g.adapt_batch_size, lr=g.adapt_lr,
                           seed=g.seed)


@step("adapt", needs=("generator",), makes=("adapters",), generative=True)
def step_adapt(run: Run) -> None:
    gen = run.state.generator
    dd = datadream_config(run)
    ctx = process_context()
    for seed in run.cfg.seeds:
        for k in run.cfg.eval.n_shots:
            few = few_shot_set(run.data.novel, k, seed)
            parts = key_parts("adapters", run.cfg, generator=gen.state_key(), few_shot=few.digest())
            entry = run.cache.entry("adapters", parts)
            run.state.adapters[(seed, k)] = gen.adapt(few, dd, entry, run.cache, ctx, run.log, progress=run.progress,
                                                      log_dir=tensorboard_dir(run, "adapt", f"seed{seed}-{k}shot"))
            run.state.adapter_entries.append(entry)


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
    from fewgen.synthesis.store import synthesis_spec

    novel = run.data.novel
    return synthesis_spec(run.cfg.synthesis, run.cfg.generator, generator=gen.state_key(),
                          adapter=None if adapter is None else adapter.key, class_names=list(novel.class_names),
                          image_shape=list(novel.image_shape),
                          stable_diffusion=gen.kind == "stable-diffusion",
                          sources=None if few_shot is None else few_shot.digest())


@step("synthesize", needs=("generator",), makes=("synthetic",), generative=True)
def step_synthesize(run: Run) -> None:
    from fewgen.synthesis.store import SynthesisCache

    gen, s = run.state.generator, run.cfg.synthesis
    exemplar = gen.kind == "exemplar-diffusion"
    zero_shot = s.zero_shot or not run.state.adapters
    if zero_shot and not s.zero_shot and not exemplar:
        run.log("no adapters in this run: synthesizing zero-shot from the class names (synthesis.zero_shot)")
    ctx = process_context()
    store = SynthesisCache(run.cache)
    info = {}
    for seed in run.cfg.seeds:
        for k in run.cfg.eval.n_shots:
            adapter = None if zero_shot else run.state.adapters[(seed, k)]
            few = few_shot_set(run.data.novel, k, seed)
            sources = [few.images[ix] for ix in few.indices_by_class()]
            spec = run_synthesis_spec(run, gen, adapter, few)
            streams = sampling_streams(s.streams, gen.device) if gen.parallel_sampling else 1
            if store.cache.is_done(store.path(spec)):
                streams = 1  # a cached set: no model copies; a corrupt file is regenerated in one stream
            elif streams > 1:
                run.log(f"sampling seed {seed}, {k}-shot in {streams} parallel streams (synthesis.streams)")
            fns = [gen.synthesis_sample_fn(spec, adapter, run.data.novel.image_shape, sources) for _ in range(streams)]
            ds = store.synthesize(spec, fns, ctx, run.log, progress=run.progress)
            ds.name = f"synthetic/{synthesis_label(run, exemplar, adapter)}/s{seed}-k{k}"
            run.state.synthetic[(seed, k)] = ds
            info[f"seed{seed}_{k}shot"] = {"key": store.key(spec), "path": str(store.path(spec)), "images": len(ds)}
            if run.dir is not None and ctx.is_main and s.grid_classes > 0:
                write_grids(run.dir / "grids" / f"seed{seed}_{k}shot", few, ds, s.grid_classes)
    run.state.synthetic_kind = "generated"
    if run.dir is not None and ctx.is_main:
        write_json(run.dir / "synthetic_sets.json", info)
