"""Pixel diffusion generator, DataDream LoRA adaptation, and the generate CLI, on tiny models."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.generators.diffusion import SAMPLERS, DiffusionConfig, DiffusionGenerator

sys.path.insert(0, str(Path(__file__).parent))
from synth_worker import TINY, tiny_generator  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def toy_data(n_per_class: int = 8, n_classes: int = 3) -> ArrayDataset:
    """Class c: a bright c-th horizontal band on black, 8x8."""
    x = torch.zeros(n_per_class * n_classes, 1, 8, 8, dtype=torch.uint8)
    y = torch.arange(n_classes).repeat_interleave(n_per_class)
    for i, c in enumerate(y.tolist()):
        x[i, 0, 2 * c:2 * c + 2] = 255
    return ArrayDataset(x, y, [f"class{i}" for i in range(n_classes)], name="toy")


def test_fit_lowers_loss_and_sampling_is_seeded():
    gen = tiny_generator()
    res = gen.fit(toy_data(), steps=30, batch_size=16, lr=3e-3, warmup=5, seed=0)
    assert sum(res.losses[-5:]) / 5 < sum(res.losses[:5]) / 5
    labels = torch.tensor([0, 1, 2, -1])
    out = {}
    for sampler in SAMPLERS:
        a = gen.sample(labels, seed=3, steps=3, guidance=2.0, sampler=sampler)
        b = gen.sample(labels, seed=3, steps=3, guidance=2.0, sampler=sampler)
        assert a.dtype == torch.uint8 and a.shape == (4, 1, 8, 8) and torch.equal(a, b)
        out[sampler] = a
    assert not torch.equal(out["dpmsolver++"], out["dpmsolver++-logsnr"])  # the step spacing differs
    assert not torch.equal(out["dpmsolver++"], out["dpmsolver++-full"])  # the first step starts from t = T
    c = gen.sample(labels, seed=4, steps=3)
    assert not torch.equal(c, gen.sample(labels, seed=3, steps=3))
    f = gen.sample(labels, seed=3, steps=3, output="float")
    assert f.dtype == torch.float32 and f.min() >= -1 and f.max() <= 1 and torch.isfinite(f).all()


def test_predict_noise_guidance_and_img2img():
    gen = tiny_generator()
    x = torch.randn(2, 1, 8, 8)
    t = torch.tensor([10, 500])
    labels = torch.tensor([0, 2])
    eps_c = gen.predict_noise(x, t, labels)
    eps_u = gen.predict_noise(x, t, torch.tensor([-1, -1]))
    eps_g = gen.predict_noise(x, t, labels, guidance=3.0)
    assert eps_c.shape == x.shape
    assert torch.allclose(eps_g, eps_u + 3.0 * (eps_c - eps_u), atol=1e-5)
    real = toy_data().images[:2]
    assert torch.equal(gen.img2img(real, labels, strength=0.0, steps=4), real)
    out = gen.img2img(real, labels, strength=0.5, steps=4, seed=1)
    assert out.shape == real.shape and out.dtype == torch.uint8


def test_bfloat16_sampling_is_close_to_float32_and_seeded():
    gen = tiny_generator()
    gen.fit(toy_data(), steps=10, batch_size=16, lr=3e-3, warmup=2, seed=0)
    labels = torch.tensor([0, 1, 2])
    exact = gen.sample(labels, seed=3, steps=4, output="float")
    half = gen.sample(labels, seed=3, steps=4, output="float", precision="bfloat16")
    assert torch.equal(half, gen.sample(labels, seed=3, steps=4, output="float", precision="bfloat16"))
    assert not torch.equal(half, exact)  # it did run in bf16
    assert (half - exact).abs().mean() < 0.05  # and stayed close (values in [-1, 1])
    with pytest.raises(FewgenError, match="needs a GPU"):
        gen.sample(labels, steps=2, precision="float16")
    with pytest.raises(FewgenError, match="unknown precision"):
        gen.sample(labels, steps=2, precision="int8")


def test_ddim_does_not_clip_x0_and_its_sets_get_a_new_key():
    """Clipping x0 at every DDIM step saturated Omniglot strokes (FID 575 vs 297); the fixed
    sampler must never reuse images cached under the old one."""
    from fewgen.generators.diffusion import build_noise_scheduler, build_sampler
    from fewgen.synthesis.store import SynthesisSpec

    noise = build_noise_scheduler(DiffusionConfig(**TINY))
    assert build_sampler(noise, "ddim").config.clip_sample is False
    assert build_sampler(noise, "dpmsolver++").config.lambda_min_clipped == -5.1
    assert build_sampler(noise, "dpmsolver++-full").config.lambda_min_clipped == -float("inf")
    spec = dict(generator_key="g", class_names=["a"], prompts=["a"], per_class=2, image_shape=(1, 8, 8))
    assert SynthesisSpec(sampler="ddim", **spec).parts()["sampler_revision"] == 2
    assert "sampler_revision" not in SynthesisSpec(sampler="dpmsolver++", **spec).parts()
    # the two DPM-Solver++ step spacings are different samplers, so different sets
    assert SynthesisSpec(sampler="dpmsolver++", **spec).parts() != SynthesisSpec(sampler="dpmsolver++-logsnr",
                                                                                 **spec).parts()


def test_base_generator_key_ignores_adaptation_settings():
    """Changing DataDream's steps or rank must reuse the trained base generator, not retrain it."""
    import dataclasses
    from types import SimpleNamespace

    from fewgen.app.config import GeneratorConfig, RunConfig
    from fewgen.app.steps.generate import generator_parts
    from fewgen.generators.datadream import DataDreamConfig

    def parts(**kw):
        cfg = RunConfig()
        cfg.generator = dataclasses.replace(GeneratorConfig(), **kw)
        return generator_parts(SimpleNamespace(cfg=cfg, data=SimpleNamespace(base=toy_data(), name="toy")))

    from fewgen.generators.diffusion import DiffusionOptions
    from fewgen.generators.exemplar import ExemplarOptions
    from fewgen.generators.stable_diffusion import StableDiffusionOptions

    assert parts() == parts(datadream=DataDreamConfig(steps_per_class=10, rank=4, mode="cls", warmup=3),
                            stable_diffusion=StableDiffusionOptions(prompt="{}"), exemplar=ExemplarOptions(tokens=2))
    assert parts() != parts(diffusion=DiffusionOptions(train_steps=7))
    assert parts() != parts(diffusion=DiffusionOptions(cond_mode="class"))


