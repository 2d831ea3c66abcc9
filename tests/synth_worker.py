"""A tiny generation job run in subprocesses by test_synthesis_cache.py (kill -9 resume, 2 processes).

usage: python synth_worker.py CACHE_DIR [--slow] [--sampler ddim] [--prompt-suffix X]
"""

from __future__ import annotations

import argparse
import time

import torch

from fewgen.data.base import ArrayDataset
from fewgen.generators.datadream import DataDreamConfig, train_datadream
from fewgen.generators.diffusion import DiffusionConfig, DiffusionGenerator
from fewgen.synthesis.sharding import process_context
from fewgen.synthesis.store import SynthesisCache, SynthesisSpec

TINY = dict(image_size=8, channels=1, block_out_channels=[8, 16], attention_levels=[False, True],
            norm_num_groups=4, cond_dim=8, attention_head_dim=4, cond_mode="class")


def tiny_generator(n_classes: int = 3) -> DiffusionGenerator:
    torch.manual_seed(0)
    return DiffusionGenerator(DiffusionConfig(**TINY), [f"class{i}" for i in range(n_classes)])


def spec_for(gen: DiffusionGenerator, sampler: str = "ddim", prompt_suffix: str = "", adapter_key=None,
             per_class: int = 6, chunk: int = 2, precision: str = "float32") -> SynthesisSpec:
    return SynthesisSpec(generator_key="tiny-test", class_names=list(gen.class_names),
                         prompts=[n + prompt_suffix for n in gen.class_names], per_class=per_class,
                         image_shape=(1, 8, 8), adapter_key=adapter_key, sampler=sampler, steps=2, guidance=2.0,
                         seed=0, chunk=chunk, precision=precision)


def sample_fn_for(gen: DiffusionGenerator, spec: SynthesisSpec, slow: float = 0.0):
    def fn(c, seeds, indices):
        if slow:
            time.sleep(slow)
        return gen.sample([c] * len(seeds), seeds=seeds, steps=spec.steps, guidance=spec.guidance,
                          sampler=spec.sampler)
    return fn


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("cache")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--sampler", default="ddim")
    p.add_argument("--adapt", action="store_true", help="also train DataDream cls adapters and print their key")
    p.add_argument("--exemplar", action="store_true", help="SDEdit from toy shots with a tiny exemplar generator")
    args = p.parse_args()
    torch.set_num_threads(1)
    ctx = process_context()
    if args.exemplar:
        spec, fn = exemplar_job(args.slow)
        ds = SynthesisCache(args.cache).synthesize(spec, fn, ctx)
        print(f"OK {len(ds)} world={ctx.world}", flush=True)
        return
    gen = tiny_generator()
    spec = spec_for(gen, args.sampler)
    ds = SynthesisCache(args.cache).synthesize(spec, sample_fn_for(gen, spec, args.slow), ctx)
    if ctx.is_main:
        print(f"OK {len(ds)} world={ctx.world}", flush=True)
    if args.adapt:
        adapter = train_datadream(gen, toy_few_shot(), DataDreamConfig(mode="cls", rank=2, alpha=2.0, steps_per_class=2,
                                                                      batch_size=2), ctx)
        if ctx.is_main:
            print(f"ADAPTER {adapter.key}", flush=True)


def exemplar_job(slow: float = 0.0):
    """A tiny exemplar generator drawing 8 images per class from toy shots, half by SDEdit."""
    from test_exemplar import tiny_exemplar, toy_base

    from fewgen.generators.exemplar import exemplar_sample_fn

    gen = tiny_exemplar()
    shots = toy_base(n_classes=3, per_class=2)
    sources = [shots.images[ix] for ix in shots.indices_by_class()]
    spec = SynthesisSpec(generator_key="tiny-exemplar", class_names=list(shots.class_names),
                         prompts=list(shots.class_names), per_class=8, image_shape=(1, 8, 8), sampler="ddim", steps=2,
                         guidance=0.5, chunk=2, strengths=[0.5, 1.0], sources=shots.digest(),
                         extra={"exemplar_condition": "each"})
    fn = exemplar_sample_fn(gen, spec, None, sources)

    def slowed(c, seeds, indices):
        if slow:
            time.sleep(slow)
        return fn(c, seeds, indices)
    return spec, slowed


def toy_few_shot():
    x = torch.arange(3 * 2 * 64, dtype=torch.int64).reshape(6, 1, 8, 8).remainder(256).to(torch.uint8)
    return ArrayDataset(x, torch.tensor([0, 0, 1, 1, 2, 2]), ["novel0", "novel1", "novel2"])


if __name__ == "__main__":
    main()
