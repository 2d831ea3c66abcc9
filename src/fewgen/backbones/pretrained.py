"""Pretrained image models as frozen backbones: CLIP's image tower (Radford et al. 2021, "Learning
Transferable Visual Models From Natural Language Supervision") and DINOv2 (Oquab et al. 2023,
"DINOv2: Learning Robust Visual Features without Supervision"), loaded with transformers from
``backbone.model``, a local folder or a hub id.

Features: ``clip`` gives ``image_embeds`` (the projected embedding of ``CLIPVisionModelWithProjection``;
a ``CLIPModel`` folder works too, its vision tower is read), ``dinov2`` the CLS token of the last
hidden state after the final layer norm (``pooler_output`` of ``Dinov2Model``).

Images are preprocessed as the model's own image processor does (its ``preprocessor_config.json``;
transformers' ``CLIPImageProcessor`` or ``BitImageProcessor``, the PIL implementation): the shorter
side resized to ``size.shortest_edge`` by PIL (bicubic, antialiased, on the 8-bit image), the
centre ``crop_size`` cut out (zero-padded where the image is smaller), values rescaled by
``rescale_factor`` and normalised with ``image_mean`` / ``image_std``. :func:`preprocess` does this
on uint8 tensors (gray repeated to RGB); features, export and predict all go through it, and
``tests/test_pretrained_backbones.py`` pins it to the processor's ``pixel_values``.

The models are frozen: the ``pretrain`` step loads them and trains nothing. Their cache key is their
content (:func:`model_digest`: config, processor config and weight files), never their path.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewgen.backbones.registry import BACKBONES
from fewgen.errors import FewgenError

#: the processors whose steps :func:`preprocess` reproduces (the fast ones are read as their PIL twin)
PROCESSORS = ("CLIPImageProcessor", "CLIPImageProcessorFast", "BitImageProcessor", "BitImageProcessorFast")
#: the files a model's content key covers (and the only ones fetched for a hub id)
MODEL_FILES = ("config.json", "preprocessor_config.json", "*.safetensors", "*.safetensors.index.json")
#: CLIPImageProcessor's and BitImageProcessor's defaults, for keys a processor config leaves out
_OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DTYPES = ("float32", "float16", "bfloat16")


# ----------------------------------------------------------------------------- preprocessing


@dataclass(frozen=True)
class Preprocessing:
    """The steps of a model's image processor, as :func:`preprocess` applies them.

    Attributes:
        shortest_edge: resize so the shorter side is this long (aspect kept), or None.
        size: resize to exactly (height, width) instead (processors configured that way), or None.
        resample: the PIL filter of the resize (3 = bicubic).
        crop: (height, width) of the centre crop, or None.
        rescale: factor the 8-bit values are multiplied by (1/255), or None.
        mean, std: per-channel normalisation (RGB), or None.
    """

    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    resample: int = 3
    crop: tuple[int, int] | None = (224, 224)
    rescale: float | None = 1 / 255
    mean: tuple[float, ...] | None = _OPENAI_CLIP_MEAN
    std: tuple[float, ...] | None = _OPENAI_CLIP_STD

    @classmethod
    def from_processor_config(cls, config: dict[str, Any], where: str = "preprocessor_config.json") -> Preprocessing:
        """Read a ``preprocessor_config.json`` of a supported processor (:data:`PROCESSORS`),
        normalising sizes as transformers' ``get_size_dict`` does (an int ``size`` is the shortest
        edge, an int ``crop_size`` a square)."""
        kind = config.get("image_processor_type")
        if kind not in PROCESSORS:
            raise FewgenError(f"{where}: image processor {kind!r} is not supported; fewgen reproduces "
                              f"{', '.join(p for p in PROCESSORS if not p.endswith('Fast'))}")

        def size_dict(value: Any, square: bool) -> dict[str, int]:
            if isinstance(value, int):
                return {"height": value, "width": value} if square else {"shortest_edge": value}
            if isinstance(value, list | tuple):
                return {"height": int(value[0]), "width": int(value[1])}
            return {k: int(v) for k, v in dict(value).items() if v is not None}

        shortest, size = None, None
        if config.get("do_resize", True):
            s = size_dict(config.get("size", {"shortest_edge": 224}), square=False)
            if config.get("use_square_size") and "shortest_edge" in s:  # CLIP's option for KOSMOS-2
                s = {"height": s["shortest_edge"], "width": s["shortest_edge"]}
            if set(s) == {"shortest_edge"}:
                shortest = s["shortest_edge"]
            elif set(s) == {"height", "width"}:
                size = (s["height"], s["width"])
            else:
                raise FewgenError(f"{where}: size {s} is not supported; give size.shortest_edge or size.height "
                                  "and size.width")
        crop = None
        if config.get("do_center_crop", True):
            c = size_dict(config.get("crop_size", {"height": 224, "width": 224}), square=True)
            crop = (c["height"], c["width"])
        rescale = float(config.get("rescale_factor", 1 / 255)) if config.get("do_rescale", True) else None
        mean = std = None
        if config.get("do_normalize", True):
            mean = _triple(config.get("image_mean", _OPENAI_CLIP_MEAN))
            std = _triple(config.get("image_std", _OPENAI_CLIP_STD))
        return cls(shortest, size, int(config.get("resample", 3)), crop, rescale, mean, std)

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    @property
    def read_size(self) -> int:
        """The square side images are best read at: what the processor resizes to (so a square
        image needs no resize), else the crop."""
        if self.shortest_edge is not None:
            return self.shortest_edge
        if self.size is not None:
            return max(self.size)
        return max(self.crop) if self.crop is not None else 224

    def describe(self) -> str:
        parts = []
        if self.shortest_edge is not None:
            parts.append(f"shorter side -> {self.shortest_edge} px (PIL filter {self.resample})")
        elif self.size is not None:
            parts.append(f"resize to {self.size[0]}x{self.size[1]} (PIL filter {self.resample})")
        if self.crop is not None:
            parts.append(f"centre crop {self.crop[0]}x{self.crop[1]}")
        if self.mean is not None:
            parts.append("normalised")
        return ", ".join(parts) or "none"


def _triple(value: Any) -> tuple[float, ...]:
    v = [float(value)] * 3 if isinstance(value, int | float) else [float(x) for x in value]
    return tuple(v)


def resized_shape(height: int, width: int, prep: Preprocessing) -> tuple[int, int]:
    """(height, width) after the processor's resize (transformers' ``get_resize_output_image_size``
    with ``default_to_square=False``: the longer side truncated, not rounded)."""
    if prep.size is not None:
        return prep.size
    if prep.shortest_edge is None:
        return height, width
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(prep.shortest_edge * long / short)
    return (new_long, prep.shortest_edge) if width <= height else (prep.shortest_edge, new_long)


def center_crop(image: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    """The centre (height, width) of an (H, W, C) array, zero-padded where the image is smaller
    (transformers' ``center_crop``, offsets rounded the same way)."""
    ch, cw = crop
    h, w = image.shape[:2]
    top, left = (h - ch) // 2, (w - cw) // 2
    if top >= 0 and left >= 0:
        return image[top:top + ch, left:left + cw]
    nh, nw = max(ch, h), max(cw, w)
    canvas = np.zeros((nh, nw, *image.shape[2:]), dtype=image.dtype)
    pad_top, pad_left = math.ceil((nh - h) / 2), math.ceil((nw - w) / 2)
    canvas[pad_top:pad_top + h, pad_left:pad_left + w] = image
    top, left = top + pad_top, left + pad_left
    return canvas[max(0, top):min(nh, top + ch), max(0, left):min(nw, left + cw)]


def preprocess(images: torch.Tensor, prep: Preprocessing) -> torch.Tensor:
    """Images (n, C, H, W), uint8 or float in [0, 1] (rounded to 8 bits first: the processor works on
    8-bit images), C = 1 (repeated to RGB) or 3 -> pixel values float32 (n, 3, h, w), equal to the
    image processor's ``pixel_values`` of the same images."""
    from PIL import Image

    x = images.detach().cpu()
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0, 1) * 255).round().to(torch.uint8)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise FewgenError(f"images must be (n, 1 or 3, H, W), got {tuple(x.shape)}")
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    out = []
    for img in x.permute(0, 2, 3, 1).numpy():  # (H, W, 3)
        if prep.shortest_edge is not None or prep.size is not None:
            h, w = resized_shape(img.shape[0], img.shape[1], prep)
            img = np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize((w, h), resample=prep.resample))
        if prep.crop is not None:
            img = center_crop(img, prep.crop)
        out.append(np.ascontiguousarray(img))
    if not out:
        h, w = prep.crop or prep.size or (0, 0)
        return torch.zeros(0, 3, h, w)
    pixels = torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2)
    # the processor rescales in float64 and stores float32, then normalises in float32
    pixels = (pixels.double() * prep.rescale).float() if prep.rescale is not None else pixels.float()
    if prep.mean is not None:
        mean = torch.tensor(prep.mean, dtype=torch.float32).view(1, 3, 1, 1)
        std = torch.tensor(prep.std, dtype=torch.float32).view(1, 3, 1, 1)
        pixels = (pixels - mean) / std
    return pixels.contiguous()


