"""A classifier you can keep: the pretrained backbone and a head fitted on every novel class.

A run's ``export`` step (and ``fewgen fit``) writes ``<run>/classifier/``:

* ``model.safetensors``: the backbone's weights (``backbone.*``) and the head's (``head.*``); for a
  frozen pretrained backbone (clip, dinov2) the head's only: its ``backbone`` entry in classifier.json
  names the model (absolute folder or hub id), its content digest (a changed model is refused at
  load), dtype, feature size and preprocessing (the image processor's values);
* ``classifier.json``: class names, image shape, backbone architecture, head, how it was fitted
  (shots, generated images and their weight), how images are read, and the sha256 of the other
  files (``files``);
* ``config.yaml``: the run config that made it.

A folder is checked before anything is built (:func:`check_classifier_folder`,
:func:`check_classifier_model`): the checksums; every field classifier.json needs, with its type and
range; the head, backbone and image shape against the tensors; and the fields that decide
predictions (head, class names, image shape, temperature, backbone) against the copy recorded inside
model.safetensors, so an edited classifier.json is found too. Each problem is one
:class:`FewgenError` line. Folders of format ``fewgen-classifier/1`` (no checksums, no record) are
refused: nothing could tell whether they are intact; their run can export them again.

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

FORMAT = "fewgen-classifier/2"
HEADS = ("logreg", "proto")
#: the files of a classifier folder whose sha256 classifier.json records (when they are present)
CHECKSUMMED = ("model.safetensors", "config.yaml")
#: the fields of classifier.json that decide predictions; model.safetensors records them too
RECORDED = ("head", "class_names", "image_shape", "temperature", "backbone")
#: the largest image side an exported classifier may declare (a 4096 x 4096 RGB image is 200 MB as floats)
MAX_IMAGE_SIDE = 4096
#: the largest integer in a backbone's kwargs (fewgen's backbones take a few blocks of at most a few
#: hundred channels; a larger one would make building the backbone itself the attack)
MAX_KWARG_INT = 4096
#: what a damaged or edited folder needs: it was handed over, so retraining is not the fix
INTACT_COPY = "get an intact copy of the classifier folder"


def read_image_file(path: str | Path, shape: Sequence[int], crop: bool = False) -> torch.Tensor:
    """One image file as uint8 (C, H, W) at ``shape``, read as the novel images of a run are
    (:func:`fewgen.data.novel.read_file`; ``crop``: aspect kept, centre cut out, as for pretrained
    backbones); an unreadable one is a :class:`FewgenError`."""
    from fewgen.data.novel import read_file

    return read_file(path, tuple(shape), crop)[0]


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

    @property
    def crops(self) -> bool:
        """Whether files are read aspect kept, centre cut out (a pretrained backbone: its spec says so)."""
        arch = self.info.get("backbone")
        return isinstance(arch, dict) and arch.get("read") == "shorter-side-crop"

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
            images = torch.stack([read_image_file(p, self.image_shape, self.crops) for p in files])
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
        from fewgen.utils import sha256_file, write_json

        folder = Path(folder)
        tmp = folder.parent / f".{folder.name}.writing"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        own = self.backbone.state_dict() if _own_weights(self.backbone) else {}  # else a pretrained model's, by name
        tensors = {f"backbone.{k}": v for k, v in own.items()}
        tensors.update({f"head.{k}": v for k, v in self.tensors.items()})
        fields = {"head": self.head, "class_names": list(self.class_names), "image_shape": list(self.image_shape),
                  "temperature": float(self.temperature)}
        info = {k: v for k, v in self.info.items() if k not in ("format", "files", *fields)}
        record = _canonical({**fields, "backbone": info.get("backbone")})
        save_tensors(tmp / "model.safetensors", tensors, {"format": FORMAT, "classifier": record})
        if config_yaml is not None:
            (tmp / "config.yaml").write_text(config_yaml)
        files = {name: sha256_file(tmp / name) for name in CHECKSUMMED if (tmp / name).is_file()}
        write_json(tmp / "classifier.json", {"format": FORMAT, **fields, **info, "files": files})
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
                images.append(read_image_file(p, clf.image_shape, clf.crops))
                files.append(str(p))
            except FewgenError as e:
                skipped.append((p, str(e)))
        if images:
            batch = clf.predict(torch.stack(images), top_k=top_k)
            for pred, f in zip(batch, files):
                pred.file = f
            predictions += batch
    return predictions, skipped


def _canonical(value: Any) -> Any:
    """``value`` as JSON gives it back (tuples as lists), so that two records compare as written."""
    import json

    return json.loads(json.dumps(value, default=str))


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_kwargs(value: Any, where: str) -> None:
    """Backbone kwargs hold JSON scalars and short lists of them, integers at most MAX_KWARG_INT."""
    items = value if isinstance(value, list) else [value]
    if isinstance(value, list) and len(value) > 64:
        raise FewgenError(f"{where} is a list of {len(value)} values, more than any backbone takes; {INTACT_COPY}")
    for v in items:
        if not (v is None or isinstance(v, bool | int | float | str)):
            raise FewgenError(f"{where} = {_shown(value)} is not a number, string or list of them; {INTACT_COPY}")
        if _is_int(v) and abs(v) > MAX_KWARG_INT:
            raise FewgenError(f"{where} = {_shown(value)} is beyond {MAX_KWARG_INT}, larger than any backbone "
                              f"fewgen builds; {INTACT_COPY}")


def check_classifier_fields(info: dict, where: str) -> None:
    """The fields of classifier.json (``where`` names it) that loading needs, with their types and
    ranges: ``backbone`` (a registered name and its kwargs), ``head``, ``class_names``,
    ``image_shape`` (C, H, W) and ``temperature``."""
    from collections import Counter

    from fewgen.backbones import BACKBONES

    arch = info.get("backbone")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        what = "has no 'backbone'" if arch is None else f"has backbone = {_shown(arch)}, not {{name, kwargs}}"
        raise FewgenError(f"{where} {what} (the backbone's architecture); {INTACT_COPY}")
    from fewgen.backbones.pretrained import CLIP_LORA

    if arch["name"] not in BACKBONES and arch["name"] != CLIP_LORA:
        raise FewgenError(f"{where} names backbone {arch['name']!r}, which this fewgen does not have "
                          f"({', '.join(BACKBONES.names())}); {INTACT_COPY}, or use the fewgen version that wrote it")
    kwargs = arch.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise FewgenError(f"{where} has backbone.kwargs = {_shown(kwargs)}, not a mapping; {INTACT_COPY}")
    for k, v in kwargs.items():
        _check_kwargs(v, f"{where}: backbone.kwargs.{k}")
    if info.get("head") not in HEADS:
        raise FewgenError(f"{where} has head {_shown(info.get('head'))}; fewgen's heads are "
                          f"{' and '.join(HEADS)}; {INTACT_COPY}")
    names = info.get("class_names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FewgenError(f"{where} has class_names = {_shown(names)}, not a list of class names (strings); "
                          f"{INTACT_COPY}")
    twice = sorted(n for n, count in Counter(names).items() if count > 1)
    if twice:
        raise FewgenError(f"{where} names class {twice[0]!r} more than once; {INTACT_COPY}")
    shape = info.get("image_shape")
    if (not isinstance(shape, list) or len(shape) != 3 or not all(_is_int(v) and v > 0 for v in shape)
            or shape[0] not in (1, 3)):
        raise FewgenError(f"{where} has image_shape = {_shown(shape)}, not [C, H, W] with C 1 or 3 and H, W "
                          f"positive integers; {INTACT_COPY}")
    if max(shape[1:]) > MAX_IMAGE_SIDE:
        raise FewgenError(f"{where} has image_shape = {shape}, over fewgen's limit of {MAX_IMAGE_SIDE} px a side "
                          f"(every image would be resized to that and fill memory); {INTACT_COPY}")
    temperature = info.get("temperature", 10.0)
    if not isinstance(temperature, int | float) or isinstance(temperature, bool) or not 0 < temperature < 1e6:
        raise FewgenError(f"{where} has temperature = {_shown(temperature)}, not a positive number; {INTACT_COPY}")


def check_classifier_folder(folder: Path, info: Any) -> None:
    """Everything about a classifier folder that needs no tensors: its format, the sha256 of its files
    as classifier.json records them, and classifier.json's fields (:func:`check_classifier_fields`).
    One :class:`FewgenError` line per problem."""
    from fewgen.utils import sha256_file

    where = str(folder / "classifier.json")
    if not isinstance(info, dict):
        raise FewgenError(f"{where} is not a JSON object; {INTACT_COPY}")
    if info.get("format") == "fewgen-classifier/1":
        raise FewgenError(f"{where} is a fewgen-classifier/1 folder, written before classifiers recorded checksums, "
                          f"so nothing can tell whether it is intact; export it again from its run ('export' step, "
                          f"or fewgen fit) with this fewgen")
    if info.get("format") != FORMAT:
        raise FewgenError(f"{where} is not a {FORMAT} classifier (format {_shown(info.get('format'))}); "
                          f"{INTACT_COPY}, or use the fewgen version that wrote it")
    files = info.get("files")
    if not isinstance(files, dict) or not isinstance(files.get("model.safetensors"), str):
        raise FewgenError(f"{where} records no sha256 for model.safetensors ('files'); {INTACT_COPY}")
    for name in CHECKSUMMED:
        path, recorded = folder / name, files.get(name)
        if recorded is None and path.exists():
            raise FewgenError(f"{path} is not recorded in classifier.json's files: it was added; {INTACT_COPY}")
        if recorded is not None and not path.is_file():
            raise FewgenError(f"{path} is missing (classifier.json records its sha256); {INTACT_COPY}")
        if recorded is not None and sha256_file(path) != recorded:
            raise FewgenError(f"{path} does not match the sha256 recorded in classifier.json: the file is damaged "
                              f"or was changed; {INTACT_COPY}")
    check_classifier_fields(info, where)


def _own_weights(backbone: nn.Module) -> bool:
    """Whether the folder holds ``backbone``'s weights: all of a trained one's, a fine-tuned CLIP's LoRA
    matrices; none of a frozen pretrained model's."""
    from fewgen.backbones.pretrained import CLIPLoRABackbone

    return isinstance(backbone, CLIPLoRABackbone) or not _frozen_pretrained(backbone)


