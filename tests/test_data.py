"""Datasets: the embedded default, every real dataset from ../shared/data, bad input."""

from __future__ import annotations

import shutil
import urllib.error
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from fewgen.data import load_dataset
from fewgen.errors import FewgenError
from tests.conftest import DATA_ROOT, requires_data


def _assert_disjoint_splits(d):
    names = [set(d.base.class_names), set(d.val.class_names), set(d.novel.class_names)]
    assert not (names[0] & names[1]) and not (names[0] & names[2]) and not (names[1] & names[2])
    for split in (d.base, d.val, d.novel):
        assert split.images.dtype == torch.uint8
        assert int(split.labels.max()) == split.num_classes - 1


def test_digits_is_embedded_and_split():
    d = load_dataset("digits")
    assert d.base.class_names == ["0", "1", "2"] and d.val.class_names == ["3", "4"]
    assert d.novel.class_names == ["5", "6", "7", "8", "9"]
    assert d.novel.images.shape[1:] == (1, 16, 16)
    assert len(d.base) + len(d.val) + len(d.novel) == 1797
    _assert_disjoint_splits(d)


@requires_data("omniglot", "images_background.npz")
def test_omniglot_npz_development_split():
    d = load_dataset("omniglot", DATA_ROOT)
    assert (d.base.num_classes, d.val.num_classes, d.novel.num_classes) == (664, 100, 200)
    assert d.novel.images.shape[1:] == (1, 28, 28)
    assert (d.novel.counts() == 20).all()
    assert "development" in d.protocol
    # strokes are foreground (bright) on a dark background
    assert d.novel.images.float().mean() < 60
    _assert_disjoint_splits(d)


@requires_data("omniglot", "images_background_small1.zip")
def test_omniglot_official_zip_folder_and_evaluation(tmp_path):
    src = DATA_ROOT / "omniglot"
    root = tmp_path / "root" / "omniglot"
    root.mkdir(parents=True)
    # background from the official small zip (zip layout), evaluation as an unpacked folder
    shutil.copy(src / "images_background_small1.zip", root / "images_background.zip")
    with zipfile.ZipFile(src / "images_background_small1.zip") as z:
        small1_alphabets = {m.split("/")[1] for m in z.namelist() if m.count("/") >= 2}
    with zipfile.ZipFile(src / "images_background_small2.zip") as z:
        members = [m for m in z.namelist() if m.count("/") == 3 and m.endswith(".png")
                   and m.split("/")[1] not in small1_alphabets][:200]
        z.extractall(tmp_path / "unz", members)
    (tmp_path / "unz" / "images_background_small2").rename(root / "images_evaluation")
    d = load_dataset("omniglot", tmp_path / "root")
    assert d.protocol.startswith("official")
    assert d.novel.num_classes == 10  # 200 drawings / 20 per character
    assert d.base.num_classes + d.val.num_classes == 136
    assert all("/character" in n for n in d.base.class_names)
    _assert_disjoint_splits(d)


@requires_data("omniglot", "images_background.npz")
def test_omniglot_png_and_npz_agree(tmp_path):
    """The npz is pixel-identical to the PNGs, so both paths must give the same 28x28 images."""
    from fewgen.data.datasets import _omniglot_read

    arr = np.load(DATA_ROOT / "omniglot" / "images_background.npz")
    folder = tmp_path / "omniglot" / "images_background" / "Alpha" / "character01"
    folder.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((arr["images"][0, i] * 255).astype(np.uint8)).save(folder / f"0001_{i + 1:02d}.png")
    png_imgs, _, _ = _omniglot_read(tmp_path / "omniglot", "images_background", 28, 0)
    npz_imgs, _, _ = _omniglot_read(DATA_ROOT / "omniglot", "images_background", 28, 0)
    assert torch.equal(png_imgs, npz_imgs[:3])


def test_omniglot_download_offline_fails_clearly(tmp_path, monkeypatch):
    def no_network(*a, **k):
        raise urllib.error.URLError("network unreachable")

    monkeypatch.setattr("urllib.request.urlretrieve", no_network)
    with pytest.raises(FewgenError, match="could not download images_background.zip"):
        load_dataset("omniglot", tmp_path, download=True)
    assert not list((tmp_path / "omniglot").glob("*.part"))


def test_omniglot_missing_without_download(tmp_path):
    with pytest.raises(FewgenError, match="Omniglot not found"):
        load_dataset("omniglot", tmp_path)


@requires_data("mnist", "t10k-images-idx3-ubyte.gz")
def test_mnist_loads_train_and_test():
    d = load_dataset("mnist", DATA_ROOT)
    assert len(d.full) == 70000 and d.full.image_shape == (1, 28, 28)
    assert d.novel.class_names == ["5", "6", "7", "8", "9"]


@requires_data("pacs64", "PACS")
def test_pacs_has_domains():
    d = load_dataset("pacs", DATA_ROOT, image_size=32)
    assert len(d.full) == 9991
    assert d.full.domain_names == ["art_painting", "cartoon", "photo", "sketch"]
    assert d.full.class_names == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    sketch = d.full.select_domains(["sketch"])
    assert sketch.image_shape == (3, 32, 32) and len(sketch) == 3929


def _write_folder(root, domains=None, classes=("a", "b", "c", "d"), n=3, size=20, suffix=".png"):
    rng = np.random.default_rng(0)
    for dom in domains or [None]:
        for c in classes:
            folder = root / c if dom is None else root / dom / c
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}{suffix}")


def test_pacs_full_size_official_layout(tmp_path):
    """The original download: PACS/kfold/<domain>/<class>/*.jpg at 227 x 227, resized on load."""
    domains = ["art_painting", "cartoon", "photo", "sketch"]
    _write_folder(tmp_path / "PACS" / "kfold", domains, classes=("dog", "elephant", "giraffe", "guitar"), n=2,
                  size=227, suffix=".jpg")
    d = load_dataset("pacs", tmp_path, image_size=64)
    assert d.full.domain_names == domains and d.full.image_shape == (3, 64, 64) and len(d.full) == 4 * 4 * 2
    assert d.novel.class_names == ["guitar"]


def test_imagefolder_classes_and_domains(tmp_path):
    _write_folder(tmp_path / "flat")
    d = load_dataset("imagefolder", tmp_path / "flat", image_size=16)
    assert d.full.num_classes == 4 and d.full.domains is None and d.full.image_shape == (3, 16, 16)
    _write_folder(tmp_path / "dom", domains=["x", "y"])
    d = load_dataset("imagefolder", tmp_path / "dom", image_size=16, channels=1)
    assert d.full.domain_names == ["x", "y"] and d.full.image_shape == (1, 16, 16)
    assert len(d.full.select_domains(["y"])) == 12


def test_corrupt_image_names_the_file(tmp_path):
    _write_folder(tmp_path / "f")
    (tmp_path / "f" / "b" / "1.png").write_bytes(b"not a png")
    with pytest.raises(FewgenError, match=r"cannot read image .*b/1\.png"):
        load_dataset("imagefolder", tmp_path / "f")


def test_unknown_dataset_suggests():
    with pytest.raises(FewgenError, match="unknown dataset 'omniglott'. Did you mean 'omniglot'"):
        load_dataset("omniglott")


def test_user_class_split():
    d = load_dataset("digits", base_classes=["0", "1"], val_classes=["2"], novel_classes=["3", "4", "5"])
    assert d.novel.class_names == ["3", "4", "5"]
    with pytest.raises(FewgenError, match="unknown classes"):
        load_dataset("digits", base_classes=["x"], val_classes=["2"], novel_classes=["3"])
