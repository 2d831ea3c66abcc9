"""Write a run's novel images that its exported classifier was not fitted on, as PNG files at their
own resolution in one folder per class, so `fewgen predict` can classify exactly the images the
run's all-way evaluation of that classifier did:

    python scripts/write_novel_queries.py runs/mnist /tmp/mnist-queries
    fewgen predict runs/mnist/classifier /tmp/mnist-queries --out /tmp/mnist-predictions.csv

(the printed "accuracy against the folder names" is then the classifier's all-way accuracy,
``classifier.json`` -> ``all_way``, and the run's all-way row for that seed).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import yaml


def main(argv: list[str] | None = None) -> int:
    from fewgen.app.config import RunConfig, update_dataclass
    from fewgen.data.datasets import DATASETS
    from fewgen.data.fewshot import few_shot_indices
    from fewgen.data.novel import load_novel
    from fewgen.synthesis.store import write_png

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished run with an exported classifier")
    p.add_argument("out", help="folder to write <class>/<index>.png into")
    args = p.parse_args(argv)
    run = Path(args.run)
    cfg = RunConfig()
    update_dataclass(cfg, yaml.safe_load((run / "config.yaml").read_text()))
    fit = json.loads((run / "classifier" / "classifier.json").read_text())["fit"]
    d = cfg.data
    if not d.novel_dataset or d.novel_dataset == "imagefolder":
        sys.exit("the run must take its novel classes from a registered dataset (data.novel_dataset)")
    meta = DATASETS.meta(d.novel_dataset)
    native = (meta["channels"], meta["image_size"], meta["image_size"])
    novel, _ = load_novel(d.novel_dataset, d.root, native, d.novel_classes)
    keep = torch.ones(len(novel), dtype=torch.bool)
    keep[few_shot_indices(novel, fit["n_shot"], fit["seed"]).reshape(-1)] = False
    out = Path(args.out)
    for i in keep.nonzero().squeeze(1).tolist():
        write_png(out / novel.class_names[int(novel.labels[i])] / f"{i:06d}.png", novel.images[i])
    print(f"{int(keep.sum())} images of {novel.num_classes} classes in {out} (the {len(novel) - int(keep.sum())} "
          f"shots of seed {fit['seed']}, {fit['n_shot']}-shot left out)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