def _frozen_pretrained(backbone: nn.Module) -> bool:
    """Whether ``backbone`` is a frozen pretrained model (clip, dinov2): its weights stay in its model
    folder, and classifier.json's ``backbone`` records which model, its content digest, dtype, feature
    size and preprocessing (``PretrainedImageBackbone.spec``)."""
    from fewgen.backbones.pretrained import PretrainedImageBackbone

    return isinstance(backbone, PretrainedImageBackbone)


def _pretrained_feature_size(arch: dict, where: str) -> int:
    """The feature size of the frozen pretrained backbone classifier.json records, its record checked
    (the model itself is checked against ``digest`` when it is loaded)."""
    from fewgen.backbones.pretrained import DTYPES, Preprocessing

    ok = (isinstance(arch.get("model"), str) and bool(arch["model"]) and isinstance(arch.get("digest"), str)
          and arch.get("dtype") in DTYPES and _is_int(arch.get("num_features"))
          and 0 < arch["num_features"] <= 1 << 16 and isinstance(arch.get("preprocessing"), dict))
    try:
        ok = ok and Preprocessing.from_dict(arch["preprocessing"]) is not None
    except TypeError:
        ok = False
    if not ok:
        raise FewgenError(f"{where} records the {arch['name']} backbone as {_shown(arch)}, not {{model, digest, "
                          f"dtype, num_features, preprocessing}}; {INTACT_COPY}")
    return arch["num_features"]