# ----------------------------------------------------------------------------- where a model is


def resolve_model(model: str | None, name: str) -> tuple[Path, str]:
    """The local folder of ``backbone.model`` and how it is recorded: a folder as its absolute path,
    a hub id as itself (its snapshot fetched, only :data:`MODEL_FILES`, or taken from the hub cache)."""
    if not model:
        raise FewgenError(f"backbone.name={name} needs backbone.model=<a local model folder or hub id>, e.g. "
                          f"backbone.model={'openai/clip-vit-base-patch32' if name == 'clip' else 'facebook/dinov2-small'}")
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve(), str(path.resolve())
    if path.exists() or model.startswith((".", "/", "~")) or model.count("/") > 1:
        raise FewgenError(f"backbone.model={model!r} is not a folder; give a folder holding config.json, "
                          "preprocessor_config.json and safetensors weights, or a hub id")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(model, allow_patterns=list(MODEL_FILES))
    except Exception as e:  # no network, unknown id, gated model: all one answer for the user
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FewgenError(f"backbone.model={model!r} is not a local folder and the hub model could not be "
                          f"fetched ({first}); give a local folder, or fetch it once online") from None
    return Path(folder), model


def model_digest(folder: Path) -> str:
    """Content key of a model folder: the sha256 of each of its :data:`MODEL_FILES` by name."""
    from fewgen.utils import content_digest, path_digest

    files = sorted(f for f in Path(folder).iterdir()
                   if f.is_file() and any(fnmatch.fnmatch(f.name, p) for p in MODEL_FILES))
    if not any(f.suffix == ".safetensors" for f in files):
        raise FewgenError(f"{folder} holds no safetensors weights (*.safetensors); save the model with "
                          "save_pretrained (safe_serialization) or give another folder")
    return content_digest({f.name: path_digest(f) for f in files})


