"""Training augmentation on batches with kornia (no torchvision)."""

from __future__ import annotations

import torch
from torch import nn

#: the names build_augmentation knows
AUGMENTATIONS = ("crop", "resized_crop", "flip", "affine", "color")


def build_augmentation(names: list[str], image_size: int, channels: int) -> nn.Module:
    """A kornia pipeline on float batches in [0, 1].

    names: any of ``crop`` (random crop after 1/8 padding), ``flip`` (horizontal),
    ``color`` (colour jitter, RGB only), ``affine`` (small rotation/shift/scale),
    ``resized_crop``. Unknown names raise an error listing the known ones.
    """
    import kornia.augmentation as K

    from fewgen.errors import FewgenError

    pad = max(1, image_size // 8)
    table = {
        "crop": lambda: K.RandomCrop((image_size, image_size), padding=pad),
        "resized_crop": lambda: K.RandomResizedCrop((image_size, image_size), scale=(0.6, 1.0)),
        "flip": lambda: K.RandomHorizontalFlip(),
        "affine": lambda: K.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1)),
        "color": lambda: K.ColorJitter(0.4, 0.4, 0.4, 0.1, p=0.8),
    }
    ops = []
    for n in names:
        if n not in table:
            raise FewgenError(f"unknown augmentation {n!r}; available: {', '.join(table)}")
        if n == "color" and channels != 3:
            continue
        ops.append(table[n]())
    if not ops:
        return nn.Identity()
    return K.AugmentationSequential(*ops, data_keys=["input"])


def add_rotation_classes(images: torch.Tensor, labels: torch.Tensor, num_classes: int):
    """Vinyals et al.: each 90-degree rotation of a base class is a new class.

    Returns (images x4, labels in [0, 4*num_classes)), rotation r of class c -> c + r*num_classes.
    """
    imgs = [torch.rot90(images, r, dims=(2, 3)) for r in range(4)]
    labs = [labels + r * num_classes for r in range(4)]
    return torch.cat(imgs), torch.cat(labs)