def _backbone_outline(info: dict, where: str) -> tuple[dict[str, torch.Tensor], int]:
    """The state dict (shapes and dtypes, no storage) and feature size of the backbone classifier.json
    describes, built on the meta device, and checked to read images of its image_shape. A frozen
    pretrained backbone has no tensors in the folder: its record gives the feature size."""
    from fewgen.backbones import create_backbone
    from fewgen.backbones.pretrained import CLIP_LORA, is_pretrained

    arch, shape = info["backbone"], info["image_shape"]
    if arch["name"] == CLIP_LORA:  # its LoRA matrices are checked against the base model when it is loaded
        if not (_is_int(arch.get("rank")) and 0 < arch["rank"] <= 1024 and isinstance(arch.get("alpha"), int | float)
                and not isinstance(arch.get("alpha"), bool) and 0 < arch["alpha"] <= 1e6):
            raise FewgenError(f"{where} records the clip-lora backbone with rank {_shown(arch.get('rank'))} and alpha "
                              f"{_shown(arch.get('alpha'))}, not a LoRA rank and scale; {INTACT_COPY}")
        return None, _pretrained_feature_size(arch, where)
    if is_pretrained(arch["name"]):
        return {}, _pretrained_feature_size(arch, where)
    try:
        with torch.device("meta"):
            outline = create_backbone(arch["name"], in_chans=shape[0], **arch.get("kwargs", {})).eval()
    except (TypeError, ValueError, RuntimeError, FewgenError) as e:
        raise FewgenError(f"{where}: backbone {arch['name']} with kwargs {_shown(arch.get('kwargs', {}))} cannot be "
                          f"built ({_shown(str(e), 120)}); {INTACT_COPY}") from None
    try:
        with torch.device("meta"), torch.no_grad():
            out = outline.forward_features(torch.empty(1, *shape))
    except (RuntimeError, ValueError, IndexError) as e:
        raise FewgenError(f"{where}: a {arch['name']} backbone cannot read images of image_shape {shape} "
                          f"({_shown(str(e), 120)}); {INTACT_COPY}") from None
    dim = int(getattr(outline, "num_features", out.shape[-1]))
    if tuple(out.shape) != (1, dim):
        raise FewgenError(f"{where}: a {arch['name']} backbone gives features of shape {tuple(out.shape[1:])} for "
                          f"image_shape {shape}, not ({dim},); {INTACT_COPY}")
    return outline.state_dict(), dim


