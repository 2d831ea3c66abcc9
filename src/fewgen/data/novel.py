"""Novel classes from another dataset than the base side (``data.novel_dataset``).

Pretraining, the generator and model selection stay on the base dataset; the novel classes (and
their few-shot sets and queries) come from any registered dataset or an image folder
(``imagefolder`` with ``data.novel_root``), brought to the base side's image shape:

* channels: gray -> RGB repeats the channel; RGB -> gray is the luminance
  ``L = 0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601, PIL's ``L`` mode);
* size: area averaging when shrinking, bilinear when enlarging; enlarging more than
  :data:`MAX_UPSCALE` times is refused (an 8x8 image stretched to 64x64 is a blur, not an image
  of its class). Image files are read as 8-bit ``L`` / ``RGB`` first (:func:`read_file`, by
  :mod:`fewgen.data.reader`), as exported classifiers read them.

A registered dataset gives all its classes (or ``data.novel_classes``) and, where it has an
official test split (MNIST), only that split's images. The base dataset's own novel classes join
its base classes: every class of the base side is then base or validation.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from fewgen.data.base import ArrayDataset, FewShotData
from fewgen.data.images import convert_images
from fewgen.errors import FewgenError

#: the largest factor novel images are enlarged by to reach the base side's size
MAX_UPSCALE = 4.0


def conversion_rule(src: tuple[int, int, int], dst: tuple[int, int, int]) -> str:
    """A sentence saying how images of shape ``src`` (C, H, W) are brought to ``dst``."""
    (c0, h0, _), (c1, h1, _) = src, dst
    parts = []
    if c0 != c1:
        parts.append("gray -> RGB (channel repeated)" if c0 == 1 else "RGB -> gray (luminance, ITU-R 601)")
    if h0 != h1:
        parts.append(f"{h0} -> {h1} px ({'area average' if h0 > h1 else 'bilinear'})")
    return ", ".join(parts) or "unchanged"


def check_convertible(src_side: int, dst_side: int, where: str) -> None:
    if dst_side > src_side * MAX_UPSCALE:
        raise FewgenError(
            f"the novel images of {where} are {src_side}x{src_side} but the base side works at {dst_side}x{dst_side}: "
            f"enlarging {dst_side / src_side:.1f}x (more than {MAX_UPSCALE:g}x) has no sensible result; use a base "
            f"side with a smaller data.image_size or larger novel images")


def read_file(path: str | Path, shape: tuple[int, int, int], crop: bool = False) -> tuple[torch.Tensor, int]:
    """One image file as uint8 (C, H, W) at ``shape`` and its original shorter side: read as ``L`` or
    ``RGB`` by :func:`fewgen.data.reader.read_image_array`, then resized by :func:`convert_images`;
    with ``crop`` (pretrained backbones), the aspect is kept instead: the shorter side resized to
    fit (PIL bicubic on the 8-bit image, as the models' image processors do) and the centre cut out.
    Exported classifiers read images the same way. An unreadable file is a :class:`FewgenError`."""
    from fewgen.data.reader import read_image_array

    arr = read_image_array(path, shape[0], str(path))
    side = min(arr.shape[1:])
    if crop:
        return crop_to(arr, shape), side
    return convert_images(torch.from_numpy(arr)[None], shape)[0], side


def crop_to(arr, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (C, h, w) -> (C, H, W): scaled (PIL bicubic) so both sides cover (H, W), aspect kept, then
    the centre (H, W) cut out; a photo is never stretched."""
    from PIL import Image

    c, h, w = arr.shape
    _, out_h, out_w = shape
    if out_h == out_w:  # the shorter side to the size, the longer truncated (transformers' image processors)
        new_h, new_w = (out_h, int(out_h * w / h)) if h <= w else (int(out_w * h / w), out_w)
    else:
        scale = max(out_h / h, out_w / w)
        new_h, new_w = max(out_h, round(h * scale)), max(out_w, round(w * scale))
    img = Image.fromarray(arr[0] if c == 1 else arr.transpose(1, 2, 0))
    if (new_h, new_w) != (h, w):
        img = img.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
    x = np.asarray(img)
    top, left = (new_h - out_h) // 2, (new_w - out_w) // 2
    x = x[top:top + out_h, left:left + out_w]
    return torch.from_numpy(np.ascontiguousarray(x[None] if c == 1 else x.transpose(2, 0, 1)))


def read_novel_folder(folder: Path, shape: tuple[int, int, int], crop: bool = False) -> ArrayDataset:
    """``<folder>/<class>/*.png|jpg`` at ``shape`` (C, H, W), each file read by :func:`read_file`.

    Needs at least two classes, each with an image; an unreadable file is one clear error."""
    from fewgen.data.datasets import IMAGE_EXTENSIONS, image_files

    if not folder.is_dir():
        raise FewgenError(f"data.novel_root={str(folder)!r} is not a folder; give a folder with one subfolder of "
                          "images per novel class")
    classes = sorted(p for p in folder.iterdir() if p.is_dir())
    if len(classes) < 2:
        raise FewgenError(f"{folder} has {len(classes)} class folder(s); a classifier needs at least two classes "
                          "(one subfolder of images each)")
    images, labels, sides = [], [], []
    for label, cls in enumerate(classes):
        files = image_files(cls)
        if not files:
            raise FewgenError(f"class folder {cls} has no images ({', '.join(IMAGE_EXTENSIONS)}); add some or remove it")
        for f in files:
            x, side = read_file(f, shape, crop)
            images.append(x)
            labels.append(label)
            sides.append(side)
    check_convertible(min(sides), shape[1], str(folder))
    return ArrayDataset(torch.stack(images), torch.tensor(labels), [p.name for p in classes],
                        name=f"imagefolder:{folder.name}")


def load_novel(name: str, root, shape: tuple[int, int, int], classes: list[str] | None = None,
               novel_root: str | None = None, crop: bool = False) -> tuple[ArrayDataset, str]:
    """The novel classes of dataset ``name`` at ``shape`` and the sentence saying how they were made."""
    from fewgen.data.datasets import DATASETS, data_root

    if name == "imagefolder":
        if not novel_root:
            raise FewgenError("data.novel_dataset=imagefolder needs data.novel_root=<folder>/<class>/*.png")
        novel = read_novel_folder(Path(novel_root).expanduser(), shape, crop)
        rule = (f"files read as {'gray (PIL L)' if shape[0] == 1 else 'RGB'}, "
                + (f"shorter side scaled to {shape[1]} (PIL bicubic, aspect kept) and the centre "
                   f"{shape[1]}x{shape[2]} cut out" if crop else
                   f"resized to {shape[1]}x{shape[2]} (area average when shrinking, bilinear when enlarging)"))
    else:
        meta = DATASETS.meta(name)
        if meta.get("domains"):
            raise FewgenError(f"{name} is a domain dataset; as novel classes use an image folder of one domain "
                              "(data.novel_dataset=imagefolder data.novel_root=<domain folder>)")
        loaded = DATASETS.get(name)(data_root(root), int(meta["image_size"]), download=False)
        full = loaded.full
        if meta.get("novel_part"):  # e.g. MNIST's official test digits
            keep = meta["novel_part"](full)
            full = full.subset(keep, name=f"{full.name}/{meta['novel_part_name']}")
        check_convertible(full.image_shape[1], shape[1], name)
        rule = conversion_rule(full.image_shape, shape)
        full = replace(full, images=convert_images(full.images, shape), name=f"{name}-novel")
        novel = full
    if classes is not None:
        missing = [n for n in classes if n not in novel.class_names]
        if missing:
            raise FewgenError(f"data.novel_classes names unknown classes {missing[:5]} in {name!r}; it has "
                              f"{', '.join(novel.class_names[:10])}{', ...' if len(novel.class_names) > 10 else ''}")
        novel = novel.select_classes([novel.class_names.index(n) for n in classes], name=novel.name)
    elif name != "imagefolder":
        novel = novel.select_classes(list(range(novel.num_classes)), name=novel.name)
    if novel.num_classes < 2:
        raise FewgenError(f"the novel side has {novel.num_classes} class; a classifier needs at least two")
    novel.name = f"{name}/novel"
    empty = [novel.class_names[i] for i, n in enumerate(novel.counts().tolist()) if n == 0]
    if empty:
        raise FewgenError(f"novel class {empty[0]!r} of {name} has no images")
    return novel, rule


def with_novel_dataset(data: FewShotData, novel: ArrayDataset, rule: str, name: str) -> FewShotData:
    """``data`` with ``novel`` as its novel classes; the base dataset's own novel classes join its
    base classes (the base side keeps no class for itself)."""
    full = data.full if data.full is not None else ArrayDataset.concat([data.base, data.val, data.novel])
    ids = [full.class_names.index(n) for n in [*data.base.class_names, *data.novel.class_names]]
    base = full.select_classes(ids, name=f"{data.name}/base")
    protocol = (f"base {data.name}: its {data.base.num_classes + data.novel.num_classes} base and "
                f"{data.val.num_classes} validation classes; novel classes from {name} "
                f"({novel.num_classes} classes, {len(novel)} images), brought to {tuple(novel.image_shape)}: {rule}")
    return FewShotData(name=data.name, base=base, val=data.val, novel=novel, protocol=protocol, full=None)
