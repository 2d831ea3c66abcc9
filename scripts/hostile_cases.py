"""Issue 25's hostile cases through the CLI: each case's exit code and the last line of stderr.
usage: PYTHONPATH=<checkout>/src python scripts/hostile_cases.py WORKDIR   (run it on two checkouts to compare)"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

work = Path(sys.argv[1]); shutil.rmtree(work, ignore_errors=True); work.mkdir(parents=True)
os.chdir(work)
PY = [sys.executable, "-m", "fewgen.app.cli"]
TINY = ["pretrain.epochs=1", "pretrain.max_steps_per_epoch=3", "pretrain.val_episodes=5", "eval.episodes=10",
        "seeds=[0]", "eval.n_shots=[1]", "pipeline=[pretrain,evaluate]", f"cache_dir={work/'cache'}", "--no-progress", "--quiet"]
def run(args, timeout=300):
    p = subprocess.run(PY + args, capture_output=True, text=True, timeout=timeout)
    lines = [l for l in p.stderr.strip().splitlines() if l.strip() and "Warning" not in l and not l.startswith("  ")]
    return p.returncode, (lines[-1] if lines else "")[:150], p
rows = []
def case(name, args, **kw):
    code, line, p = run(args, **kw); rows.append((name, code, line)); return p
# 1 overwrite a non-run folder
P = work / "P"; (P / "src").mkdir(parents=True); (P / "config.yaml").write_text("model: bert\n"); (P / "src" / "train.py").write_text("x\n")
case("1 --overwrite on a folder with config.yaml", ["run", "demo", *TINY, "--out", str(P), "--overwrite"])
rows[-1] = (*rows[-1][:2], rows[-1][2] + f" [P/src/train.py {'kept' if (P/'src'/'train.py').exists() else 'DELETED'}]")
# 2 run name escapes
case("2 name=../../../escaped", ["run", "demo", *TINY, "name=../../../escaped"])
# 8 duplicate seeds
case("8 seeds=[0,0]", ["run", "demo", *TINY, "seeds=[0,0]", "--out", str(work / "s")])
# 7 huge sizes
case("7 eval.episodes=1e11", ["run", "demo", *TINY, "eval.episodes=100000000000", "--out", str(work / "e")])
case("7 data.image_size=20000", ["run", "demo", *TINY, "data.image_size=20000", "--out", str(work / "i")])
# 9 empty yaml
(work / "empty.yaml").write_text("")
case("9 empty config file", ["run", str(work / "empty.yaml"), *TINY, "--out", str(work / "y")])
# images: 16-bit, bomb, empty class
root = work / "imgs"
rng = np.random.default_rng(0)
for c in range(10):
    d = root / f"c{c}"; d.mkdir(parents=True)
    for i in range(8):
        a = (rng.random((16, 16)) * 255).astype(np.uint8)
        Image.fromarray(a.astype(np.uint16) * 257).save(d / f"{i}.png")
img_cfg = ["data.dataset=imagefolder", f"data.root={root}", "data.channels=1", "data.image_size=16",
           "eval.n_ways=[2]", "pretrain.val_n_way=2", "eval.n_query=3"]
p = case("5 16-bit PNG folder", ["run", "demo", *TINY, *img_cfg, "--out", str(work / "b16")])
try:
    from fewgen.data.datasets import read_image
except Exception:
    read_image = None
bomb = root / "c0" / "bomb.png"
Image.new("1", (40000, 40000)).save(bomb)
case("6 decompression bomb in run", ["run", "demo", *TINY, *img_cfg, "--out", str(work / "bomb")])
bomb.unlink()
(root / "empty_class").mkdir()
case("9 empty class folder", ["run", "demo", *TINY, *img_cfg, "--out", str(work / "ec")])
(root / "empty_class").rmdir()
# classifier: fit, then tamper
shots = work / "shots"
for c in ("a", "b", "=HYPERLINK(1)"):
    d = shots / c; d.mkdir(parents=True)
    for i in range(3):
        Image.fromarray((rng.random((16, 16)) * 255).astype(np.uint8)).save(d / f"{i}.png")
fp = run(["fit", str(shots), "--preset", "demo", "pretrain.epochs=1", "pretrain.max_steps_per_epoch=3",
          "pretrain.val_episodes=5", "pipeline=[pretrain,export]", f"cache_dir={work/'cache'}", "--out", str(work / "fit"),
          "--quiet", "--no-progress"])
clf = work / "fit" / "classifier"
print("fit:", fp[0], fp[1])
good = work / "good"; shutil.copytree(clf, good)
def tampered(name, edit):
    t = work / f"t-{name}"; shutil.rmtree(t, ignore_errors=True); shutil.copytree(good, t); edit(t)
    case(f"4 classifier: {name}", ["predict", str(t), str(shots), "--out", str(work / f"{name}.csv"), "--no-progress"])
def flip(t):
    b = bytearray((t / "model.safetensors").read_bytes()); n = len(b)
    for k in range(1000): b[n - 1 - k * 3 % (n // 2)] ^= 0xFF
    (t / "model.safetensors").write_bytes(bytes(b))
def js(f):
    def e(t):
        d = json.loads((t / "classifier.json").read_text()); f(d); (t / "classifier.json").write_text(json.dumps(d))
    return e
tampered("1000 flipped bytes", flip)
tampered("no backbone", js(lambda d: d.pop("backbone")))
tampered("2 names for 3 outputs", js(lambda d: d.__setitem__("class_names", d["class_names"][:2])))
tampered("head svm", js(lambda d: d.__setitem__("head", "svm")))
tampered("image_shape 100000", js(lambda d: d.__setitem__("image_shape", [1, 100000, 100000])))
# predict with a bomb + formula csv
q = work / "q"; q.mkdir(); shutil.copy(shots / "a" / "0.png", q / "ok.png"); Image.new("1", (40000, 40000)).save(q / "bomb.png")
case("6 bomb in predict", ["predict", str(clf), str(q), "--out", str(work / "pb.csv"), "--no-progress"])
case("9 predict CSV with '=HYPERLINK' class", ["predict", str(clf), str(shots), "--out", str(work / "f.csv"), "--no-progress"])
csv_text = (work / "f.csv").read_text() if (work / "f.csv").exists() else ""
rows[-1] = (*rows[-1][:2], rows[-1][2] + f" [CSV cells starting '=': {sum(c.startswith('=') for l in csv_text.splitlines() for c in l.split(','))}]")
for name, code, line in rows:
    print(f"| {name} | {code} | {line.replace('|', '/')} |")