def _head_shapes(head: str, n_classes: int, dim: int) -> dict[str, tuple[int, ...]]:
    if head == "logreg":
        return {"weight": (n_classes, dim), "bias": (n_classes, 1), "mean": (1, dim)}
    return {"prototypes": (n_classes, dim)}


def check_classifier_model(info: dict, tensors: dict[str, torch.Tensor], meta: dict, folder: Path) -> None:
    """model.safetensors against classifier.json (``info``, already through
    :func:`check_classifier_folder`): the backbone's tensors against the backbone it describes
    (names, shapes, dtypes), the head's against its class names and the backbone's feature size,
    every value finite, and the fields that decide predictions against model.safetensors' record."""
    where, model = str(folder / "classifier.json"), str(folder / "model.safetensors")
    expected, dim = _backbone_outline(info, where)
    found = {k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")}
    if expected is None:  # a fine-tuned CLIP's LoRA matrices: checked against its base model at load
        expected = {k: v for k, v in found.items() if v.is_floating_point()}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise FewgenError(f"{model} does not hold the {info['backbone']['name']} backbone classifier.json describes "
                          f"({len(missing)} tensor(s) missing, e.g. {missing[:2]}; {len(extra)} unexpected, e.g. "
                          f"{extra[:2]}); {INTACT_COPY}")
    for k, t in expected.items():
        if found[k].shape != t.shape or found[k].dtype != t.dtype:
            raise FewgenError(f"{model}: backbone.{k} is {found[k].dtype} {tuple(found[k].shape)} but the "
                              f"{info['backbone']['name']} backbone classifier.json describes needs {t.dtype} "
                              f"{tuple(t.shape)}; {INTACT_COPY}")
    head = {k[len("head."):]: v for k, v in tensors.items() if k.startswith("head.")}
    shapes, n_classes = _head_shapes(info["head"], len(info["class_names"]), dim), len(info["class_names"])
    if set(head) != set(shapes):
        raise FewgenError(f"{model} holds head tensors {sorted(head)}; a {info['head']} head has "
                          f"{sorted(shapes)}; {INTACT_COPY}")
    rows = head[next(iter(shapes))].shape[0] if head[next(iter(shapes))].dim() else 0
    if rows != n_classes:
        raise FewgenError(f"{where} names {n_classes} classes but the head in model.safetensors has {rows} "
                          f"(head.{next(iter(shapes))} rows); {INTACT_COPY}")
    for k, shape in shapes.items():
        if tuple(head[k].shape) != shape or not head[k].is_floating_point():
            raise FewgenError(f"{model}: head.{k} is {head[k].dtype} {tuple(head[k].shape)}, a {info['head']} head "
                              f"over {n_classes} classes and {dim} features needs float {shape}; {INTACT_COPY}")
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())), None)
    if bad is not None:
        raise FewgenError(f"{model}: {bad} holds NaN or infinite values; {INTACT_COPY}")
    record = meta.get("classifier")
    if not isinstance(record, dict):
        raise FewgenError(f"{model} records no classifier of its own to compare classifier.json with; {INTACT_COPY}")
    for name in RECORDED:
        value = _canonical(info.get(name, 10.0) if name == "temperature" else info.get(name))
        if value != record.get(name):
            raise FewgenError(f"{where} has {name} = {_shown(value)} but model.safetensors was exported with "
                              f"{_shown(record.get(name))}: classifier.json was changed; {INTACT_COPY}")