def test_datadream_section_reaches_the_adapter_and_its_key():
    """generator.datadream is DataDream's own options: every field is settable from the command line,
    each one that changes an adapter changes its key, and alpha defaults to the rank."""
    from fewgen.app.config import load_config
    from fewgen.generators.datadream import lora_config
    from fewgen.keys import key_parts

    def adapter_parts(*overrides):
        cfg = load_config(None, list(overrides))
        return key_parts("adapters", cfg, generator="g", few_shot="f")

    cfg = load_config(None, ["generator.datadream.rank=8", "generator.datadream.warmup=3",
                             "generator.datadream.weight_decay=0", "generator.datadream.p_uncond=0.2"])
    dd = cfg.generator.datadream
    assert (dd.rank, dd.warmup, dd.weight_decay, dd.p_uncond) == (8, 3, 0.0, 0.2)
    assert dd.lora_alpha == 8.0 and lora_config(dd).lora_alpha == 8.0
    assert load_config(None, ["generator.datadream.alpha=4"]).generator.datadream.lora_alpha == 4.0
    base = adapter_parts()
    for change in ("generator.datadream.alpha=4", "generator.datadream.warmup=3", "generator.datadream.p_uncond=0",
                   "generator.datadream.weight_decay=0", "generator.datadream.seed=1", "generator.datadream.mode=cls"):
        assert adapter_parts(change) != base, change
    assert adapter_parts("generator.diffusion.seed=1") == base  # the base generator's seed is in the generator key
    sd = ("generator.kind=stable-diffusion", "generator.stable_diffusion.model=x")
    assert adapter_parts(*sd, "generator.datadream.p_uncond=0") == adapter_parts(*sd)


def test_bad_inputs_raise_clear_errors():
    gen = tiny_generator()
    with pytest.raises(FewgenError, match="labels must be in"):
        gen.sample([5], steps=2)
    with pytest.raises(FewgenError, match="unknown sampler"):
        gen.sample([0], steps=2, sampler="euler")
    with pytest.raises(FewgenError, match="strength"):
        gen.img2img(toy_data().images[:1], [0], strength=1.5)
    with pytest.raises(FewgenError, match="not divisible"):
        DiffusionConfig(image_size=10, block_out_channels=[8, 16, 16], attention_levels=[False, False, True])


def test_save_load_roundtrip_with_added_classes(tmp_path):
    gen = tiny_generator()
    ids = gen.add_classes(["novel0", "novel1"])
    gen.save(tmp_path)
    back = DiffusionGenerator.load(tmp_path)
    assert back.class_names == gen.class_names
    labels = torch.tensor([0, *ids])
    assert torch.equal(gen.sample(labels, steps=2), back.sample(labels, steps=2))


def test_name_conditioned_zero_shot_from_minilm():
    torch.manual_seed(0)
    gen = DiffusionGenerator(DiffusionConfig(**{**TINY, "cond_mode": "class+name"}), ["circle", "square"])
    assert gen.conditioner.text_embeddings.shape == (2, 384)
    (novel,) = gen.add_classes(["triangle"])
    x = gen.sample([novel, novel], steps=2, use_class=False)
    assert x.shape == (2, 1, 8, 8)
    t = torch.tensor([100])
    z = torch.randn(1, 1, 8, 8)
    # the name token differs between classes, so zero-shot conditions differ
    assert not torch.allclose(gen.predict_noise(z, t, torch.tensor([0]), use_class=False),
                              gen.predict_noise(z, t, torch.tensor([novel]), use_class=False))


