"""Dataclass configs merged from defaults < preset < user file < command line.

Each section is a dataclass whose fields carry ``help`` metadata; unknown keys are errors
that suggest the closest known key. A YAML file may name ``base: <preset or file>`` to start
from another config.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from fewgen.errors import FewgenError


def opt(default: Any, help: str) -> Any:  # noqa: A002
    """A dataclass field with a default (copied if mutable) and help text."""
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class DataConfig:
    dataset: str = opt("digits", "registered dataset (fewgen datasets lists them)")
    root: str | None = opt(None, "data root with one folder per dataset (default $FEWGEN_DATA, else ./data); for imagefolder the folder itself")
    image_size: int | None = opt(None, "square image side; the dataset's default when null")
    channels: int | None = opt(None, "1 or 3 (imagefolder only)")
    download: bool = opt(False, "download official files when missing (omniglot)")
    base_classes: list[str] | None = opt(None, "override the base classes by name")
    val_classes: list[str] | None = opt(None, "override the validation classes by name")
    novel_classes: list[str] | None = opt(None, "override the novel classes by name")


@dataclass
class BackboneConfig:
    name: str = opt("conv4", "registered backbone: conv4, conv4-wide, resnet12, resnet12-small")
    kwargs: dict[str, Any] = opt({}, "extra constructor arguments")


@dataclass
class PretrainConfig:
    recipe: str = opt("ce", "base-class pretraining recipe")
    epochs: int = opt(10, "training epochs over the base classes")
    batch_size: int = opt(128, "images per step")
    optimizer: str = opt("sgd", "sgd or adam")
    lr: float = opt(0.05, "peak learning rate (cosine schedule)")
    momentum: float = opt(0.9, "SGD momentum")
    weight_decay: float = opt(5e-4, "weight decay")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy")
    augment: list[str] = opt(["crop"], "kornia augmentations: crop, resized_crop, flip, affine, color")
    rotation_classes: bool = opt(True, "add the 90-degree rotations of base classes as new classes (Vinyals et al.)")
    val_every: int = opt(1, "epochs between validation few-shot evaluations (model selection)")
    val_episodes: int = opt(300, "validation episodes (on val classes only)")
    val_n_way: int = opt(5, "validation episode ways (capped at the number of val classes)")
    val_n_shot: int = opt(1, "validation episode shots")
    seed: int = opt(0, "seed of the pretraining run")
    max_steps_per_epoch: int | None = opt(None, "cap steps per epoch (quick tests)")


@dataclass
class EvalConfig:
    n_ways: list[int] = opt([5], "episode ways")
    n_shots: list[int] = opt([1, 5], "shots per class (the few-shot set size K)")
    n_query: int = opt(15, "queries per class per episode")
    episodes: int = opt(600, "episodes per (seed, N, K)")
    classifiers: list[str] = opt(["logreg", "proto"], "frozen-feature classifiers: logreg, proto")
    all_way: bool = opt(True, "also classify all remaining novel images among all novel classes")
    logreg_c: float = opt(1.0, "inverse L2 strength of the logistic regression (scikit-learn's C)")
    logreg_iters: int = opt(100, "L-BFGS iterations of the batched logistic regression")


@dataclass
class RunConfig:
    name: str = opt("run", "run name (default output folder runs/<name>)")
    seeds: list[int] = opt([0, 1, 2], "few-shot seeds: each draws its own few-shot set")
    pipeline: list[str] = opt(["pretrain", "evaluate"], "steps to run, in order")
    device: str = opt("auto", "auto, cpu or cuda")
    num_threads: int | None = opt(None, "torch CPU threads (default: torch's)")
    cache_dir: str | None = opt(None, "artifact cache (default $FEWGEN_CACHE, else ~/.cache/fewgen)")
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ----------------------------------------------------------------------------- merging


def _type_ok(value: Any, tp: Any) -> bool:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return isinstance(value, list) and all(_type_ok(v, inner) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if origin is tuple:
        return isinstance(value, list | tuple)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True


def _coerce(value: Any, tp: Any) -> Any:
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    return value


def update_dataclass(obj: Any, updates: dict[str, Any], path: str = "") -> None:
    """Merge a nested dict into a dataclass instance, checking keys and types."""
    if not isinstance(updates, dict):
        raise FewgenError(f"config section {path.rstrip('.') or '<root>'} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{path}{key}"
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean '{path}{close[0]}'?" if close else ""
            raise FewgenError(f"unknown config key '{full}'.{hint} Known keys here: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            update_dataclass(current, value, f"{full}.")
            continue
        tp = hints[key]
        if not _type_ok(value, tp):
            tname = getattr(tp, "__name__", None) or str(tp).replace("typing.", "")
            raise FewgenError(f"config key '{full}' expects {tname}, got {value!r}")
        setattr(obj, key, _coerce(value, tp))


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise FewgenError(f"override {text!r} must look like key=value, e.g. pretrain.epochs=5")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def nest(keys: list[str], value: Any) -> dict[str, Any]:
    out: Any = value
    for k in reversed(keys):
        out = {k: out}
    return out


def preset_names() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("fewgen.presets").iterdir() if p.name.endswith(".yaml"))


def read_yaml_config(name_or_path: str, _seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The chain of YAML mappings for a preset name or file, base first."""
    if name_or_path in _seen:
        raise FewgenError(f"config 'base' chain loops: {' -> '.join((*_seen, name_or_path))}")
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise FewgenError(f"config file {path} does not exist")
        text = path.read_text()
    else:
        res = resources.files("fewgen.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            names = preset_names()
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise FewgenError(f"unknown preset {name_or_path!r}.{hint} Presets: {', '.join(names)}; or give a YAML file path")
        text = res.read_text()
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        raise FewgenError(f"{name_or_path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise FewgenError(f"{name_or_path} must hold a YAML mapping at the top level")
    base = data.pop("base", None)
    chain = read_yaml_config(base, (*_seen, name_or_path)) if base else []
    return [*chain, data]


def load_config(preset_or_file: str | None = None, overrides: list[str] | None = None,
                user_file: str | None = None) -> RunConfig:
    """defaults < preset (and its bases) < user file < ``key=value`` overrides."""
    cfg = RunConfig()
    layers: list[dict[str, Any]] = []
    if preset_or_file:
        layers += read_yaml_config(preset_or_file)
    if user_file:
        layers += read_yaml_config(user_file)
    for layer in layers:
        update_dataclass(cfg, layer)
    for text in overrides or []:
        keys, value = parse_override(text)
        update_dataclass(cfg, nest(keys, value))
    return cfg


def describe(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key, default, help) for every field, for --help listings and docs."""
    rows = []
    inst = cls()
    for f in dataclasses.fields(cls):
        value = getattr(inst, f.name)
        if dataclasses.is_dataclass(value):
            rows += describe(type(value), f"{prefix}{f.name}.")
        else:
            rows.append((f"{prefix}{f.name}", repr(value), f.metadata.get("help", "")))
    return rows
