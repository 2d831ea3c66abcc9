"""Your own few shots: novel classes from another dataset, an exported classifier, predict and fit."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from fewgen.app.cli import main
from fewgen.app.config import load_config
from fewgen.app.runner import load_data
from fewgen.errors import FewgenError
from tests.conftest import DIGITS, requires_data

TINY = ["pretrain.epochs=1", "pretrain.val_episodes=10", "eval.episodes=20", "seeds=[0]", "eval.n_shots=[1,2]",
        "eval.n_ways=[3]", "eval.n_query=3", "--no-progress", "--quiet"]


def shapes_folder(root: Path, per_class: int = 6, size: int = 20, classes=("disc", "bar", "cross")) -> Path:
    """A tiny RGB image folder: a coloured disc, bar or cross per class, jittered."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(0)
    for cls in classes:
        (root / cls).mkdir(parents=True)
        for i in range(per_class):
            img = Image.new("RGB", (size, size), (0, 0, 0))
            d = ImageDraw.Draw(img)
            o = int(rng.integers(0, 4))
            colour = tuple(int(v) for v in rng.integers(120, 256, 3))
            if cls == "disc":
                d.ellipse([3 + o, 3 + o, 15 + o, 15 + o], fill=colour)
            elif cls == "bar":
                d.rectangle([8 + o // 2, 2, 11 + o // 2, 17], fill=colour)
            else:
                d.line([2 + o, 2, 17 - o, 17], fill=colour, width=3)
                d.line([17 - o, 2, 2 + o, 17], fill=colour, width=3)
            img.save(root / cls / f"{i:02d}.png")
    return root


def _cli_run(tmp_path, out, *overrides):
    return main(["run", DIGITS, f"cache_dir={tmp_path / 'cache'}", *TINY, *overrides, "--out", str(tmp_path / out)])


def test_foreign_novel_classes_are_brought_to_the_base_shape(tmp_path):
    folder = shapes_folder(tmp_path / "shapes")
    cfg = load_config(DIGITS, ["data.novel_dataset=imagefolder", f"data.novel_root={folder}"])
    data = load_data(cfg.data, cfg.backbone)
    assert data.novel.image_shape == data.base.image_shape == (1, 16, 16)
    assert data.novel.class_names == ["bar", "cross", "disc"] and len(data.novel) == 18
    assert "novel classes from imagefolder" in data.protocol and "gray" in data.protocol
    assert data.base.num_classes == 8  # digits 0-2 and its own novel 5-9: every digit is base or val
    rgb = load_config(DIGITS, ["data.dataset=imagefolder", f"data.root={folder}", "data.channels=3",
                               "data.base_classes=[bar]", "data.val_classes=[cross]", "data.novel_classes=[disc]"])
    assert load_data(rgb.data, rgb.backbone).novel.image_shape[0] == 3


def test_runs_export_a_classifier_that_reloads_and_predicts_identically(tmp_path, capsys):
    """A run with novel classes from another dataset (RGB 20 px onto a gray 16 px base) exports its
    classifier; a fresh process reloads it and predicts what the run's all-way evaluation decided,
    and a second novel dataset reuses the cached backbone."""
    folder = shapes_folder(tmp_path / "shapes")
    assert _cli_run(tmp_path, "run", "data.novel_dataset=imagefolder", f"data.novel_root={folder}",
                    "pipeline=[pretrain,evaluate,export]") == 0
    clf_dir = tmp_path / "run" / "classifier"
    info = json.loads((clf_dir / "classifier.json").read_text())
    assert info["class_names"] == ["bar", "cross", "disc"] and info["image_shape"] == [1, 16, 16]
    assert info["fit"]["n_shot"] == 2 and info["fit"]["shots"] == 6 and info["fit"]["uses_synthetic"] is False
    rows = json.loads((tmp_path / "run" / "metrics.json").read_text())["rows"]
    all_way = next(r for r in rows if r.get("all_way") and r["classifier"] == "logreg" and r["n_shot"] == 2)
    assert info["all_way"]["accuracy"] == pytest.approx(all_way["accuracy"], abs=1e-6)
    assert all_way["seed_accuracies"] == [pytest.approx(all_way["accuracy"], abs=1e-3)]
    # predict the same query images (the non-shot files) in a fresh process, from the CSV
    from fewgen.data.fewshot import few_shot_set

    data = load_data(load_config(DIGITS, ["data.novel_dataset=imagefolder", f"data.novel_root={folder}"]).data)
    shots = few_shot_set(data.novel, 2, 0)
    shot_bytes = {bytes(x.numpy().tobytes()) for x in shots.images}
    queries = tmp_path / "queries"
    from fewgen.classifier import read_image_file

    for f in sorted(folder.rglob("*.png")):
        if bytes(read_image_file(f, (1, 16, 16)).numpy().tobytes()) not in shot_bytes:
            (queries / f.parent.name).mkdir(parents=True, exist_ok=True)
            (queries / f.parent.name / f.name).write_bytes(f.read_bytes())
    (queries / "bar" / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, "-m", "fewgen.app.cli", "predict", str(clf_dir), str(queries), "--out",
                           str(out)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    table = list(csv.DictReader(out.open()))
    assert set(table[0]) >= {"file", "predicted", "probability", "top_2", "probability_2", "error"}
    good = [r for r in table if not r["error"]]
    assert len(good) == 12 and len(table) == 13
    assert any("broken.png" in r["file"] and "cannot read image" in r["error"] for r in table)
    accuracy = 100 * sum(r["predicted"] == Path(r["file"]).parent.name for r in good) / len(good)
    assert accuracy == pytest.approx(info["all_way"]["accuracy"], abs=1e-6)
    assert f"accuracy against the folder names: {accuracy:.2f}%" in proc.stdout and "skipped 1" in proc.stdout
    # the same numbers from Python, in this process
    import fewgen

    clf = fewgen.load_classifier(clf_dir)
    here = clf.predict([r["file"] for r in good])
    assert [p.label for p in here] == [r["predicted"] for r in good]
    assert [f"{p.probability:.6f}" for p in here] == [r["probability"] for r in good]
    assert all(abs(sum(pr for _, pr in p.top_k) - 1) < 1e-4 or len(p.top_k) < 3 for p in here)
    # another novel dataset on the same base side: the backbone comes from the cache
    other = shapes_folder(tmp_path / "other", classes=("ring", "dot", "line"))
    assert _cli_run(tmp_path, "run2", "data.novel_dataset=imagefolder", f"data.novel_root={other}",
                    "pipeline=[pretrain,evaluate]") == 0
    assert "pretrained backbone from cache" in (tmp_path / "run2" / "log.txt").read_text()


def test_fit_exports_a_classifier_from_a_folder_of_shots_alone(tmp_path):
    folder = shapes_folder(tmp_path / "mine", per_class=3)
    (folder / "disc" / "extra.png").write_bytes((folder / "disc" / "00.png").read_bytes())  # classes may differ in size
    code = main(["fit", str(folder), "--preset", "demo", f"cache_dir={tmp_path / 'cache'}", "pretrain.epochs=1",
                 "pretrain.val_episodes=10", "generator.exemplar.train_steps=4", "synthesis.synthetic_per_class=2",
                 "synthesis.steps=2", "--out", str(tmp_path / "fit"), "--quiet", "--no-progress"])
    assert code == 0
    run_dir = tmp_path / "fit"
    info = json.loads((run_dir / "classifier" / "classifier.json").read_text())
    assert info["fit"]["shots"] == 10 and "all_way" not in info  # every shot used, nothing left to test on
    assert info["fit"]["synthetic"] == 6 and info["fit"]["uses_synthetic"] is True  # and the images drawn from them
    loo = info["leave_one_out"]  # the estimate a user gets without query images
    assert loo["shots"] == 10 and 0 <= loo["correct"] <= 10 and loo["accuracy"] == pytest.approx(10 * loo["correct"])
    assert "estimate from the shots alone (leave one out)" in (run_dir / "log.txt").read_text()
    assert not (run_dir / "episodes").exists()
    assert (run_dir / "report" / "index.html").exists()
    pred = tmp_path / "p.csv"
    assert main(["predict", str(run_dir / "classifier"), str(folder), "--out", str(pred)]) == 0
    assert len(list(csv.DictReader(pred.open()))) == 10


@pytest.mark.parametrize("case, message", [
    ("one-class", "has 1 class folder(s); a classifier needs at least two classes"),
    ("empty-class", "has no images"),
    ("unreadable", "cannot read image"),
    ("too-small", "has no sensible result"),
])
def test_bad_novel_folders_are_one_clear_line(tmp_path, capsys, case, message):
    folder = shapes_folder(tmp_path / "shapes", size=3 if case == "too-small" else 20)
    if case == "one-class":
        import shutil

        shutil.rmtree(folder / "bar")
        shutil.rmtree(folder / "cross")
    elif case == "empty-class":
        (folder / "empty").mkdir()
    elif case == "unreadable":
        (folder / "bar" / "zz.png").write_bytes(b"\x89PNG broken")
    code = _cli_run(tmp_path, "r", "data.novel_dataset=imagefolder", f"data.novel_root={folder}")
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not (tmp_path / "r").exists() and not list(tmp_path.glob(".r.*"))


def test_predict_refuses_what_is_not_a_classifier(tmp_path, capsys):
    (tmp_path / "notone").mkdir()
    assert main(["predict", str(tmp_path / "notone"), str(tmp_path), "--out", str(tmp_path / "p.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a fewgen classifier folder" in err[0]
    assert not (tmp_path / "p.csv").exists()
    with pytest.raises(FewgenError, match="is not a fewgen classifier folder"):
        __import__("fewgen").load_classifier(tmp_path / "nowhere")


@requires_data("mnist", "t10k-images-idx3-ubyte.gz")
def test_mnist_as_novel_side_is_its_ten_thousand_test_digits(data_root):
    cfg = load_config(DIGITS, [f"data.root={data_root}", "data.novel_dataset=mnist"])
    data = load_data(cfg.data, cfg.backbone)
    assert data.novel.num_classes == 10 and len(data.novel) == 10000 and data.novel.image_shape == (1, 16, 16)
    assert "28 -> 16 px (area average)" in data.protocol
    assert torch.bincount(data.novel.labels).min() > 800


@pytest.mark.parametrize("head", ["logreg", "proto"])
def test_leave_one_out_equals_one_fit_per_left_out_shot(head):
    """The batched leave-one-out estimate equals fitting the head once per left-out shot; a class
    with a single shot is not left out (nothing of it would remain)."""
    from fewgen.evaluation.classifiers import create_classifier
    from fewgen.evaluation.protocol import leave_one_out_accuracy

    g = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 3])
    feats = torch.randn(4, 8, generator=g)[labels] + 2.0 * torch.randn(len(labels), 8, generator=g)
    got = leave_one_out_accuracy(feats, labels, 4, head, chunk=3)
    want = []
    for i in range(8):  # the last shot is its class's only one
        keep = torch.arange(len(labels)) != i
        clf = create_classifier(head, **({"tol": 1e-7} if head == "logreg" else {}))
        clf.fit(feats[keep][None], labels[keep][None], n_classes=4)
        want.append(float(clf.predict(feats[i][None, None])[0, 0] == labels[i]))
    assert got.tolist() == want and 0 < sum(want) < 8
