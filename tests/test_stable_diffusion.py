"""The Stable Diffusion backend on a tiny random pipeline built from config and saved to a folder."""

from __future__ import annotations

import json
import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def tiny_tokenizer(folder):
    """A CLIP BPE tokenizer over single characters (no merges), written offline."""
    from transformers import CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789{}")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    for ch in chars:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token="!",
                         model_max_length=16)


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("tiny_sd")
    torch.manual_seed(0)
    tok = tiny_tokenizer(root / "tok")
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=16,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=[8, 16], in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                        norm_num_groups=4, sample_size=16)
    text = CLIPTextModel(CLIPTextConfig(bos_token_id=0, eos_token_id=1, pad_token_id=2, hidden_size=16,
                                        intermediate_size=32, num_attention_heads=2, num_hidden_layers=2,
                                        vocab_size=len(tok), max_position_embeddings=16))
    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False)
    pipe = StableDiffusionPipeline(unet=unet, vae=vae, text_encoder=text, tokenizer=tok, scheduler=sched,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe")
    return root / "pipe"


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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

    from fewgen.data.base import ArrayDataset
    from fewgen.generators.datadream import DataDreamConfig
    from fewgen.generators.stable_diffusion import StableDiffusionGenerator

    gen = StableDiffusionGenerator(tiny_pipeline_dir)
    few = ArrayDataset(torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 0, 1, 1]),
                       ["cat", "dog"])
    cfg = DataDreamConfig(mode=mode, rank=4, alpha=4.0, steps_per_class=2, batch_size=2, lr=1e-3, warmup=1)
    adapter = gen.adapt(few, cfg, tmp_path / "adapter")
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
    from fewgen.synthesis.cache import SynthesisCache, SynthesisSpec

    spec = SynthesisSpec(gen.state_key(), ["cat", "dog"], gen.prompts_for(["cat", "dog"]), per_class=2,
                         image_shape=(3, 16, 16), adapter_key=adapter.key, steps=2, chunk=2)
    ds = SynthesisCache(tmp_path / "cache").synthesize(spec, gen.synthesis_sample_fn(spec, adapter, (3, 16, 16)))
    assert len(ds) == 4 and ds.labels.tolist() == [0, 0, 1, 1]