def load_classifier(path: str | Path, device: torch.device | str = "cpu") -> FewgenClassifier:
    """A classifier folder written by the ``export`` step or ``fewgen fit``, checked before anything is
    built (:func:`check_classifier_folder`, :func:`check_classifier_model`)."""
    import json

    from fewgen.backbones import create_backbone
    from fewgen.backbones.pretrained import (
        CLIP_LORA,
        CLIPLoRABackbone,
        Preprocessing,
        is_pretrained,
        load_pretrained,
    )
    from fewgen.checkpoint import load_tensors

    folder = Path(path).expanduser()
    meta_file = folder / "classifier.json"
    if not folder.is_dir() or not meta_file.is_file() or not (folder / "model.safetensors").is_file():
        raise FewgenError(f"{folder} is not a fewgen classifier folder (it needs classifier.json and "
                          "model.safetensors); export one with fewgen fit, or a run with 'export' in its pipeline")
    try:
        info = json.loads(meta_file.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise FewgenError(f"{meta_file} is not valid JSON ({_shown(str(e), 120)}); {INTACT_COPY}") from None
    check_classifier_folder(folder, info)
    tensors, meta = load_tensors(folder / "model.safetensors", fix=INTACT_COPY)
    check_classifier_model(info, tensors, meta, folder)
    arch, shape = info["backbone"], tuple(info["image_shape"])
    if arch["name"] == CLIP_LORA:  # the base CLIP from its folder (content checked), the LoRA matrices from here
        base = load_pretrained("clip", arch["model"], arch["dtype"], digest=arch["digest"],
                               preprocessing=Preprocessing.from_dict(arch["preprocessing"]))
        backbone = CLIPLoRABackbone(base, arch["rank"], arch["alpha"])
        backbone.load_lora({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")},
                           str(folder / "model.safetensors"))
    elif is_pretrained(arch["name"]):  # weights from its model folder, refused unless its content is the recorded one
        backbone = load_pretrained(arch["name"], arch["model"], arch["dtype"], digest=arch["digest"],
                                   preprocessing=Preprocessing.from_dict(arch["preprocessing"]))
    else:
        backbone = create_backbone(arch["name"], in_chans=shape[0], **arch.get("kwargs", {}))
        try:
            backbone.load_state_dict({k[len("backbone."):]: v for k, v in tensors.items() if k.startswith("backbone.")})
        except RuntimeError as e:
            raise FewgenError(f"{folder / 'model.safetensors'} does not fit the backbone classifier.json describes "
                              f"({_shown(str(e), 160)}); {INTACT_COPY}") from None
    head = {k[len("head."):]: v.float() for k, v in tensors.items() if k.startswith("head.")}
    extra = {k: v for k, v in info.items()
             if k not in ("format", "files", "head", "class_names", "image_shape", "temperature")}
    return FewgenClassifier(backbone.to(device).eval(), info["head"], head, list(info["class_names"]), shape, extra,
                            float(info.get("temperature", 10.0)))


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


__all__ = ["FewgenClassifier", "Prediction", "check_classifier_folder", "check_classifier_model", "fit_classifier",
           "image_paths", "load_classifier", "predict_files", "read_image_file"]
