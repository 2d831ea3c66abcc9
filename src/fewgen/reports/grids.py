"""Image grids: rows of uint8 images in one PNG (real shots beside synthetic images; GAN samples)."""

from __future__ import annotations

from pathlib import Path

import torch

from fewgen.data.base import ArrayDataset


def image_grid(rows: list[torch.Tensor], pad: int = 2, background: int = 255) -> torch.Tensor:
    """Rows of uint8 images (n_i, C, H, W) -> one uint8 image (C, H', W'), rows left-aligned."""
    c, h, w = rows[0].shape[1:]
    n_cols = max(len(r) for r in rows)
    grid = torch.full((c, len(rows) * (h + pad) + pad, n_cols * (w + pad) + pad), background, dtype=torch.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            grid[:, y:y + h, x:x + w] = im
    return grid


def write_grids(folder: Path, few_shot: ArrayDataset, synthetic: ArrayDataset, n_classes: int,
                per_row: int = 10) -> list[Path]:
    """One PNG per novel class (first ``n_classes``): the real shots in the top row, synthetic
    images below; plus ``overview.png`` with one row per class (shots | a gap | synthetic)."""
    from fewgen.synthesis.store import write_png

    folder.mkdir(parents=True, exist_ok=True)
    real_by, syn_by = few_shot.indices_by_class(), synthetic.indices_by_class()
    written, overview = [], []
    gap = torch.full((1, *few_shot.image_shape), 255, dtype=torch.uint8)
    for c in range(min(n_classes, few_shot.num_classes)):
        real, syn = few_shot.images[real_by[c]], synthetic.images[syn_by[c]]
        rows = [real] + [syn[i:i + per_row] for i in range(0, len(syn), per_row)]
        name = few_shot.class_names[c].replace("/", "_")
        path = folder / f"{c:04d}_{name}.png"
        write_png(path, image_grid(rows))
        written.append(path)
        overview.append(torch.cat([real, gap, syn[:per_row]]))
    if overview:
        write_png(folder / "overview.png", image_grid(overview))
        written.append(folder / "overview.png")
    return written


def save_grid(images: torch.Tensor, path: Path, per_row: int = 10) -> Path:
    """uint8 images (n, C, H, W) as one PNG, ``per_row`` a row, on black (GAN samples)."""
    from fewgen.synthesis.store import write_png

    write_png(Path(path), image_grid([images[i:i + per_row] for i in range(0, len(images), per_row)], pad=1,
                                     background=0))
    return Path(path)
