"""What a ViT-B/16-sized CLIP costs on this machine: image encoding (the frozen photos rows) against
LoRA fine-tuning (CLIP + LoRA, DataDream's classifier). Random weights of the published shape
(no hub here); the arithmetic is the pretrained model's. Prints a table and writes
benchmarks/results/bench_clip_cpu.json.

usage: .venv/bin/python benchmarks/bench_clip_cpu.py [--threads 2] [--batch 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def vit_b16_clip():
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(text_config=dict(hidden_size=512, intermediate_size=2048, num_attention_heads=8,
                                      num_hidden_layers=12),
                     vision_config=dict(image_size=224, patch_size=16, hidden_size=768, intermediate_size=3072,
                                        num_attention_heads=12, num_hidden_layers=12),
                     projection_dim=512)
    torch.manual_seed(0)
    return CLIPModel(cfg).eval()


def embeds(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    from peft import LoraConfig, get_peft_model

    model = vit_b16_clip()
    x = torch.randn(a.batch, 3, 224, 224)
    with torch.no_grad():
        embeds(model.get_image_features(pixel_values=x))  # warm-up
        times = []
        for _ in range(a.repeats):
            t = time.time()
            embeds(model.get_image_features(pixel_values=x))
            times.append(time.time() - t)
    encode = a.batch / min(times)
    for q in model.parameters():
        q.requires_grad_(False)
    lora = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "out_proj"]))
    times = []
    for _ in range(a.repeats):
        t = time.time()
        embeds(lora.get_image_features(pixel_values=x)).sum().backward()
        times.append(time.time() - t)
    train = a.batch / min(times)
    rows = {"threads": a.threads, "batch": a.batch, "encode_images_per_s": round(encode, 2),
            "lora_train_images_per_s": round(train, 2), "lora_step_of_64_s": round(64 / train, 1)}
    print(f"{'ViT-B/16 CLIP, ' + str(a.threads) + ' threads':<28}{'images/s':>10}")
    print(f"{'encode (frozen features)':<28}{encode:>10.2f}")
    print(f"{'LoRA fwd+bwd (image tower)':<28}{train:>10.2f}   -> {64 / train:.1f} s per step of 64")
    out = Path(__file__).resolve().parent / "results" / "bench_clip_cpu.json"
    out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
