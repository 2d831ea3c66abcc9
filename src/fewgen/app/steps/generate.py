"""Pipeline steps of the generator stage: ``generator``, ``adapt``, ``synthesize``.

* ``generator``: train (or load from the cache, or resume) the base generator on
  ``run.data.base`` (class-token or exemplar-conditioned); ``run.state.generator``. With
  ``generator.kind=stable-diffusion`` it loads the pipeline named by ``generator.stable_diffusion.model`` instead.
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
from fewgen.generators.registry import generator_kind
from fewgen.generators.sampling import sampling_streams
from fewgen.keys import key_parts
from fewgen.reports.grids import write_grids
from fewgen.synthesis.sharding import process_context
from fewgen.utils import write_json


def generator_parts(run: Run, encoder_key: str | None = None) -> dict:
    """Cache-key parts of the base generator: its config, the content of the base images and, for
    an exemplar generator conditioned on features, the backbone's key."""
    return key_parts("generators", run.cfg, base=run.data.base.digest(), encoder=encoder_key)


def reads_backbone(cfg) -> bool:
    """Whether the generator reads exemplars through the pretrained backbone."""
    return generator_kind(cfg.generator.kind).uses_backbone(cfg.generator)


def _encoder(run: Run):
    """The frozen pretrained backbone the generator reads its exemplars with (None for a generator
    that reads none)."""
    return run.state.backbone if reads_backbone(run.cfg) else None


def train_or_load_generator(run: Run):
    """The base generator of the run's kind, trained on the base classes, through the artifact cache."""
    kind = generator_kind(run.cfg.generator.kind)
    options = kind.section(run.cfg.generator)
    cls = kind.generator_class()
    pb = _encoder(run)
    encoder = None if pb is None else pb.backbone
    parts = generator_parts(run, None if pb is None else pb.key)

    def build(entry):
        ctx = process_context()
        if ctx.is_main:
            torch.manual_seed(options.seed)
            gen = cls.from_options(options, run.data.base, encoder, run.device)
            fit = options.fit_arguments()
            steps = f" for {fit['steps']} steps" if "steps" in fit else ""
            run.log(f"training the {kind.name} generator ({gen.num_parameters() / 1e6:.2f}M parameters){steps} on "
                    f"{len(run.data.base)} base images")
            res = gen.fit(run.data.base, **fit, state_path=entry / "training_state.safetensors", log=run.log,
                          log_every=100, progress=run.progress, log_dir=tensorboard_dir(run, "generator"))
            gen.save(entry, {"steps": res.steps})
            (entry / "training_state.safetensors").unlink(missing_ok=True)
            run.cache.mark_done(entry, {"steps": res.steps, "images_per_s": round(res.images_per_s, 1),
                                        "train_s": round(res.seconds, 1)})
        ctx.barrier()

    gen = run.cache.build_or_load("generators", parts, build, lambda entry: cls.load_trained(entry, encoder, run.device),
                                  run.log, what="generator")
    gen.trained_key = run.cache.key(parts)
    return gen


@step("generator", needs=lambda cfg: ("backbone",) if reads_backbone(cfg) else (), makes=("generator",),
      generative=True)
def step_generator(run: Run) -> None:
    kind = generator_kind(run.cfg.generator.kind)
    if kind.pretrained:
        run.state.generator = kind.generator_class().from_options(kind.section(run.cfg.generator), run.device)
    else:
        run.state.generator = train_or_load_generator(run)


# ----------------------------------------------------------------------------- adapt


@step("adapt", needs=("generator",), makes=("adapters",), generative=True)
def step_adapt(run: Run) -> None:
    gen = run.state.generator
    dd = run.cfg.generator.datadream
    ctx = process_context()
    for seed in run.cfg.seeds:
        for k in run.cfg.eval.n_shots:
            few = few_shot_set(run.data.novel, k, seed)
            parts = key_parts("adapters", run.cfg, generator=gen.state_key(), few_shot=few.digest())
            run.state.adapters[(seed, k)] = gen.adapt(few, dd, run.cache, parts, ctx, run.log, progress=run.progress,
                                                      log_dir=tensorboard_dir(run, "adapt", f"seed{seed}-{k}shot"))
            run.state.adapter_entries.append(run.cache.entry("adapters", parts))


# ----------------------------------------------------------------------------- synthesize


def synthesis_label(run: Run, exemplar: bool, adapter) -> str:
    """A short name of how a set was made (dataset names, logs)."""
    s, g = run.cfg.synthesis, run.cfg.generator
    if not generator_kind(g.kind).sampled:  # no sampler: its name says how
        return g.kind
    how = f"sdedit{'+'.join(f'{v:g}' for v in s.sdedit_strengths)}" if s.sdedit_strengths else "noise"
    if exemplar:
        return f"exemplar-{g.exemplar.cond}-{how}" + ("" if adapter is None else f"-datadream-{g.datadream.mode}")
    return f"{'zero-shot' if adapter is None else 'datadream-' + g.datadream.mode}-{how}"


def run_synthesis_spec(run: Run, gen, adapter=None, few_shot: ArrayDataset | None = None):
    """The spec of one synthetic set of this run: the synthesis config, the generator and adapter
    keys, the novel classes and the few-shot set SDEdit starts from (``fewgen.keys``, kind
    ``synthetic``)."""
    from fewgen.synthesis.store import synthesis_spec

    novel = run.data.novel
    return synthesis_spec(run.cfg.synthesis, run.cfg.generator, generator=gen.state_key(),
                          adapter=None if adapter is None else adapter.key, class_names=list(novel.class_names),
                          image_shape=list(novel.image_shape),
                          stable_diffusion=generator_kind(gen.kind).prompted,
                          sources=None if few_shot is None else few_shot.digest())


@step("synthesize", needs=("generator",), makes=("synthetic",), generative=True)
def step_synthesize(run: Run) -> None:
    from fewgen.synthesis.store import SynthesisCache

    gen, s = run.state.generator, run.cfg.synthesis
    exemplar = generator_kind(gen.kind).exemplar
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
