"""A classifier you can keep: the pretrained backbone and a head fitted on every novel class.

A run's ``export`` step (and ``fewgen fit``) writes ``<run>/classifier/``:

* ``model.safetensors``: the backbone's weights (``backbone.*``) and the head's (``head.*``);
* ``classifier.json``: class names, image shape, backbone architecture, head, how it was fitted
  (shots, generated images and their weight) and how images are read;
* ``config.yaml``: the run config that made it.

It needs neither the run nor the cache: ``fewgen.load_classifier(path).predict(images)`` or
``fewgen predict CLASSIFIER IMAGES... --out predictions.csv``. Images are read as the novel images
were: converted to the classifier's channels by PIL (``L`` / ``RGB``), then resized to its size
(area average when shrinking, bilinear when enlarging).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fewgen.errors import FewgenError

FORMAT = "fewgen-classifier/1"
HEADS = ("logreg", "proto")


def read_image_file(path: str | Path, shape: Sequence[int]) -> torch.Tensor:
    """One image file as uint8 (C, H, W) at ``shape``, read as the novel images of a run are
    (:func:`fewgen.data.novel.read_file`); an unreadable one is a :class:`FewgenError`."""
    from fewgen.data.novel import read_file

    return read_file(path, tuple(shape))[0]


def image_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given and the image files under given folders (recursively, sorted)."""
    from fewgen.data.datasets import IMAGE_EXTENSIONS

    out = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        elif p.exists():
            out.append(p)
        else:
            raise FewgenError(f"{p} does not exist; give image files or folders of images")
    return out


@dataclass
class Prediction:
    """One image's result: its top-k classes with their probabilities (highest first)."""

    label: str
    probability: float
    top_k: list[tuple[str, float]]
    file: str | None = None


