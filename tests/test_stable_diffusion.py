"""The Stable Diffusion backend on a tiny random pipeline built from config and saved to a folder."""

from __future__ import annotations

import os

import pytest
import torch

from tests.tiny_sd import build_tiny_pipeline

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_text_to_image_and_img2img(tiny_pipeline_dir):
    from fewgen.generators.stable_diffusion import StableDiffusionGenerator

    gen = StableDiffusionGenerator(tiny_pipeline_dir)
    assert gen.resolution == 16
    prompts = gen.prompts_for(["cat", "dog"])
    assert prompts == ["a photo of a cat", "a photo of a dog"]
    a = gen.sample(prompts, seeds=[1, 2], steps=2, image_shape=(3, 12, 12))
    b = gen.sample(prompts, seeds=[1, 2], steps=2, image_shape=(3, 12, 12))
    assert a.dtype == torch.uint8 and a.shape == (2, 3, 12, 12) and torch.equal(a, b)
    grey = gen.sample(prompts[:1], seeds=[1], steps=2, sampler="ddim", image_shape=(1, 8, 8))
    assert grey.shape == (1, 1, 8, 8)
    real = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    out = gen.img2img(real, prompts, strength=0.6, steps=3, seeds=[5, 6])
    assert out.shape == real.shape and out.dtype == torch.uint8


@pytest.mark.parametrize("mode", ["cls", "dset"])
def test_datadream_lora_saves_and_loads_into_pipeline(tiny_pipeline_dir, tmp_path, mode):
    from diffusers import StableDiffusionPipeline
    from safetensors.torch import load_file

    from fewgen.cache import ArtifactCache
    from fewgen.data.base import ArrayDataset
    from fewgen.generators.datadream import DataDreamConfig
    from fewgen.generators.stable_diffusion import StableDiffusionGenerator

    gen = StableDiffusionGenerator(tiny_pipeline_dir)
    few = ArrayDataset(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                       ["cat", "dog"])
    cfg = DataDreamConfig(mode=mode, rank=4, alpha=4.0, steps_per_class=2, batch_size=2, lr=1e-3, warmup=1)
    adapter = gen.adapt(few, cfg, ArtifactCache(tmp_path), {"test": mode})
    assert sum(h["steps"] for h in adapter.history) == 4
    weights = adapter.class_folder(1) / "pytorch_lora_weights.safetensors"
    keys = list(load_file(str(weights)))
    assert any(k.startswith("unet.") and ".to_q.lora" in k for k in keys)
    assert any(k.startswith("text_encoder.") and "q_proj.lora" in k for k in keys)
    # the saved adapter loads into a plain diffusers pipeline and changes its output
    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt="a photo of a dog", num_inference_steps=2, output_type="pt",
              generator=torch.Generator().manual_seed(0))
    before = pipe(**kw).images
    pipe.load_lora_weights(str(adapter.class_folder(1)))
    kw["generator"] = torch.Generator().manual_seed(0)
    after = pipe(**kw).images
    assert not torch.allclose(before, after)
    # and synthesis through the backend uses it
    from fewgen.synthesis.store import SynthesisCache, SynthesisSpec

    spec = SynthesisSpec(gen.state_key(), ["cat", "dog"], gen.prompts_for(["cat", "dog"]), per_class=2,
                         image_shape=(3, 16, 16), adapter_key=adapter.key, steps=2, chunk=2)
    ds = SynthesisCache(tmp_path / "cache").synthesize(spec, gen.synthesis_sample_fn(spec, adapter, (3, 16, 16)))
    assert len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 1]
