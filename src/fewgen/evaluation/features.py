"""Feature extraction, cached once per (checkpoint, images)."""

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


def cached_features(cache, checkpoint_key: str, backbone: nn.Module, data: ArrayDataset,
                    device: torch.device | str = "cpu", log=None) -> torch.Tensor:
    """Extract once per (checkpoint, images) and keep the result in the artifact cache.

    The key holds the checkpoint's key and the content of the images (``fewgen.keys``), so other
    or changed images are extracted afresh; a damaged cache file is detected and rebuilt.
    """
    from fewgen.checkpoint import load_tensors, save_tensors
    from fewgen.keys import key_parts

    def build(entry: Path) -> None:
        save_tensors(entry / "features.safetensors", {"features": extract_features(backbone, data, device=device)},
                     {"images": len(data)})
        cache.mark_done(entry, {"images": len(data)})

    parts = key_parts("features", None, checkpoint=checkpoint_key, images=data.digest())
    return cache.build_or_load("features", parts, build, lambda e: load_tensors(e / "features.safetensors")[0]["features"],
                               log)
