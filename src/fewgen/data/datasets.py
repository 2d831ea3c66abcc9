"""The dataset registry: digits (embedded default), omniglot, mnist, pacs, imagefolder.

A loader returns the whole dataset plus its default class split; :func:`load_dataset`
applies user overrides and returns a :class:`FewShotData`. Files are read where they lie,
under a data root holding one folder per dataset (``<root>/omniglot``, ``<root>/mnist``,
``<root>/pacs64/PACS`` ...), taken from ``data.root`` or the ``FEWGEN_DATA`` variable.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fewgen.data.base import ArrayDataset, FewShotData
from fewgen.data.images import resize, to_uint8
from fewgen.errors import FewgenError
from fewgen.registry import Registry

DATASETS: Registry = Registry("dataset")
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class LoadedData:
    full: ArrayDataset
    base: list[int]
    val: list[int]
    novel: list[int]
    protocol: str


def data_root(root: str | os.PathLike | None = None) -> Path:
    """The data root: the argument, else ``$FEWGEN_DATA``, else ``./data``."""
    return Path(root or os.environ.get("FEWGEN_DATA") or "data").expanduser()


def register_dataset(name: str, *, image_size: int, channels: int, description: str, domains: bool = False,
                     **meta):
    """Register a loader; ``meta`` may hold ``novel_part`` (a function of the loaded dataset giving the
    indices used when it is another run's novel side, e.g. MNIST's test digits) and its name."""
    return DATASETS.register(
        name, image_size=image_size, channels=channels, description=description, domains=domains, **meta
    )


def load_dataset(
    name: str,
    root: str | os.PathLike | None = None,
    image_size: int | None = None,
    *,
    base_classes: list[str] | None = None,
    val_classes: list[str] | None = None,
    novel_classes: list[str] | None = None,
    download: bool = False,
    channels: int | None = None,
) -> FewShotData:
    """Load a registered dataset and cut it into base / val / novel classes.

    Args:
        name: a registered dataset (``fewgen datasets`` lists them).
        root: data root (or, for ``imagefolder``, the folder itself).
        image_size: square side the images are resized to; the dataset's default if None.
        base_classes, val_classes, novel_classes: class names overriding the default split
            (all three or none).
        download: allow fetching official files (omniglot) when missing.
        channels: 1 or 3 for ``imagefolder``.
    """
    loader = DATASETS.get(name)
    meta = DATASETS.meta(name)
    size = int(image_size or meta["image_size"])
    if size < 4:
        raise FewgenError(f"image_size must be at least 4, got {size}")
    kwargs = {"download": download}
    if name == "imagefolder":
        kwargs["channels"] = channels or 3
    loaded: LoadedData = loader(data_root(root) if name != "imagefolder" else Path(root or ""), size, **kwargs)
    full = loaded.full
    base, val, novel = loaded.base, loaded.val, loaded.novel
    protocol = loaded.protocol
    overrides = [base_classes, val_classes, novel_classes]
    if any(o is not None for o in overrides):
        if not all(o is not None for o in overrides):
            raise FewgenError("give all three of data.base_classes, data.val_classes, data.novel_classes, or none")
        lookup = {n: i for i, n in enumerate(full.class_names)}
        resolved = []
        for split_name, names in zip(("base", "val", "novel"), overrides):
            missing = [n for n in names if n not in lookup]  # type: ignore[union-attr]
            if missing:
                raise FewgenError(f"data.{split_name}_classes names unknown classes {missing[:5]} in {name!r}")
            resolved.append([lookup[n] for n in names])  # type: ignore[union-attr]
        base, val, novel = resolved
        protocol = "user-given class split"
    if set(base) & set(novel) or set(val) & set(novel) or set(base) & set(val):
        raise FewgenError("base, val and novel classes must be disjoint")
    return FewShotData(
        name=name,
        base=full.select_classes(base, name=f"{name}/base"),
        val=full.select_classes(val, name=f"{name}/val"),
        novel=full.select_classes(novel, name=f"{name}/novel"),
        protocol=protocol,
        full=full,
    )


# ----------------------------------------------------------------------------- helpers


def check_image_memory(n: int, channels: int, size: int, where: str) -> None:
    """One clear error before ``n`` images of ``size`` px would not fit in memory (uint8, plus the
    float copy a resize makes of a chunk)."""
    from fewgen.utils import check_memory

    check_memory(n * channels * size * size * (1 + 4 * min(1.0, 2048 / max(n, 1))),
                 f"{where}: {n:,} images of {channels}x{size}x{size}",
                 "lower data.image_size (or use fewer images)")


def _resize_float(x: torch.Tensor, size: int) -> torch.Tensor:
    """(n, C, H, W) float in [0, 1] -> uint8 at size x size (fewgen.data.images)."""
    check_image_memory(len(x), x.shape[1], size, "the dataset")
    return to_uint8(resize(x, size))


def image_files(folder: Path) -> list[Path]:
    """The image files directly in ``folder``, sorted by name."""
    return sorted(f for f in folder.iterdir() if f.suffix.lower() in IMAGE_EXTENSIONS)


def read_image(data: bytes | Path, where: str, size: int, channels: int) -> np.ndarray:
    """One image file (or its bytes) as uint8 (C, size, size): read by
    :func:`fewgen.data.reader.read_image_array`, then resized (bicubic); an unreadable one is a
    FewgenError."""
    from PIL import Image

    from fewgen.data.reader import read_image_array

    arr = read_image_array(data, channels, where)
    if arr.shape[1:] != (size, size):
        img = Image.fromarray(arr[0] if channels == 1 else arr.transpose(1, 2, 0), "L" if channels == 1 else "RGB")
        arr = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.uint8)
        arr = arr[None] if channels == 1 else arr.transpose(2, 0, 1)
    return arr


def _contiguous_split(n: int) -> tuple[list[int], list[int], list[int]]:
    """70 / 10 / 20 percent of classes by contiguous index ranges (follows alphabets)."""
    n_val = max(1, round(n * 0.1))
    n_novel = max(1, round(n * 0.2))
    n_base = n - n_val - n_novel
    return list(range(n_base)), list(range(n_base, n_base + n_val)), list(range(n_base + n_val, n))


# ----------------------------------------------------------------------------- digits


@register_dataset(
    "digits", image_size=16, channels=1,
    description="scikit-learn's 8x8 handwritten digits (embedded, no download); base 0-2, val 3-4, novel 5-9",
)
def _load_digits(root: Path, size: int, download: bool = False) -> LoadedData:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32) / 16.0).unsqueeze(1)
    full = ArrayDataset(
        images=_resize_float(x, size),
        labels=torch.from_numpy(d.target.astype(np.int64)),
        class_names=[str(i) for i in range(10)],
        name="digits",
    )
    return LoadedData(full, [0, 1, 2], [3, 4], [5, 6, 7, 8, 9], "digits: base 0-2, val 3-4, novel 5-9")


# ----------------------------------------------------------------------------- mnist


def _read_idx(path: Path) -> np.ndarray:
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
        magic, = struct.unpack(">I", raw[:4])
        ndim = magic & 0xFF
        dims = struct.unpack(">" + "I" * ndim, raw[4 : 4 + 4 * ndim])
        return np.frombuffer(raw[4 + 4 * ndim :], dtype=np.uint8).reshape(dims)
    except (OSError, EOFError, ValueError, struct.error) as e:
        raise FewgenError(f"cannot read MNIST file {path} ({e}); download it again") from None


@register_dataset(
    "mnist", image_size=28, channels=1,
    description="MNIST train + test (70,000 digits); base 0-2, val 3-4, novel 5-9; as data.novel_dataset "
    "its 10,000 official test digits",
    novel_part=lambda full: torch.arange(len(full) - 10000, len(full)), novel_part_name="test",
)
def _load_mnist(root: Path, size: int, download: bool = False) -> LoadedData:
    d = root / "mnist"
    if not d.is_dir():
        raise FewgenError(f"MNIST not found: no folder {d}; put the MNIST files there or set FEWGEN_DATA")
    if (d / "train-images-idx3-ubyte.gz").exists():
        x_train = _read_idx(d / "train-images-idx3-ubyte.gz")
    elif (d / "mnist_train_recovered_from_OrionAI_png.npz").exists():
        x_train = np.load(d / "mnist_train_recovered_from_OrionAI_png.npz")["x_train"]
    else:
        raise FewgenError(f"MNIST training images not found in {d} (train-images-idx3-ubyte.gz)")
    y_train = _read_idx(d / "train-labels-idx1-ubyte.gz")
    x_test = _read_idx(d / "t10k-images-idx3-ubyte.gz")
    y_test = _read_idx(d / "t10k-labels-idx1-ubyte.gz")
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise FewgenError(f"MNIST files in {d} disagree in length; download them again")
    x = torch.from_numpy(np.concatenate([x_train, x_test])).unsqueeze(1)
    if size != 28:
        x = _resize_float(x.float() / 255, size)
    full = ArrayDataset(
        images=x.contiguous(),
        labels=torch.from_numpy(np.concatenate([y_train, y_test]).astype(np.int64)),
        class_names=[str(i) for i in range(10)],
        name="mnist",
    )
    return LoadedData(full, [0, 1, 2], [3, 4], [5, 6, 7, 8, 9], "mnist: base 0-2, val 3-4, novel 5-9")


# ----------------------------------------------------------------------------- omniglot

OMNIGLOT_URL = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python/{}.zip"
OMNIGLOT_MD5 = {
    "images_background": "68d2efa1b9178cc56df9314c21c6e718",
    "images_evaluation": "6b91aef0f799c5bb55b94e3f2daec811",
}


def _omniglot_download(folder: Path, stem: str) -> Path:
    import urllib.request

    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{stem}.zip"
    tmp = folder / f".{stem}.zip.part"
    try:
        urllib.request.urlretrieve(OMNIGLOT_URL.format(stem), tmp)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise FewgenError(
            f"could not download {stem}.zip ({e}); put the official Omniglot files in {folder} by hand"
        ) from None
    md5 = hashlib.md5(tmp.read_bytes()).hexdigest()
    if md5 != OMNIGLOT_MD5[stem]:
        tmp.unlink()
        raise FewgenError(f"downloaded {stem}.zip has md5 {md5}, expected {OMNIGLOT_MD5[stem]}; try again")
    os.replace(tmp, target)
    return target


def _omniglot_from_pngs(entries: list[tuple[str, str, bytes | Path]], size: int, where: str):
    """entries: (alphabet, character, image source) -> (images uint8, labels, names)."""
    names: list[str] = []
    index: dict[tuple[str, str], int] = {}
    imgs, labels = [], []
    for alphabet, char, src in sorted(entries, key=lambda e: (e[0], e[1], str(e[2]) if isinstance(e[2], Path) else "")):
        key = (alphabet, char)
        if key not in index:
            index[key] = len(names)
            names.append(f"{alphabet}/{char}")
        arr = read_image(src, f"{where}:{alphabet}/{char}", 105, 1)[0]
        imgs.append(arr < 128)  # black strokes -> foreground True
        labels.append(index[key])
    fg = torch.from_numpy(np.stack(imgs)).float().unsqueeze(1)
    return _resize_float(fg, size), torch.tensor(labels), names


def _omniglot_read(folder: Path, stem: str, size: int, id_offset: int):
    """Read one official Omniglot set from npz, folder or zip; None when absent."""
    npz = folder / f"{stem}.npz"
    if npz.exists():
        try:
            arr = np.load(npz)
            images, labels = arr["images"], arr["labels"]
        except (OSError, KeyError, ValueError) as e:
            raise FewgenError(f"cannot read {npz} ({e}); replace it with the official file") from None
        n_chars, n_draw = labels.shape
        fg = torch.from_numpy(~images.reshape(-1, 105, 105)).float().unsqueeze(1)  # True = background
        lab = torch.from_numpy(labels.reshape(-1).astype(np.int64))
        lab = lab - lab.min()
        names = [f"char{id_offset + i:04d}" for i in range(n_chars)]
        return _resize_float(fg, size), lab, names
    if (folder / stem).is_dir():
        entries = [
            (p.parts[-3], p.parts[-2], p)
            for p in sorted((folder / stem).glob("*/*/*.png"))
        ]
        return _omniglot_from_pngs(entries, size, str(folder / stem))
    if (folder / f"{stem}.zip").exists():
        try:
            with zipfile.ZipFile(folder / f"{stem}.zip") as z:
                entries = []
                for info in z.infolist():
                    parts = info.filename.split("/")
                    if len(parts) == 4 and parts[-1].endswith(".png"):
                        entries.append((parts[1], parts[2], z.read(info)))
        except zipfile.BadZipFile as e:
            raise FewgenError(f"{folder / stem}.zip is not a valid zip ({e}); download it again") from None
        return _omniglot_from_pngs(entries, size, f"{folder / stem}.zip")
    return None


@register_dataset(
    "omniglot", image_size=28, channels=1,
    description=(
        "Omniglot (Lake et al.). With images_evaluation: base = background chars 0-863, val = 864-963, "
        "novel = evaluation (official). Without: background split by contiguous ids, base 0-663, "
        "val 664-763, novel 764-963 (development)"
    ),
)
def _load_omniglot(root: Path, size: int, download: bool = False) -> LoadedData:
    folder = root / "omniglot"
    bg = _omniglot_read(folder, "images_background", size, 0)
    if bg is None and download:
        _omniglot_download(folder, "images_background")
        bg = _omniglot_read(folder, "images_background", size, 0)
    if bg is None:
        parts = [_omniglot_read(folder, f"images_background_small{i}", size, 0) for i in (1, 2)]
        parts = [p for p in parts if p is not None]
        if not parts:
            raise FewgenError(
                f"Omniglot not found in {folder}: expected images_background(.npz|.zip|/) "
                "or images_background_small1/2; set FEWGEN_DATA or pass data.download=true"
            )
        imgs, labs, names = parts[0]
        for p_imgs, p_labs, p_names in parts[1:]:
            imgs = torch.cat([imgs, p_imgs])
            labs = torch.cat([labs, p_labs + len(names)])
            names = names + p_names
        bg = (imgs, labs, names)
    ev = _omniglot_read(folder, "images_evaluation", size, 965)
    if ev is None and download:
        _omniglot_download(folder, "images_evaluation")
        ev = _omniglot_read(folder, "images_evaluation", size, 965)
    bg_imgs, bg_labs, bg_names = bg
    n_bg = len(bg_names)
    if ev is not None:
        ev_imgs, ev_labs, ev_names = ev
        full = ArrayDataset(
            torch.cat([bg_imgs, ev_imgs]), torch.cat([bg_labs, ev_labs + n_bg]),
            bg_names + ev_names, name="omniglot",
        )
        n_val = 100 if n_bg == 964 else max(1, round(n_bg * 0.1))
        base = list(range(n_bg - n_val))
        val = list(range(n_bg - n_val, n_bg))
        novel = list(range(n_bg, n_bg + len(ev_names)))
        protocol = f"official: base = background[0:{n_bg - n_val}], val = background[{n_bg - n_val}:{n_bg}], novel = evaluation ({len(ev_names)} characters)"
    else:
        full = ArrayDataset(bg_imgs, bg_labs, bg_names, name="omniglot")
        if n_bg == 964:
            base, val, novel = list(range(664)), list(range(664, 764)), list(range(764, 964))
        else:
            base, val, novel = _contiguous_split(n_bg)
        protocol = (
            f"development (no images_evaluation): background characters by contiguous id, base [0,{len(base)}), "
            f"val [{len(base)},{len(base) + len(val)}), novel [{len(base) + len(val)},{n_bg})"
        )
    return LoadedData(full, base, val, novel, protocol)


# ----------------------------------------------------------------------------- folders (pacs, imagefolder)


def _scan_folder(folder: Path, with_domains: bool) -> list[tuple[str | None, str, Path]]:
    items = []
    if with_domains:
        for dom in sorted(p for p in folder.iterdir() if p.is_dir()):
            for cls in sorted(p for p in dom.iterdir() if p.is_dir()):
                items += [(dom.name, cls.name, f) for f in image_files(cls)]
    else:
        for cls in sorted(p for p in folder.iterdir() if p.is_dir()):
            items += [(None, cls.name, f) for f in image_files(cls)]
    return items


def _load_folder(folder: Path, size: int, channels: int, name: str, with_domains: bool) -> ArrayDataset:
    items = _scan_folder(folder, with_domains)
    if not items:
        raise FewgenError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    class_names = sorted({c for _, c, _ in items})
    domain_names = sorted({d for d, _, _ in items if d is not None})
    check_image_memory(len(items), channels, size, str(folder))
    imgs = np.stack([read_image(f, str(f), size, channels) for _, _, f in items])
    labels = torch.tensor([class_names.index(c) for _, c, _ in items])
    domains = torch.tensor([domain_names.index(d) for d, _, _ in items]) if with_domains else None
    return ArrayDataset(torch.from_numpy(imgs), labels, class_names, domains, domain_names, name=name)


PACS_CLASSES = ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]


@register_dataset(
    "pacs", image_size=64, channels=3, domains=True,
    description="PACS (art_painting, cartoon, photo, sketch x 7 classes) for domain generalization; "
    "few-shot split base dog/elephant, val giraffe, novel guitar/horse/house/person",
)
def _load_pacs(root: Path, size: int, download: bool = False) -> LoadedData:
    # the 64 px copy; DomainBed's layout (<root>/PACS/<domain>/...); the official download's kfold/
    # folder of full-size 227 px images (resized to data.image_size on load, like any folder)
    candidates = [root / "pacs64" / "PACS", root / "pacs" / "PACS", root / "PACS", root / "pacs",
                  root / "PACS" / "kfold", root / "pacs" / "kfold", root / "kfold"]
    folder = next((c for c in candidates if c.is_dir() and (c / "sketch").is_dir()), None)
    if folder is None:
        raise FewgenError(
            f"PACS not found under {root} (looked for {', '.join(str(c) for c in candidates)}); "
            "put the official <domain>/<class>/*.jpg folders there or set FEWGEN_DATA"
        )
    full = _load_folder(folder, size, 3, "pacs", with_domains=True)
    idx = {c: i for i, c in enumerate(full.class_names)}
    pick = lambda names: [idx[n] for n in names if n in idx]  # noqa: E731
    return LoadedData(
        full, pick(["dog", "elephant"]), pick(["giraffe"]), pick(["guitar", "horse", "house", "person"]),
        "pacs: domains for leave-one-domain-out; few-shot classes base dog/elephant, val giraffe, novel the rest",
    )


@register_dataset(
    "imagefolder", image_size=64, channels=3,
    description="your own images: data.root=<folder>/<class>/*.png|jpg, or <folder>/<domain>/<class>/...; "
    "classes split 70/10/20 by sorted name unless data.*_classes are given",
)
def _load_imagefolder(folder: Path, size: int, download: bool = False, channels: int = 3) -> LoadedData:
    if not str(folder) or not folder.is_dir():
        raise FewgenError(f"imagefolder needs data.root=<folder with one subfolder per class>; {folder!s:.200} is not a folder")
    subdirs = [p for p in folder.iterdir() if p.is_dir()]
    with_domains = bool(subdirs) and all(
        not any(f.suffix.lower() in IMAGE_EXTENSIONS for f in d.iterdir()) and any(s.is_dir() for s in d.iterdir())
        for d in subdirs
    )
    class_dirs = [c for d in subdirs for c in d.iterdir() if c.is_dir()] if with_domains else subdirs
    empty = sorted(str(c) for c in class_dirs if not image_files(c))
    if empty:  # a class without images would vanish from the split unnoticed (fit refuses it too)
        raise FewgenError(f"class folder(s) {', '.join(empty[:5])}{', ...' if len(empty) > 5 else ''} have no images "
                          f"({', '.join(IMAGE_EXTENSIONS)}); add images to them or remove them")
    full = _load_folder(folder, size, channels, f"imagefolder:{folder.name}", with_domains)
    if full.num_classes < 3:
        raise FewgenError(f"{folder} has {full.num_classes} classes; a base/val/novel split needs at least 3")
    base, val, novel = _contiguous_split(full.num_classes)
    return LoadedData(full, base, val, novel, "imagefolder: classes by sorted name, 70/10/20 percent")
