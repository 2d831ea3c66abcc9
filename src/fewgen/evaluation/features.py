"""Feature extraction, cached once per (checkpoint, dataset split, image size)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from fewgen.data.base import ArrayDataset


@torch.no_grad()
def extract_features(backbone: nn.Module, data: ArrayDataset | torch.Tensor, batch_size: int = 512,
                     device: torch.device | str = "cpu", progress: bool = False) -> torch.Tensor:
    """Features (n, D) of uint8 images (n, C, H, W) or an :class:`ArrayDataset`, in eval mode."""
    images = data.images if isinstance(data, ArrayDataset) else data
    was_training = backbone.training
    backbone.eval()
    out = []
    chunks = torch.split(images, batch_size)
    if progress:
        from tqdm.auto import tqdm
        chunks = tqdm(chunks, desc="features", leave=False)
    for chunk in chunks:
        x = chunk.to(device).float().div_(255.0) if chunk.dtype == torch.uint8 else chunk.to(device)
        out.append(backbone.forward_features(x).float().cpu())
    backbone.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, getattr(backbone, "num_features", 0))


def cached_features(cache, checkpoint_key: str, split_key: str, backbone: nn.Module, data: ArrayDataset,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """Extract once per (checkpoint, split) and keep the result in the artifact cache."""
    from fewgen.checkpoint import load_tensors, save_tensors

    key_parts = {"kind": "features", "checkpoint": checkpoint_key, "split": split_key,
                 "n": len(data), "shape": list(data.image_shape)}
    entry = cache.entry("features", key_parts)
    path: Path = entry / "features.safetensors"
    if path.exists():
        tensors, _ = load_tensors(path)
        if tensors["features"].shape[0] == len(data):
            return tensors["features"]
    feats = extract_features(backbone, data, device=device)
    save_tensors(path, {"features": feats}, {"key": key_parts})
    return feats
