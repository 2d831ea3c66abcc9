"""Issue 25's hostile cases through the CLI: each case's exit code and the last line of stderr.

usage: PYTHONPATH=<checkout>/src python scripts/hostile_cases.py WORKDIR
(run it with two checkouts' src to compare them: the note of issue 25 does, old and new)
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

PY = [sys.executable, "-m", "fewgen.app.cli"]


def last_line(stderr: str) -> str:
    lines = [x for x in stderr.strip().splitlines() if x.strip() and "Warning" not in x and not x.startswith("  ")]
    return (lines[-1] if lines else "")[:150]


def main(work: Path) -> None:
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    os.chdir(work)
    tiny = ["pretrain.epochs=1", "pretrain.max_steps_per_epoch=3", "pretrain.val_episodes=5", "eval.episodes=10",
            "seeds=[0]", "eval.n_shots=[1]", "pipeline=[pretrain,evaluate]", f"cache_dir={work / 'cache'}",
            "--no-progress", "--quiet"]
    rows: list[tuple[str, int, str]] = []

    def case(name: str, args: list[str], note=None) -> None:
        p = subprocess.run(PY + args, capture_output=True, text=True, timeout=300)
        rows.append((name, p.returncode, last_line(p.stderr) + (f" [{note()}]" if note else "")))

    def png(path: Path, array: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)

    # 1 --overwrite on someone's folder that holds a config.yaml
    user = work / "P"
    (user / "src").mkdir(parents=True)
    (user / "config.yaml").write_text("model: bert\n")
    (user / "src" / "train.py").write_text("x\n")
    case("1 --overwrite on a folder with config.yaml", ["run", "demo", *tiny, "--out", str(user), "--overwrite"],
         lambda: f"P/src/train.py {'kept' if (user / 'src' / 'train.py').exists() else 'DELETED'}")
    case("2 name=../../../escaped", ["run", "demo", *tiny, "name=../../../escaped"])
    case("8 seeds=[0,0]", ["run", "demo", *tiny, "seeds=[0,0]", "--out", str(work / "s")])
    case("7 eval.episodes=1e11", ["run", "demo", *tiny, "eval.episodes=100000000000", "--out", str(work / "e")])
    case("7 data.image_size=20000", ["run", "demo", *tiny, "data.image_size=20000", "--out", str(work / "i")])
    (work / "empty.yaml").write_text("")
    case("9 empty config file", ["run", str(work / "empty.yaml"), *tiny, "--out", str(work / "y")])

    # images: a decompression bomb and an empty class folder in an imagefolder
    rng = np.random.default_rng(0)
    root = work / "imgs"
    for c in range(10):
        for i in range(8):
            png(root / f"c{c}" / f"{i}.png", (rng.random((16, 16)) * 255).astype(np.uint8))
    folder = ["data.dataset=imagefolder", f"data.root={root}", "data.channels=1", "data.image_size=16",
              "eval.n_ways=[2]", "pretrain.val_n_way=2", "eval.n_query=3"]
    bomb = root / "c0" / "bomb.png"
    Image.new("1", (40000, 40000)).save(bomb)
    case("6 decompression bomb in run", ["run", "demo", *tiny, *folder, "--out", str(work / "bomb")])
    bomb.unlink()
    (root / "empty_class").mkdir()
    case("9 empty class folder", ["run", "demo", *tiny, *folder, "--out", str(work / "ec")])
    (root / "empty_class").rmdir()

    # an exported classifier, then tampered copies of it
    shots = work / "shots"
    for c in ("a", "b", "=HYPERLINK(1)"):
        for i in range(3):
            png(shots / c / f"{i}.png", (rng.random((16, 16)) * 255).astype(np.uint8))
    subprocess.run(PY + ["fit", str(shots), "--preset", "demo", "pretrain.epochs=1", "pretrain.max_steps_per_epoch=3",
                         "pretrain.val_episodes=5", "pipeline=[pretrain,export]", f"cache_dir={work / 'cache'}",
                         "--out", str(work / "fit"), "--quiet", "--no-progress"], check=True, capture_output=True)
    clf = work / "fit" / "classifier"

    def tampered(name: str, edit) -> None:
        t = work / f"t-{name}"
        shutil.copytree(clf, t)
        edit(t)
        case(f"4 classifier: {name}", ["predict", str(t), str(shots), "--out", str(work / f"{name}.csv"),
                                       "--no-progress"])

    def flip(t: Path) -> None:
        data = bytearray((t / "model.safetensors").read_bytes())
        n = len(data)
        for k in range(1000):
            data[n - 1 - k * 3 % (n // 2)] ^= 0xFF
        (t / "model.safetensors").write_bytes(bytes(data))

    def edit_json(change):
        def edit(t: Path) -> None:
            d = json.loads((t / "classifier.json").read_text())
            change(d)
            (t / "classifier.json").write_text(json.dumps(d))
        return edit

    tampered("1000 flipped bytes", flip)
    tampered("no backbone", edit_json(lambda d: d.pop("backbone")))
    tampered("2 names for 3 outputs", edit_json(lambda d: d.__setitem__("class_names", d["class_names"][:2])))
    tampered("head svm", edit_json(lambda d: d.__setitem__("head", "svm")))
    tampered("image_shape 100000", edit_json(lambda d: d.__setitem__("image_shape", [1, 100000, 100000])))

    # predict: a bomb among good files, and a class name that is a spreadsheet formula
    queries = work / "q"
    queries.mkdir()
    shutil.copy(shots / "a" / "0.png", queries / "ok.png")
    Image.new("1", (40000, 40000)).save(queries / "bomb.png")
    case("6 bomb in predict", ["predict", str(clf), str(queries), "--out", str(work / "pb.csv"), "--no-progress"])

    def formulas() -> str:
        text = (work / "f.csv").read_text() if (work / "f.csv").exists() else ""
        cells = [c for line in text.splitlines() for c in line.split(",")]
        return f"CSV cells starting '=': {sum(c.startswith('=') for c in cells)}"

    case("9 predict CSV with '=HYPERLINK' class", ["predict", str(clf), str(shots), "--out", str(work / "f.csv"),
                                                   "--no-progress"], formulas)
    for name, code, line in rows:
        print(f"| {name} | {code} | {line.replace('|', '/')} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]).absolute())
