"""Synthetic sets as the learners see them: judged from the few shots alone, filtered, taken a
prefix per class; the generator-free control (augmented copies of the shots) and images made
elsewhere (``import_synthetic``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.data.images import to_uint8
from fewgen.errors import FewgenError
from fewgen.utils import seed_hash


def images_per_class(data: ArrayDataset | None) -> int:
    """The smallest number of images of a class (0 for no data)."""
    return int(data.counts().min()) if data is not None and len(data) else 0


def first_per_class(data: ArrayDataset, m: int | None) -> ArrayDataset:
    """The first ``m`` images of every class (all when ``m`` is None)."""
    if m is None:
        return data
    idx = torch.cat([ix[:m] for ix in data.indices_by_class()])
    return data.subset(idx.sort().values, name=f"{data.name}/first{m}")


@torch.no_grad()
def shot_classifier(backbone: nn.Module, real: ArrayDataset, syn: ArrayDataset, n_classes: int, c: float = 1.0,
                    max_iter: int = 1000, device: torch.device | str = "cpu"):
    """L2-normalised features of the real shots and the synthetic images under ``backbone``, and the
    probabilities over the ``n_classes`` novel classes that a logistic regression fitted on the shots
    gives each synthetic image: (real feats, synthetic feats, (n_synthetic, n_classes))."""
    from fewgen.evaluation.classifiers import LogisticRegression
    from fewgen.evaluation.features import extract_features

    fr = F.normalize(extract_features(backbone, real, device=device), dim=-1)
    fs = F.normalize(extract_features(backbone, syn, device=device), dim=-1)
    clf = LogisticRegression(c=c, max_iter=max_iter)
    clf.fit(fr[None], real.labels[None], n_classes=n_classes)
    return fr, fs, clf.predict_proba(fs[None])[0]


def keep_consistent(syn: ArrayDataset, own_prob: torch.Tensor, keep: float) -> ArrayDataset:
    """The share ``keep`` of each class's synthetic images with the highest probability of their
    own class under the shot classifier (at least one per class), in their original order, so
    ``first_per_class`` and the sweep still take a prefix."""
    if not 0 < keep <= 1:
        raise FewgenError(f"learner.synthetic_keep must be in (0, 1], got {keep}")
    if keep == 1:
        return syn
    chosen = []
    for idx in syn.indices_by_class():
        if len(idx):
            m = max(1, int(round(keep * len(idx))))
            chosen.append(idx[own_prob[idx].argsort(descending=True, stable=True)[:m]])
    idx = torch.cat(chosen).sort().values
    return syn.subset(idx, name=f"{syn.name}/keep{keep:g}")


@torch.no_grad()
def synthetic_diagnostics(backbone: nn.Module, real: ArrayDataset, syn: ArrayDataset, n_classes: int, c: float = 1.0,
                          max_iter: int = 1000, bandwidths=(0.5, 1.0, 2.0), device: torch.device | str = "cpu") -> dict:
    """How usable a synthetic set is, judged with the few shots only (never the test images).

    In the ``backbone``'s feature space: ``label_fidelity`` - the share of synthetic images that a
    logistic regression fitted on the real shots assigns to their own label (all novel classes);
    ``nn_cosine_to_shots`` - mean cosine similarity of each synthetic image to the nearest real
    shot of its class (1 = copies); ``intra_class_cosine`` - mean pairwise cosine among the
    synthetic images of a class (diversity: lower is more diverse); ``shots_intra_class_cosine``
    - the same among the real shots (needs K > 1); ``mmd_real_synthetic`` - the multi-kernel MMD
    between real shots and synthetic images (L2-normalised features).
    """
    from fewgen.learners.losses import mmd

    fr, fs, prob = shot_classifier(backbone, real, syn, n_classes, c, max_iter, device)
    fidelity = float((prob.argmax(1) == syn.labels).double().mean())
    nn_cos, intra, shots_intra = [], [], []
    for k in range(n_classes):
        r, s_ = fr[real.labels == k], fs[syn.labels == k]
        if len(s_):
            nn_cos.append(float((s_ @ r.t()).max(1).values.mean()))
        for group, out in ((s_, intra), (r, shots_intra)):
            if len(group) > 1:
                sim = group @ group.t()
                out.append(float((sim.sum() - sim.diag().sum()) / (len(group) * (len(group) - 1))))
    mean = lambda v: round(sum(v) / len(v), 4) if v else None  # noqa: E731
    return {"label_fidelity": round(fidelity, 4), "nn_cosine_to_shots": mean(nn_cos),
            "intra_class_cosine": mean(intra), "shots_intra_class_cosine": mean(shots_intra),
            "mmd_real_synthetic": round(float(mmd(fr, fs, bandwidths)), 4),
            "synthetic_per_class": images_per_class(syn), "n_synthetic": len(syn)}


def augmented_copies(real: ArrayDataset, per_class: int, seed: int) -> ArrayDataset:
    """``per_class`` random affine distortions of each class's real shots (cycled), labels kept.

    A no-generator baseline for the synthetic set: it shows what plain augmentation of the
    few shots buys, the bar a generator has to clear.
    """
    import kornia.augmentation as K

    aug = K.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.85, 1.15), shear=10, p=1.0)
    parts_x, parts_y = [], []
    for c, idx in enumerate(real.indices_by_class()):
        if not len(idx):
            continue
        src = idx[torch.arange(per_class) % len(idx)]
        torch.manual_seed(seed_hash("augmented-copies", real.name, seed, c))
        x = aug(real.float_images(src))
        parts_x.append(to_uint8(x))
        parts_y.append(torch.full((per_class,), c, dtype=torch.long))
    return ArrayDataset(torch.cat(parts_x), torch.cat(parts_y), list(real.class_names),
                        name=f"{real.name}/augmented-copies{per_class}")


def import_synthetic(folder: str, novel: ArrayDataset, per_class: int) -> ArrayDataset:
    """The first ``per_class`` images (by sorted file name) of each novel class from
    ``folder/<class name>/*.png|jpg``, at the novel data's size and channels, labelled in the
    novel classes' order. Only those files are read; other class folders are ignored."""
    from pathlib import Path

    import numpy as np

    from fewgen.data.datasets import image_files, read_image

    root = Path(folder).expanduser()
    if not root.is_dir():
        raise FewgenError(f"synthesis.import_dir={folder!r} is not a folder; give a folder with one subfolder "
                          "per novel class (<dir>/<class>/*.png)")
    missing = [c for c in novel.class_names if not (root / c).is_dir()]
    if missing:
        raise FewgenError(f"{root} has no folder for novel class(es) {', '.join(map(repr, missing[:5]))}; "
                          f"its subfolders must be named as the novel classes: {', '.join(novel.class_names[:10])}")
    c, h, _ = novel.image_shape
    files = []
    for name in novel.class_names:
        found = image_files(root / name)
        if len(found) < per_class:
            raise FewgenError(f"{root / name} has {len(found)} images but synthesis.synthetic_per_class={per_class}; "
                              "add images or lower synthesis.synthetic_per_class")
        files += found[:per_class]
    images = torch.from_numpy(np.stack([read_image(f, str(f), h, c) for f in files]))
    labels = torch.arange(len(novel.class_names)).repeat_interleave(per_class)
    return ArrayDataset(images, labels, list(novel.class_names), name=f"imported:{root.name}/{per_class}")