@pytest.mark.parametrize("mode", ["cls", "dset"])
def test_datadream_adapter_keys_totals_and_diffusers_loading(mode, tmp_path):
    from safetensors.torch import load_file

    from fewgen.generators.datadream import (
        AdaptedDiffusion,
        DataDreamAdapter,
        DataDreamConfig,
        train_datadream,
    )

    base = tiny_generator()
    before = {k: v.clone() for k, v in base.unet.state_dict().items()}
    few = toy_data(n_per_class=2, n_classes=2)
    few.class_names = ["novelA", "novelB"]
    cfg = DataDreamConfig(mode=mode, rank=4, alpha=4.0, steps_per_class=4, batch_size=4, lr=1e-2, warmup=1)
    adapter = train_datadream(base, few, cfg)
    assert all(torch.equal(before[k], v) for k, v in base.unet.state_dict().items())  # base untouched
    assert sum(h["steps"] for h in adapter.history) == 2 * 4  # equal total steps in both modes
    assert len(adapter.lora) == (2 if mode == "cls" else 1)
    assert any(v.abs().sum() > 0 for k, v in adapter.lora[0].items() if "lora_B" in k)  # B moved from 0
    adapter.save(tmp_path)
    weights = tmp_path / ("class_0001" if mode == "cls" else "") / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(weights)))
    assert keys and all(k.startswith("unet.") and (".lora.down.weight" in k or ".lora.up.weight" in k) for k in keys)
    assert {k.split(".lora.")[0].rsplit(".", 1)[-1] for k in keys} >= {"to_q", "to_k", "to_v"}
    assert any(".to_out.0.lora" in k for k in keys)
    back = DataDreamAdapter.load(tmp_path)
    assert back.key == adapter.key
    adapted = AdaptedDiffusion(base, back)
    c = 1
    imgs = adapted.sample_class(c, [11, 12], steps=2)
    assert imgs.shape == (2, 1, 8, 8)
    # the saved file loads with diffusers' own LoRA loader into a plain copy of the base UNet
    import copy

    plain = copy.deepcopy(base)
    plain.add_classes(back.class_names, init=back.class_embeddings)
    plain.unet.load_lora_adapter(str(weights), prefix="unet", adapter_name="loaded")
    adapted.use(c)
    z, t, lab = torch.randn(2, 1, 8, 8), torch.tensor([50, 700]), torch.tensor([3 + c] * 2)
    assert torch.allclose(plain.predict_noise(z, t, lab), adapted.gen.predict_noise(z, t, lab), atol=1e-5)
    assert not torch.allclose(base.predict_noise(z, t, torch.tensor([0, 0])),
                              plain.predict_noise(z, t, torch.tensor([0, 0])), atol=1e-6)


@pytest.mark.slow
def test_generate_cli_end_to_end(tmp_path, monkeypatch):
    from fewgen.app.cli import main

    monkeypatch.setenv("FEWGEN_CACHE", str(tmp_path / "cache"))
    argv = ["generate", "generate", "seeds=[0]", "eval.n_shots=[1]", "generator.diffusion.cond_mode=class",
            "generator.diffusion.train_steps=3", "generator.datadream.steps_per_class=1", "generator.datadream.batch_size=2",
            "generator.datadream.rank=2", "synthesis.synthetic_per_class=2", "synthesis.steps=2", "synthesis.chunk=2",
            "synthesis.grid_classes=2", "--out", str(tmp_path / "run"), "--quiet"]
    assert main(argv) == 0
    run = tmp_path / "run"
    assert (run / "done").exists() and (run / "grids/seed0_1shot/overview.png").exists()
    assert len(list((tmp_path / "cache/synthetic").glob("*/images/*/*.png"))) == 5 * 2
    assert main(["generate", "generate", "generator.diffusion.cond_mode=class", "--zero-shot", "--out",
                 str(tmp_path / "zs"), "--quiet"]) == 2  # zero-shot needs a name-conditioned model

    def pngs(cache):
        return {str(p.relative_to(cache)): p.read_bytes() for p in sorted(cache.glob("synthetic/*/images/*/*.png"))}

    # one sampling stream writes the bytes the default (one per CPU thread) wrote
    monkeypatch.setenv("FEWGEN_CACHE", str(tmp_path / "cache1"))
    assert main([*argv[:-3], "synthesis.streams=1", "--out", str(tmp_path / "run1"), "--quiet"]) == 0
    assert pngs(tmp_path / "cache1") == pngs(tmp_path / "cache") and len(pngs(tmp_path / "cache")) == 10
    assert main([*argv[:-3], "synthesis.streams=0", "--out", str(tmp_path / "run0"), "--quiet"]) == 2
