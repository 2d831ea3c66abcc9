"""A few-shot generation task from a dataset: the source domain, the target's training shots and
held-out real target images, as ``gan.setup`` says (class-range, domains or an image folder)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fewgen.data.base import ArrayDataset, FewShotData
from fewgen.data.images import resize_uint8
from fewgen.errors import FewgenError


@dataclass
class GenerationSetup:
    """A few-shot generation task. All images uint8 (n, C, H, W) at the GAN's size.

    ``shots`` are the only target images any generator learns from; ``target_eval`` are
    other real target images (metrics and the realism classifier only).
    """

    name: str
    source: torch.Tensor
    shots: torch.Tensor
    target_eval: torch.Tensor
    description: str


def draw_shots(pool: ArrayDataset, n_shots: int, seed: int) -> torch.Tensor:
    """Indices of ``n_shots`` target images: one from each of ``n_shots`` random classes when there are
    that many classes, else ``n_shots`` random images."""
    g = torch.Generator().manual_seed(seed)
    if len(pool) < n_shots + 5:
        raise FewgenError(f"the target has {len(pool)} images; it needs n_shots ({n_shots}) plus at least 5 "
                          "held-out images for the metrics")
    present = [c for c, idx in enumerate(pool.indices_by_class()) if len(idx)]
    if len(present) >= n_shots:
        by_class = pool.indices_by_class()
        classes = [present[i] for i in torch.randperm(len(present), generator=g)[:n_shots].tolist()]
        return torch.stack([by_class[c][torch.randint(0, len(by_class[c]), (1,), generator=g)][0] for c in classes])
    return torch.randperm(len(pool), generator=g)[:n_shots]


def generation_setup(gc, data: FewShotData, seed: int, name: str) -> GenerationSetup:
    """Source / shots (drawn with the few-shot ``seed``) / held-out target from ``data`` as the
    ``GANConfig`` ``gc`` says (``gc.setup``)."""
    full = data.full if data.full is not None else ArrayDataset.concat([data.base, data.val, data.novel])
    if gc.setup == "class-range":
        lo, hi = (gc.target_range + [None, None])[:2]
        if lo is None or hi is None or not 0 <= lo < hi <= full.num_classes:
            raise FewgenError(f"gan.target_range={gc.target_range} must be [first, end) class ids within "
                              f"[0, {full.num_classes}] of {data.name}")
        in_range = (full.labels >= lo) & (full.labels < hi)
        source, target = full.subset(in_range.logical_not().nonzero().squeeze(1)), full.subset(in_range.nonzero().squeeze(1))
        desc = f"{data.name}: target classes [{lo}, {hi}) ({hi - lo} classes), source the other {full.num_classes - hi + lo}"
    elif gc.setup == "domains":
        if not gc.source_domains or not gc.target_domain:
            raise FewgenError("gan.setup=domains needs gan.source_domains (a list) and gan.target_domain")
        if gc.target_domain in gc.source_domains:
            raise FewgenError(f"gan.target_domain {gc.target_domain!r} is also a source domain")
        source, target = full.select_domains(gc.source_domains), full.select_domains([gc.target_domain])
        desc = f"{data.name}: source {'+'.join(gc.source_domains)}, target {gc.target_domain}"
    elif gc.setup == "folder":
        if not gc.target_root:
            raise FewgenError("gan.setup=folder needs gan.target_root=<image folder, one subfolder per class>")
        from fewgen.data import load_dataset

        tdata = load_dataset("imagefolder", gc.target_root, gc.arch.image_size, channels=full.image_shape[0])
        source, target = full, tdata.full
        desc = f"source {data.name}, target folder {gc.target_root}"
    else:
        raise FewgenError(f"unknown gan.setup {gc.setup!r}; use class-range, domains or folder")
    shot_idx = draw_shots(target, gc.n_shots, seed)
    keep = torch.ones(len(target), dtype=torch.bool)
    keep[shot_idx] = False
    size = gc.arch.image_size
    return GenerationSetup(name, resize_uint8(source.images, size), resize_uint8(target.images[shot_idx], size),
                           resize_uint8(target.images[keep], size),
                           f"{desc}; {gc.n_shots} shots (seed {seed}), {int(keep.sum())} held-out target images")