@dataclass
class FewgenClassifier:
    """A frozen backbone and a head over ``class_names``.

    Attributes:
        backbone: the feature extractor (``forward_features(x in [0, 1]) -> (B, D)``).
        head: ``logreg`` (multinomial logistic regression on L2-normalised features; calibrated
            probabilities) or ``proto`` (cosine nearest prototype; probabilities are the softmax
            of ``temperature`` x cosine).
        tensors: the head's tensors: ``weight`` (N, D), ``bias`` (N, 1), ``mean`` (1, D) for logreg;
            ``prototypes`` (N, D) for proto.
        image_shape: (C, H, W) the backbone reads.
        info: how it was made (backbone architecture, fit, run).
    """

    backbone: nn.Module
    head: str
    tensors: dict[str, torch.Tensor]
    class_names: list[str]
    image_shape: tuple[int, int, int]
    info: dict[str, Any] = field(default_factory=dict)
    temperature: float = 10.0

    def _head(self):
        from fewgen.evaluation.classifiers import LogisticRegression, PrototypeClassifier

        if self.head == "logreg":
            clf = LogisticRegression()
            clf.weight, clf.bias, clf.mean = (self.tensors[k][None] for k in ("weight", "bias", "mean"))
            return clf
        clf = PrototypeClassifier()
        clf.prototypes = self.tensors["prototypes"][None]
        return clf

    @torch.no_grad()
    def features(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        from fewgen.evaluation.features import extract_features

        return extract_features(self.backbone, images, batch_size=batch_size)

    def _check(self, images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or tuple(images.shape[1:]) != tuple(self.image_shape):
            raise FewgenError(f"images must be uint8 {tuple(self.image_shape)}, got {images.dtype} "
                              f"{tuple(images.shape[1:])}; read files with read_image_file or predict(paths)")

    def _proba(self, clf, feats: torch.Tensor) -> torch.Tensor:
        if self.head == "logreg":
            return clf.predict_proba(feats)[0].float()
        return (clf.decision_function(feats)[0] * self.temperature).softmax(-1)

    @torch.no_grad()
    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (n, C, H, W) at :attr:`image_shape` -> probabilities (n, n_classes)."""
        self._check(images)
        return self._proba(self._head(), self.features(images)[None])

    @torch.no_grad()
    def predict(self, images: torch.Tensor | Sequence[str | Path], top_k: int = 3) -> list[Prediction]:
        """Predictions for uint8 images (n, C, H, W) or for image files (read as the novel images
        were). The predicted class is the head's decision, exactly as the run's evaluation made it."""
        files = None
        if not isinstance(images, torch.Tensor):
            files = [str(p) for p in images]
            if not files:
                return []
            images = torch.stack([read_image_file(p, self.image_shape) for p in files])
        self._check(images)
        if not len(images):
            return []
        feats, clf = self.features(images)[None], self._head()
        labels, proba = clf.predict(feats)[0], self._proba(clf, feats)
        top_p, top_i = proba.topk(min(top_k, len(self.class_names)), dim=1)
        out = []
        for n in range(len(images)):
            best = int(labels[n])
            top = [(self.class_names[int(i)], round(float(p), 6)) for p, i in zip(top_p[n], top_i[n])]
            out.append(Prediction(self.class_names[best], round(float(proba[n, best]), 6), top,
                                  None if files is None else files[n]))
        return out

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path, config_yaml: str | None = None) -> Path:
        """Write the folder (atomically: a half-written classifier folder never appears)."""
        import os
        import shutil

        from fewgen.checkpoint import save_tensors
        from fewgen.utils import write_json

        folder = Path(folder)
        tmp = folder.parent / f".{folder.name}.writing"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        tensors = {f"backbone.{k}": v for k, v in self.backbone.state_dict().items()}
        tensors.update({f"head.{k}": v for k, v in self.tensors.items()})
        save_tensors(tmp / "model.safetensors", tensors, {"format": FORMAT})
        write_json(tmp / "classifier.json", {"format": FORMAT, "head": self.head, "class_names": self.class_names,
                                             "image_shape": list(self.image_shape), "temperature": self.temperature,
                                             **self.info})
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
        return folder


def predict_files(clf: FewgenClassifier, paths: Sequence[Path], top_k: int = 3, batch_size: int = 256,
                  progress: bool = False) -> tuple[list[Prediction], list[tuple[Path, str]]]:
    """Predictions for image files, read in batches; files that cannot be read are skipped and
    returned with the reason: (predictions in file order, [(file, reason), ...])."""
    predictions, skipped = [], []
    starts = range(0, len(paths), batch_size)
    if progress and len(paths) > batch_size:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="predict", unit="batch")
    for start in starts:
        files, images = [], []
        for p in paths[start:start + batch_size]:
            try:
                images.append(read_image_file(p, clf.image_shape))
                files.append(str(p))
            except FewgenError as e:
                skipped.append((p, str(e)))
        if images:
            batch = clf.predict(torch.stack(images), top_k=top_k)
            for pred, f in zip(batch, files):
                pred.file = f
            predictions += batch
    return predictions, skipped


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> FewgenClassifier:
    """A classifier folder written by the ``export`` step or ``fewgen fit``."""
    from fewgen.backbones import create_backbone
    from fewgen.checkpoint import load_tensors
    from fewgen.utils import read_json

    folder = Path(path).expanduser()
    meta_file = folder / "classifier.json"
    if not folder.is_dir() or not meta_file.is_file() or not (folder / "model.safetensors").is_file():
        raise FewgenError(f"{folder} is not a fewgen classifier folder (it needs classifier.json and "
                          "model.safetensors); export one with fewgen fit, or a run with 'export' in its pipeline")
    info = read_json(meta_file)
    if info.get("format") != FORMAT:
        raise FewgenError(f"{meta_file} is not a {FORMAT} classifier (format {info.get('format')!r})")
    tensors, _ = load_tensors(folder / "model.safetensors")
    arch = info["backbone"]
    backbone = create_backbone(arch["name"], in_chans=info["image_shape"][0], **arch.get("kwargs", {}))
    backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")})
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    extra = {k: v for k, v in info.items() if k not in ("format", "head", "class_names", "image_shape", "temperature")}
    return FewgenClassifier(backbone.to(device).eval(), info["head"], head, list(info["class_names"]),
                            tuple(info["image_shape"]), extra, float(info.get("temperature", 10.0)))


def fit_classifier(backbone: nn.Module, backbone_arch: dict, support_images: torch.Tensor,
                   support_labels: torch.Tensor, class_names: list[str], head: str = "logreg", c: float = 1.0,
                   max_iter: int = 1000, extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                   info: dict | None = None, features: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> FewgenClassifier:
    """Fit the head on the shots (uint8 (S, C, H, W), labels (S,)) and optional extra supports
    (features (M, D), labels (M,), weights (M,): generated images), the same fit as the run's
    all-way evaluation (logistic regression to tol 1e-7)."""
    from fewgen.evaluation.classifiers import create_classifier
    from fewgen.evaluation.features import extract_features

    if head not in HEADS:
        raise FewgenError(f"unknown classifier head {head!r}; use {' or '.join(HEADS)}")
    feats = features(support_images) if features is not None else extract_features(backbone, support_images)
    x, y, w = feats[None], support_labels[None], None
    if extra is not None:
        xs, ys, ws = extra
        x = torch.cat([x, xs[None]], 1)
        y = torch.cat([y, ys[None]], 1)
        w = torch.cat([torch.ones(len(support_labels)), ws.float()])[None]
    kwargs = {"c": c, "max_iter": max_iter, "tol": 1e-7} if head == "logreg" else {}
    clf = create_classifier(head, **kwargs).fit(x, y, n_classes=len(class_names), sample_weight=w)
    tensors = ({"weight": clf.weight[0], "bias": clf.bias[0], "mean": clf.mean[0]} if head == "logreg"
               else {"prototypes": clf.prototypes[0]})
    shape = tuple(support_images.shape[1:])
    return FewgenClassifier(backbone.eval(), head, {k: v.detach().float().contiguous() for k, v in tensors.items()},
                            list(class_names), shape, {"backbone": backbone_arch, **(info or {})})


__all__ = ["FewgenClassifier", "Prediction", "fit_classifier", "image_paths", "load_classifier", "predict_files",
           "read_image_file"]