def read_preprocessing(folder: Path) -> Preprocessing:
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        raise FewgenError(f"{folder} has no preprocessor_config.json, so its preprocessing is unknown; save the "
                          "model's image processor there (processor.save_pretrained(folder))")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise FewgenError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
    return Preprocessing.from_processor_config(config, str(path))


# ----------------------------------------------------------------------------- the backbone


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Loading a CLIPModel folder into its vision tower lists every text weight as unexpected: expected here."""
    from transformers.utils import logging as hf_logging

    level, bar = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bar:
            hf_logging.enable_progress_bar()


@dataclass(frozen=True)
class ModelKind:
    """How one registered pretrained backbone loads its model and reads its features."""

    model_types: tuple[str, ...]  # config.json model_type values it accepts
    describe: str
    load: Callable[[Path], nn.Module]
    features: Callable[[Any], torch.Tensor]
    num_features: Callable[[Any], int]


def _load_clip(folder: Path) -> nn.Module:
    from transformers import CLIPVisionModelWithProjection

    return CLIPVisionModelWithProjection.from_pretrained(str(folder), use_safetensors=True)


def _load_dinov2(folder: Path) -> nn.Module:
    from transformers import AutoModel

    return AutoModel.from_pretrained(str(folder), use_safetensors=True)


KINDS: dict[str, ModelKind] = {
    "clip": ModelKind(("clip", "clip_vision_model"), "a CLIP model (CLIPModel or CLIPVisionModelWithProjection)",
                      _load_clip, lambda out: out.image_embeds, lambda config: int(config.projection_dim)),
    "dinov2": ModelKind(("dinov2", "dinov2_with_registers"), "a DINOv2 model (Dinov2Model)",
                        _load_dinov2, lambda out: out.pooler_output, lambda config: int(config.hidden_size)),
}


class PretrainedImageBackbone(nn.Module):
    """A frozen transformers image model with the backbone contract: ``forward_features(x) -> (B, D)``
    on images of any size (uint8, or float in [0, 1]), preprocessed by :func:`preprocess`, and
    ``num_features`` (D).

    Attributes:
        name: the registered backbone (``clip``, ``dinov2``).
        source: the model as recorded (absolute folder, or hub id).
        folder: where its files are.
        digest: its content key (:func:`model_digest`).
        preprocessing: its image processor's steps.
    """

    def __init__(self, name: str, model: nn.Module, preprocessing: Preprocessing, source: str, folder: Path,
                 digest: str, dtype: str = "float32"):
        super().__init__()
        self.name, self.source, self.folder, self.digest = name, source, Path(folder), digest
        self.preprocessing, self.dtype_name = preprocessing, dtype
        self.model = model.to(getattr(torch, dtype)).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.num_features = KINDS[name].num_features(model.config)

    def train(self, mode: bool = True) -> PretrainedImageBackbone:
        super().train(mode)
        self.model.eval()  # frozen: no dropout, whatever the caller's mode
        return self

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (n, C, H, W) -> the model's pixel values (n, 3, h, w) (:func:`preprocess`)."""
        return preprocess(images, self.preprocessing)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: images (B, 1 or 3, H, W), uint8 or float in [0, 1] -> features (B, num_features), float32."""
        p = next(self.model.parameters())
        pixels = self.preprocess(x).to(device=p.device, dtype=p.dtype)
        return KINDS[self.name].features(self.model(pixel_values=pixels)).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)

    def spec(self) -> dict[str, Any]:
        """What an exported classifier records instead of the weights: the model (folder or hub id)
        and its content digest, the dtype, the feature size and the preprocessing."""
        return {"name": self.name, "model": self.source, "digest": self.digest, "dtype": self.dtype_name,
                "num_features": self.num_features, "preprocessing": self.preprocessing.to_dict(),
                "read": "shorter-side-crop"}  # files: aspect kept, centre cut out (fewgen.data.novel.crop_to)


def load_pretrained(name: str, model: str | None, dtype: str = "float32", digest: str | None = None,
                    preprocessing: Preprocessing | None = None) -> PretrainedImageBackbone:
    """The frozen backbone ``name`` (a key of :data:`KINDS`) from ``model`` (folder or hub id).

    ``digest``: the content the caller expects (an exported classifier's); another content is refused
    in one line before any weight is read. ``preprocessing``: the recorded steps (default: read from
    the model's ``preprocessor_config.json``)."""
    kind = KINDS[name]
    if dtype not in DTYPES:
        raise FewgenError(f"backbone.dtype={dtype!r} is not one of {', '.join(DTYPES)}")
    folder, source = resolve_model(model, name)
    found = model_digest(folder)
    if digest is not None and found != digest:
        raise FewgenError(f"the base model {source} changed since this classifier was made (content {found}, "
                          f"recorded {digest}); restore the model it was fitted on, or export the classifier again")
    config_file = folder / "config.json"
    try:
        model_type = json.loads(config_file.read_text()).get("model_type")
    except (OSError, json.JSONDecodeError):
        raise FewgenError(f"{folder} has no readable config.json; give a transformers model folder") from None
    if model_type not in kind.model_types:
        raise FewgenError(f"backbone.model={source} is a {model_type!r} model; backbone.name={name} needs "
                          f"{kind.describe}")
    prep = preprocessing or read_preprocessing(folder)
    try:
        import transformers  # noqa: F401
    except ImportError:
        raise FewgenError(f"backbone.name={name} needs transformers: pip install 'fewgen[gen]'") from None
    try:
        with _quiet_transformers():
            net = kind.load(folder)
    except (OSError, ValueError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise FewgenError(f"cannot load {kind.describe} from {source} ({first})") from None
    return PretrainedImageBackbone(name, net, prep, source, folder, found, dtype)


def _no_kwargs(name: str, kwargs: dict) -> None:
    if kwargs:  # gray images are repeated to RGB (in_chans is moot); nothing else is built
        raise FewgenError(f"backbone.name={name} takes no backbone.kwargs (got {sorted(kwargs)}); it is "
                          "configured by backbone.model and backbone.dtype")


@BACKBONES.register("clip", pretrained=True)
def clip(in_chans: int = 3, model: str | None = None, dtype: str = "float32", **kwargs: Any) -> PretrainedImageBackbone:
    """CLIP's image tower, frozen, from ``model`` (folder or hub id); features = ``image_embeds``."""
    _no_kwargs("clip", kwargs)
    return load_pretrained("clip", model, dtype)


@BACKBONES.register("dinov2", pretrained=True)
def dinov2(in_chans: int = 3, model: str | None = None, dtype: str = "float32", **kwargs: Any) -> PretrainedImageBackbone:
    """DINOv2, frozen, from ``model`` (folder or hub id); features = the normalised CLS token."""
    _no_kwargs("dinov2", kwargs)
    return load_pretrained("dinov2", model, dtype)


def is_pretrained(name: str) -> bool:
    """Whether the registered backbone ``name`` is a frozen pretrained model (no pretraining)."""
    return bool(BACKBONES.meta(name).get("pretrained"))


def default_image_size(backbone_cfg) -> int | None:
    """The side images are read at for a pretrained backbone when ``data.image_size`` is null: its
    processor's resize size (:attr:`Preprocessing.read_size`); None for the others."""
    if not is_pretrained(backbone_cfg.name):
        return None
    folder, _ = resolve_model(backbone_cfg.model, backbone_cfg.name)
    return read_preprocessing(folder).read_size


__all__ = ["KINDS", "MODEL_FILES", "PROCESSORS", "Preprocessing", "PretrainedImageBackbone", "center_crop",
           "default_image_size", "is_pretrained", "load_pretrained", "model_digest", "preprocess",
           "read_preprocessing", "resized_shape", "resolve_model"]


# ----------------------------------------------------------------------------- CLIP + LoRA, exported

#: the name an exported fine-tuned CLIP + LoRA classifier records for its backbone (not a choice for
#: backbone.name: it is made by the export step from the CLIP learner, ``export.model=learner``)
CLIP_LORA = "clip-lora"
#: the attention projections DataDream's classifier adapts (``fewgen.learners.clip.LORA_TARGETS``)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
_VISION_PREFIX = "base_model.model.vision_model."


class CLIPLoRABackbone(PretrainedImageBackbone):
    """CLIP's image tower from ``backbone.model`` with LoRA adapters on its attention projections:
    the image side of the fine-tuned CLIP + LoRA learner. Its own weights are the LoRA matrices
    (:meth:`state_dict`); the base stays in its model folder, checked by its content digest."""

    def __init__(self, base: PretrainedImageBackbone, rank: int, alpha: float):
        from peft import LoraConfig, get_peft_model

        lora = get_peft_model(base.model, LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(LORA_TARGETS)))
        super().__init__("clip", lora, base.preprocessing, base.source, base.folder, base.digest, base.dtype_name)
        self.num_features = KINDS["clip"].num_features(base.model.config)
        self.name, self.rank, self.alpha = CLIP_LORA, int(rank), float(alpha)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        p = next(self.model.parameters())
        pixels = self.preprocess(x).to(device=p.device, dtype=p.dtype)
        return KINDS["clip"].features(self.model(pixel_values=pixels)).float()

    def state_dict(self, *args, **kwargs):  # noqa: D102  (the LoRA matrices only)
        from peft import get_peft_model_state_dict

        return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model).items()}

    def load_lora(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load LoRA matrices (keys as :meth:`state_dict` gives them), every one expected and present."""
        from peft import set_peft_model_state_dict

        expected = self.state_dict()
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        bad = [k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape)]
        if missing or extra or bad:
            raise FewgenError(f"{where} does not hold the LoRA matrices of this CLIP at rank {self.rank} "
                              f"({len(missing)} missing, {len(extra)} unexpected, {len(bad)} of another shape); "
                              "get an intact copy of the classifier folder")
        set_peft_model_state_dict(self.model, state)

    def spec(self) -> dict[str, Any]:
        return {**super().spec(), "name": CLIP_LORA, "rank": self.rank, "alpha": self.alpha}


def clip_lora_from_learner(learner, model: str, dtype: str = "float32") -> CLIPLoRABackbone:
    """The image side of a trained :class:`fewgen.learners.clip.CLIPClassifier` of the CLIP ``model``
    (folder or hub id): a fresh copy of its image tower (LoRA is injected in place, so never into a
    backbone in use) with the learner's vision LoRA matrices copied over."""
    from peft import get_peft_model_state_dict

    cfg = learner.clip.peft_config["default"]
    out = CLIPLoRABackbone(load_pretrained("clip", model, dtype), cfg.r, cfg.lora_alpha)
    state = {k: v for k, v in get_peft_model_state_dict(learner.clip).items() if k.startswith(_VISION_PREFIX)}
    out.load_lora(state, "the CLIP learner")
    return out
