"""A cache that is never silently wrong: changed inputs and damaged files are detected and rebuilt.

Each test is one way a shared cache used to hand back a result made from something else.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fewgen.app.config import load_config
from fewgen.app.runner import load_data, run
from fewgen.cache import ArtifactCache
from fewgen.pretrain import pretrain_key
from fewgen.utils import stable_hash
from tests.conftest import DATA_ROOT, DIGITS, requires_data

TINY = ["pretrain.epochs=1", "pretrain.val_episodes=10", "eval.episodes=20", "seeds=[0]", "eval.n_shots=[1]"]


def _rows(r) -> list[tuple]:
    return [(row["method"], row.get("classifier"), row["n_way"], row["n_shot"], row["accuracy"]) for row in r.rows]


def _run(tmp_path, name, cache, overrides, preset=DIGITS):
    cfg = load_config(preset, [*TINY, f"cache_dir={cache}", *overrides])
    return run(cfg, tmp_path / name, progress=False, quiet=True)


def _log(r) -> str:
    return (r.dir / "log.txt").read_text()


def flip_bytes(path: Path, n: int = 512) -> None:
    """Flip ``n`` bytes in the middle of a file (past a safetensors header), as a bad disk would."""
    data = bytearray(path.read_bytes())
    start = len(data) // 2
    for i in range(start, min(len(data), start + n)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


# ----------------------------------------------------------------------------- changed config


@pytest.mark.slow
def test_changing_datadream_lambda_retrains_the_learner(tmp_path):
    learn = ["pipeline=[pretrain,augmented-copies,learn]", "learner.methods=[datadream]", "learner.steps=4",
             "learner.augmented_copies_per_class=4", "learner.frozen_synthetic=false", "learner.eval_with=[head]"]
    shared = tmp_path / "shared"
    a = _run(tmp_path, "a", shared, [*learn, "learner.datadream_lambda=0.8"])
    b = _run(tmp_path, "b", shared, [*learn, "learner.datadream_lambda=0.0"])
    fresh = _run(tmp_path, "fresh", tmp_path / "fresh-cache", [*learn, "learner.datadream_lambda=0.0"])
    assert "[datadream seed 0 1-shot] from cache" not in _log(b)
    assert _rows(b) == _rows(fresh) and _rows(b) != _rows(a)
    again = _run(tmp_path, "again", shared, [*learn, "learner.datadream_lambda=0.0"])
    assert "[datadream seed 0 1-shot] from cache" in _log(again) and _rows(again) == _rows(b)


# ----------------------------------------------------------------------------- changed data


def _digits_folder(root: Path, noisy_classes: tuple[str, ...] = ()) -> Path:
    """40 of the 8x8 digits per class as an image folder (one subfolder per digit), the images of
    ``noisy_classes`` replaced by noise under the same file names."""
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    rng = np.random.default_rng(0)
    for y in range(10):
        cls = f"digit{y}"
        (root / cls).mkdir(parents=True)
        for i in np.flatnonzero(d.target == y)[:40]:
            pixels = (d.images[i] * 16).clip(0, 255).astype(np.uint8)
            if cls in noisy_classes:
                pixels = rng.integers(0, 256, pixels.shape, dtype=np.uint8)
            Image.fromarray(pixels).save(root / cls / f"{i:04d}.png")
    return root


FOLDER = ["data.dataset=imagefolder", "data.image_size=16", "data.channels=1", "eval.n_ways=[3]",
          "data.base_classes=[digit0,digit1,digit2,digit3,digit4]", "data.val_classes=[digit5,digit6]",
          "data.novel_classes=[digit7,digit8,digit9]", "pretrain.val_n_way=2"]


@pytest.mark.slow
def test_a_folder_whose_images_changed_is_not_mistaken_for_the_old_one(tmp_path):
    clean = _digits_folder(tmp_path / "clean")
    noisy = _digits_folder(tmp_path / "noisy", noisy_classes=("digit7", "digit8", "digit9"))  # the novel classes
    folder = tmp_path / "images"
    shared = tmp_path / "shared"
    clean.rename(folder)
    first = _run(tmp_path, "first", shared, [*FOLDER, f"data.root={folder}"])
    folder.rename(tmp_path / "clean")
    noisy.rename(folder)  # same path, same file names, other pixels
    second = _run(tmp_path, "second", shared, [*FOLDER, f"data.root={folder}"])
    fresh = _run(tmp_path, "fresh", tmp_path / "fresh-cache", [*FOLDER, f"data.root={folder}"])
    assert _rows(second) == _rows(fresh) and _rows(second) != _rows(first)
    assert "pretrained backbone from cache" in _log(second)  # the base classes did not change


def test_one_changed_base_image_is_another_backbone():
    cfg = load_config(DIGITS)
    data = load_data(cfg.data, cfg.backbone)
    key = stable_hash(pretrain_key(cfg.backbone, cfg.pretrain, data))
    data.base.images[0, 0, 0, 0] ^= 1
    assert stable_hash(pretrain_key(cfg.backbone, cfg.pretrain, data)) != key
    data.base.images[0, 0, 0, 0] ^= 1
    data.val.images[-1, 0, 0, 0] ^= 1  # the val images select the epoch: they are part of the backbone too
    assert stable_hash(pretrain_key(cfg.backbone, cfg.pretrain, data)) != key


def test_another_class_split_is_another_backbone():
    default = load_config(DIGITS)
    split = load_config(DIGITS, ["data.base_classes=['0','1']", "data.val_classes=['2','3','4']",
                                 "data.novel_classes=['5','6','7','8','9']"])
    assert stable_hash(pretrain_key(default.backbone, default.pretrain, load_data(default.data, default.backbone))) != stable_hash(pretrain_key(split.backbone, split.pretrain, load_data(split.data, split.backbone)))


@requires_data("omniglot", "images_background.npz")
def test_omniglot_development_and_official_splits_never_share_a_backbone(tmp_path):
    """The development split (base 0-663) and the official protocol (base 0-863, novel = the
    evaluation set) of the same background set train different backbones."""
    root = tmp_path / "root"
    (root / "omniglot").mkdir(parents=True)
    (root / "omniglot" / "images_background.npz").symlink_to(DATA_ROOT / "omniglot" / "images_background.npz")
    dev_cfg = load_config("omniglot", [f"data.root={root}"])
    dev = load_data(dev_cfg.data, dev_cfg.backbone)
    n = 20  # a stand-in evaluation set with the official array layout
    np.savez(root / "omniglot" / "images_evaluation.npz", images=np.ones((n, 20, 105, 105), dtype=bool),
             labels=np.arange(n * 20).reshape(n, 20) // 20 + 964)
    official = load_data(dev_cfg.data, dev_cfg.backbone)
    assert "official" in official.protocol and official.base.num_classes != dev.base.num_classes
    assert stable_hash(pretrain_key(dev_cfg.backbone, dev_cfg.pretrain, dev)) != stable_hash(pretrain_key(dev_cfg.backbone, dev_cfg.pretrain, official))


# ----------------------------------------------------------------------------- damaged files


def test_cache_entry_records_checksums_and_rebuilds_on_damage(tmp_path):
    cache = ArtifactCache(tmp_path)
    entry = cache.entry("things", {"a": 1})
    (entry / "weights.bin").write_bytes(b"x" * 2000)
    (entry / "sub").mkdir()
    (entry / "sub" / "info.json").write_text("{}")
    cache.mark_done(entry, {"note": "n"})
    record = json.loads((entry / "done").read_text())
    assert set(record["files"]) == {"weights.bin", "sub/info.json"} and record["info"] == {"note": "n"}
    assert cache.ready(entry) and cache.done_info(entry) == {"note": "n"}
    messages = []
    flip_bytes(entry / "weights.bin", 1)
    assert not cache.ready(entry, messages.append)
    assert len(messages) == 1 and "weights.bin does not match the checksum" in messages[0]
    assert sorted(p.name for p in entry.iterdir()) == ["key.json"]  # cleared for a rebuild
    (entry / "weights.bin").write_bytes(b"y")
    cache.mark_done(entry)
    (entry / "weights.bin").unlink()
    assert not cache.ready(entry, messages.append) and "weights.bin is missing" in messages[-1]
    (entry / "weights.bin").write_bytes(b"y")
    (entry / "done").write_text("{not json")
    assert not cache.ready(entry, messages.append) and "done marker is unreadable" in messages[-1]


def test_build_or_load_builds_once_loads_after_and_rebuilds_a_damaged_entry(tmp_path):
    cache, built, logs = ArtifactCache(tmp_path), [], []

    def build(entry):
        built.append(entry)
        (entry / "value.txt").write_text(str(len(built)))
        cache.mark_done(entry)

    def get():
        return cache.build_or_load("things", {"a": 1}, build, lambda e: (e / "value.txt").read_text(), logs.append,
                                   what="thing")

    assert get() == "1" and get() == "1" and len(built) == 1
    assert logs[-1].startswith("thing from cache ") and built[0] == cache.path("things", {"a": 1})
    flip_bytes(built[0] / "value.txt", 1)
    assert get() == "2" and len(built) == 2  # the damaged entry was reported, cleared and built again
    assert any("does not match the checksum" in m for m in logs)


def _backbone_entry(cache: Path) -> Path:
    (entry,) = [p.parent for p in cache.glob("backbones/*/done")]
    return entry


@pytest.mark.slow
def test_a_damaged_backbone_is_rebuilt_not_used(tmp_path):
    cache = tmp_path / "cache"
    first = _run(tmp_path, "first", cache, [])
    flip_bytes(_backbone_entry(cache) / "backbone.safetensors")
    second = _run(tmp_path, "second", cache, [])
    log = _log(second)
    assert "backbone.safetensors does not match the checksum" in log and "pretraining conv4" in log
    assert _rows(second) == _rows(first)


def test_damaged_features_are_rebuilt(tmp_path):
    cache = tmp_path / "cache"
    first = _run(tmp_path, "first", cache, [])
    (features,) = cache.glob("features/*/features.safetensors")
    flip_bytes(features, 64)
    second = _run(tmp_path, "second", cache, [])
    assert "features.safetensors does not match the checksum" in _log(second)
    assert _rows(second) == _rows(first)


GENERATE = ["generator.diffusion.train_steps=6", "generator.diffusion.batch_size=8", "generator.datadream.steps_per_class=1",
            "generator.datadream.batch_size=4", "synthesis.synthetic_per_class=2", "synthesis.steps=2",
            "synthesis.grid_classes=0", "eval.n_shots=[1]"]


@pytest.mark.slow
def test_a_damaged_generator_is_rebuilt_before_it_draws(tmp_path):
    cache = tmp_path / "cache"
    cfg = load_config("generate", [*GENERATE, f"cache_dir={cache}"])
    first = run(cfg, tmp_path / "first", progress=False, quiet=True)
    images = first.state.synthetic[(0, 1)].images.clone()
    (gen_entry,) = [p.parent for p in cache.glob("generators/*/done")]
    flip_bytes(gen_entry / "generator.safetensors", 4096)
    for p in cache.glob("synthetic/*"):  # new images must come from a sound generator
        import shutil

        shutil.rmtree(p)
    second = run(cfg, tmp_path / "second", progress=False, quiet=True)
    assert "generator.safetensors does not match the checksum" in _log(second)
    assert torch.equal(second.state.synthetic[(0, 1)].images, images)


def test_a_damaged_synthetic_manifest_is_regenerated(tmp_path):
    cache = tmp_path / "cache"
    cfg = load_config("generate", [*GENERATE, f"cache_dir={cache}"])
    first = run(cfg, tmp_path / "first", progress=False, quiet=True)
    (manifest,) = cache.glob("synthetic/*/manifest.json")
    manifest.write_text(manifest.read_text().replace('"class": 0', '"class": 1', 1))  # a label moved
    second = run(cfg, tmp_path / "second", progress=False, quiet=True)
    assert "regenerating" in _log(second)
    a, b = first.state.synthetic[(0, 1)], second.state.synthetic[(0, 1)]
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


# ----------------------------------------------------------------------------- dependencies


def test_an_incompatible_generative_stack_is_one_clear_line():
    from fewgen.deps import check_generative_stack
    from fewgen.errors import FewgenError

    ok = {"diffusers": "0.42.1", "transformers": "5.24.0", "peft": "0.22.0", "accelerate": "1.15.0"}
    check_generative_stack("adapt", ok, min_peft="0.22.0")
    with pytest.raises(FewgenError) as e:
        check_generative_stack("adapt", {**ok, "peft": "0.21.2"}, min_peft="0.22.0")
    msg = str(e.value)
    assert "transformers 5.24.0 needs peft >= 0.22.0, but peft 0.21.2 is installed" in msg
    assert "requirements-lock.txt" in msg and "\n" not in msg
    with pytest.raises(FewgenError, match="needs peft .the gen extra., not installed"):
        check_generative_stack("generator", {**ok, "peft": None})


def test_the_installed_set_is_the_lock():
    """The environment the suite runs in is the tested set of requirements-lock.txt."""
    from importlib import metadata

    lock = Path(__file__).resolve().parents[1] / "requirements-lock.txt"
    pins = dict(line.split("==") for line in lock.read_text().splitlines() if line and not line.startswith("#"))
    for name in ("diffusers", "transformers", "peft", "accelerate", "numpy", "safetensors"):
        assert metadata.version(name) == pins[name], name
