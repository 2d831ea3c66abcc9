"""The CLIP classifier (DataDream's): a tiny random CLIP + offline tokenizer, 2 training steps."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")


def tiny_clip_folder(folder):
    """A random tiny CLIP and a character-level BPE tokenizer, saved like a pretrained model."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.")
    vocab = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), unk_token="<|endoftext|>")
    text = dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_attention_heads=4,
                num_hidden_layers=2, projection_dim=16, max_position_embeddings=64,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    vision = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                  num_hidden_layers=2, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip_folder(tmp_path_factory.mktemp("tiny-clip"))


def test_clip_head_starts_at_text_embeddings(clip_dir):
    from fewgen.learners.clip import CLIPClassifier

    model = CLIPClassifier.from_pretrained(clip_dir, ["five", "six", "seven"], rank=16)
    text = model.text_embeddings().detach()
    assert text.shape == (3, 16)
    assert torch.allclose(model.head.class_weights().detach(), text)
    logits = model(torch.rand(4, 1, 16, 16))
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


def test_clip_lora_trains_two_steps_and_saves(clip_dir, tmp_path):
    from fewgen.checkpoint import load_tensors
    from fewgen.data import load_dataset
    from fewgen.data.fewshot import few_shot_set
    from fewgen.learners.clip import CLIPClassifier
    from fewgen.learners.datadream_classifier import datadream_batches, datadream_loss_fn
    from fewgen.learners.finetune import FinetuneSettings, finetune

    data = load_dataset("digits")
    real = few_shot_set(data.novel, 2, seed=0)
    synthetic = few_shot_set(data.novel, 4, seed=1)  # stands in for generated images
    model = CLIPClassifier.from_pretrained(clip_dir, data.novel.class_names, rank=16)
    assert model.clip.peft_config["default"].r == 16
    before = {k: v.clone() for k, v in model.lora_state_dict().items()}
    history = finetune(model, datadream_batches(real, synthetic, 8, "t"), datadream_loss_fn(0.8),
                       FinetuneSettings(steps=2, lr_backbone=1e-2, lr_head=1e-2, augment=["crop"], log_every=1),
                       data.novel.image_shape)
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    after = model.lora_state_dict()
    # both towers carry LoRA, and training moved the adapters (B starts at zero)
    assert any(k.startswith("lora.") and "text_model" in k for k in after)
    assert any(k.startswith("lora.") and "vision_model" in k for k in after)
    moved = [k for k in after if "lora_B" in k and not torch.equal(after[k], before[k])]
    assert any("text_model" in k for k in moved) and any("vision_model" in k for k in moved)

    path = tmp_path / "clip-lora.safetensors"
    model.save_lora(path)
    tensors, meta = load_tensors(path)
    assert meta["rank"] == 16 and meta["class_names"] == data.novel.class_names
    assert set(tensors) == set(after)
    fresh = CLIPClassifier.from_pretrained(clip_dir, data.novel.class_names, rank=16)
    fresh.load_lora(path)
    x = torch.rand(3, 1, 16, 16)
    model.eval()
    fresh.eval()
    assert torch.allclose(model(x), fresh(x), atol=1e-5)


def test_clip_missing_path_is_a_clear_error(tmp_path):
    from fewgen.errors import FewgenError
    from fewgen.learners.clip import CLIPClassifier

    with pytest.raises(FewgenError, match="learner.clip_path"):
        CLIPClassifier.from_pretrained(tmp_path / "nope", ["a", "b"])
