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

from fewgen.backbones.registry import BackboneConfig
from fewgen.data.loading import DataConfig
from fewgen.dg.domainfusion import (
    LatentDistillationOptions,
    OfflineOptions,
    OnlineAugmentationOptions,
    SourceDiffusionOptions,
)
from fewgen.dg.protocol import DGTrainOptions
from fewgen.errors import FewgenError
from fewgen.evaluation.protocol import EvalConfig
from fewgen.gan.methods.cdc import CDCOptions
from fewgen.gan.methods.dcl import DCLOptions
from fewgen.gan.methods.freezed import FreezeDOptions
from fewgen.gan.model import AdaptSettings, GANShape, GANTrainSettings
from fewgen.generators.datadream import DataDreamConfig
from fewgen.generators.diffusion import DiffusionOptions
from fewgen.generators.exemplar import ExemplarOptions
from fewgen.generators.stable_diffusion import StableDiffusionOptions
from fewgen.generators.steered import SteeredOptions
from fewgen.learners.datadream_classifier import DataDreamOptions
from fewgen.learners.diffalign import DiffAlignOptions
from fewgen.learners.finetune import FinetuneOptions
from fewgen.options import check_values, opt  # noqa: F401  (re-exported)
from fewgen.pretrain import PretrainConfig
from fewgen.pretrain.ier import IERConfig  # noqa: F401  (re-exported)
from fewgen.synthesis.store import SynthesisConfig


@dataclass
class LearnerConfig(FinetuneOptions, DiffAlignOptions, DataDreamOptions):
    """Learning with synthetic data (fewgen.learners): the fine-tuning methods and the frozen classifiers
    with synthetic supports. Each method's own options are defined beside it and inherited here
    (``DataDreamOptions`` in learners/datadream_classifier.py, ``DiffAlignOptions`` in learners/diffalign.py)."""

    methods: list[str] = opt(["real-only", "synthetic-only", "datadream", "diffalign"],
                             "fine-tuning methods: real-only, synthetic-only, datadream (real+synthetic), diffalign", choices="learner method")
    model: str = opt("backbone", "backbone (the pretrained backbone + cosine head) or clip (CLIP + LoRA; not with "
                     "the export step, nor with learner.augmented_control, synthetic_keep < 1 or sweep_method=frozen, "
                     "which use the pretrained backbone)", choices=("backbone", "clip"))
    clip_path: str | None = opt(None, "local CLIP model folder or hub id (model=clip)")
    clip_lora_rank: int = opt(16, "LoRA rank on both CLIP towers", min=1)
    clip_prompt: str = opt("a photo of a {}.", "class prompt template for the CLIP head")
    cuda_only: bool = opt(False, "fine-tune only on a CUDA device: on a CPU the learn step is left out with a line in "
                          "the log (the photos preset: CLIP + LoRA at ViT-B/16 takes ~28 s a step of 64 images on 2 "
                          "CPU cores, benchmarks/bench_clip_cpu.py)")
    eval_with: list[str] = opt(["head", "logreg"],
                               "head (the fine-tuned head restricted to the episode classes) and/or a frozen "
                               "classifier (logreg, proto) on the fine-tuned features", choices="learner evaluation")
    batch_size: int = opt(64, "real (or DataDream mixed) images per step", min=1)
    head_init: str = opt("prototypes", "prototypes (class means of the method's training features) or random; "
                         "learner.model=backbone only: CLIP's head starts at its class prompts either way",
                         choices=("prototypes", "random"))
    synthetic_per_class: int | None = opt(None, "use at most this many synthetic images per class (null: all)", min=1)
    synthetic_keep: float = opt(1.0, "share of each class's synthetic images kept, those a logistic regression fitted "
                                "on the few shots finds most likely their own class (1 = all; before the sweep)", gt=0, max=1)
    sweep: list[int] = opt([], "synthetic images per class for the sweep (e.g. [0, 10, 50, 200]); empty: no sweep", min=0)
    sweep_method: str = opt("datadream", "method trained at each sweep point, or frozen: only the frozen classifiers "
                            "with the first m synthetic images per class (frozen+synthetic@m rows)",
                            choices="sweep method")
    sweep_shots: list[int] = opt([1], "shots (K) of the sweep", min=1)
    frozen_synthetic: bool = opt(True, "also evaluate the frozen-feature classifiers with synthetic images in the "
                                 "support; with learner.model=backbone only (they are the pretrained backbone's), "
                                 "skipped with a log line for learner.model=clip")
    augmented_copies_per_class: int = opt(50, "augmented copies per class, of the augmented-copies step and of "
                                          "learner.augmented_control (the generator-free control)", min=1)
    augmented_control: bool = opt(False, "also evaluate the frozen classifiers with augmented copies of the shots in "
                                  "the support (rows frozen+augmented-copies, uses_synthetic false): the "
                                  "generator-free control on the same episodes")


@dataclass
class DomainFusionConfig(DGTrainOptions, OfflineOptions, OnlineAugmentationOptions, LatentDistillationOptions):
    """Domain generalization on a domain dataset (leave-one-domain-out) and DomainFusion (ECCV 2024).
    The options of DomainFusion's two parts and of the offline baseline are defined beside them
    (fewgen/dg/domainfusion.py) and inherited here."""

    methods: list[str] = opt(["erm", "erm+offline", "df-ld", "df-aug", "df"],
                             "erm, erm+offline (offline img2img images), df-ld (latent distillation), "
                             "df-aug (online augmentation), df (both)", choices="domainfusion method", nonempty=True)
    targets: list[str] | None = opt(None, "target domains (null: every domain in turn)")
    val_fraction: float = opt(0.2, "share of each SOURCE domain held out for model selection", gt=0, max=0.9)
    pretrained: str | None = opt(None, "local safetensors backbone checkpoint to start from (null: from scratch)")
    generator: str | None = opt(None, "a Stable Diffusion model (local diffusers folder or hub id) used frozen in "
                                "its latent space for every target; null: train the pixel model below per target")
    prompt: str = opt("a photo of a {}", "Stable Diffusion: the class condition, {} = the class name")
    diffusion: SourceDiffusionOptions = field(default_factory=SourceDiffusionOptions)
    guidance: float = opt(1.0, "classifier-free guidance of img2img, Stable Diffusion's or the pixel model's "
                          "(1: plain conditional model)")
    sample_steps: int = opt(10, "DDIM steps of img2img (strength s runs round(s * steps) of them)", min=1)


@dataclass
class GANConfig(DCLOptions, CDCOptions, FreezeDOptions):
    """Few-shot GAN adaptation (steps gan-source and gan-adapt; fewgen.gan.model and its methods)."""

    setup: str = opt("class-range", "how source and target come from the run's data: class-range (target = classes "
                     "[target_range[0], target_range[1]) of the whole dataset, source = every other class), domains "
                     "(source = source_domains, target = target_domain), folder (source = the run's dataset, target = "
                     "the imagefolder at target_root)", choices=("class-range", "domains", "folder"))
    target_range: list[int] = opt([827, 869], "class-range: first and one-past-last class id of the target (a contiguous "
                                  "Omniglot range follows one alphabet)")
    source_domains: list[str] = opt([], "domains: the source domains (e.g. photo, art_painting, cartoon)")
    target_domain: str | None = opt(None, "domains: the target domain (e.g. sketch)")
    target_root: str | None = opt(None, "folder: an image folder (one subfolder per class) holding the target images")
    n_shots: int = opt(10, "training images of the target (one per class when the target has that many classes); "
                       "each of the run's seeds draws its own shots and adapts with that seed", min=1)
    arch: GANShape = field(default_factory=GANShape)
    methods: list[str] = opt(["tgan", "freezed", "cdc", "dcl"], "adaptation methods, each from the same source GAN", choices="GAN adaptation method", nonempty=True)
    track_samples: int = opt(500, "samples per tracking point", min=2)
    eval_samples: int = opt(1000, "samples for the final metrics (intra-LPIPS protocol: 1000)", min=2)
    kid_subset_size: int = opt(100, "KID subset size (capped at the sample counts)", min=2)
    feature_net: str | None = opt(None, "metrics network: null = the run's pretrained backbone; else a backbone "
                                  "checkpoint (.safetensors, architecture backbone.name) or clip:<local folder>")
    lpips_weights: str | None = opt(None, "LPIPS-AlexNet safetensors for intra-diversity (default: the metrics backbone's maps)")
    source: GANTrainSettings = field(default_factory=GANTrainSettings)
    adapt: AdaptSettings = field(default_factory=AdaptSettings)


@dataclass
class GeneratorConfig:
    """The generator (fewgen.generators): its kind, each kind's own options, and the DataDream
    adaptation to the few shots. A kind reads ``generator.kind`` and its own section only."""

    kind: str = opt("diffusion", "diffusion (pixel UNet with class tokens, trained on the base classes; options: "
                    "generator.diffusion), exemplar (pixel UNet that draws another image of an exemplar's class, "
                    "trained on pairs of base images; the shots are its condition; generator.exemplar), "
                    "stable-diffusion (generator.stable_diffusion) or steered (generator.steered)",
                    choices="generator kind")
    diffusion: DiffusionOptions = field(default_factory=DiffusionOptions)
    exemplar: ExemplarOptions = field(default_factory=ExemplarOptions)
    stable_diffusion: StableDiffusionOptions = field(default_factory=StableDiffusionOptions)
    datadream: DataDreamConfig = field(default_factory=DataDreamConfig)
    steered: SteeredOptions = field(default_factory=SteeredOptions)


@dataclass
class ExportConfig:
    """The classifier the ``export`` step writes to ``<run>/classifier/`` (fewgen.classifier)."""

    model: str = opt("backbone", "backbone (a head, export.head, on the run's backbone's features: Conv-4, frozen "
                     "CLIP / DINOv2) or learner (the CLIP + LoRA learner of learner.model=clip, trained with "
                     "export.method on the export shots: its LoRA matrices and its class-prompt head)",
                     choices=("backbone", "learner"))
    method: str = opt("real-only", "export.model=learner: the learner method it is trained with (one of "
                      "learner.methods; datadream adds the run's generated images)")
    head: str = opt("logreg", "logreg (calibrated probabilities) or proto, on the pretrained backbone's features",
                    choices=("logreg", "proto"))
    n_shot: int | None = opt(None, "shots per class it is fitted on (one of eval.n_shots; default the largest)", min=0)
    seed: int | None = opt(None, "few-shot seed of those shots (one of seeds; default the first)")
    extra: str = opt("synthetic", "what joins the shots in the fit: none, synthetic (the run's generated images of "
                     "those shots, weighted eval.synthetic_weight; none when the run made none), copies "
                     "(augmented copies of the shots, learner.augmented_copies_per_class, weighted "
                     "eval.augmented_weight) or synthetic+copies", choices=("none", "synthetic", "copies",
                                                                               "synthetic+copies"))


@dataclass
class RunConfig:
    name: str = opt("run", "run name (default output folder runs/<name>)")
    seeds: list[int] = opt([0, 1, 2], "few-shot seeds: each draws its own few-shot set", nonempty=True, unique=True)
    pipeline: list[str] = opt(["pretrain", "evaluate"], "steps to run, in order", choices="pipeline step", nonempty=True)
    device: str = opt("auto", "auto, cpu or cuda")
    num_threads: int | None = opt(None, "torch CPU threads (default: torch's)", min=1)
    cache_dir: str | None = opt(None, "artifact cache (default $FEWGEN_CACHE, else ~/.cache/fewgen)")
    data: DataConfig = field(default_factory=DataConfig)
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    domainfusion: DomainFusionConfig = field(default_factory=DomainFusionConfig)
    gan: GANConfig = field(default_factory=GANConfig)
    generator: GeneratorConfig = field(default_factory=GeneratorConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


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


def _in_sections(obj: Any, key: str, path: str) -> list[str]:
    """Paths of ``key`` one section down (``generator.train_steps`` -> ``generator.diffusion.train_steps``,
    ..., and ``generator.exemplar_cond`` -> ``generator.exemplar.cond``): the options a kind owns."""
    out = []
    for f in dataclasses.fields(obj):
        sub = getattr(obj, f.name)
        if dataclasses.is_dataclass(sub):
            names = {g.name for g in dataclasses.fields(sub)}
            for name in (key, key.removeprefix(f"{f.name}_")):
                if name in names:
                    out.append(f"{path}{f.name}.{name}")
                    break
    return out


def update_dataclass(obj: Any, updates: dict[str, Any], path: str = "") -> None:
    """Merge a nested dict into a dataclass instance, checking keys and types."""
    if not isinstance(updates, dict):
        raise FewgenError(f"config section {path.rstrip('.') or '<root>'} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    for key, value in updates.items():
        full = f"{path}{key}"
        if key not in names:
            inner = _in_sections(obj, str(key), path)
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = (f" It is an option of a section here: {', '.join(inner)}." if inner else
                    f" Did you mean '{path}{close[0]}'?" if close else "")
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
    return sorted(p.name[:-5] for p in resources.files("fewgen.app.presets").iterdir() if p.name.endswith(".yaml"))


def config_file(name_or_path: str) -> Path | None:
    """The YAML file a config name means, or None for the preset of that name.

    A name ending in .yaml / .yml or written as a path (with a / or starting with . or ~) is a file;
    a bare name is a preset when one has that name, whatever lies in the working folder (a file
    beside it of that name is named on stderr, not read); else a file of that name. A folder is
    never a config."""
    path = Path(name_or_path).expanduser()
    as_path = path.suffix in (".yaml", ".yml") or "/" in name_or_path or name_or_path.startswith((".", "~"))
    if not as_path and (resources.files("fewgen.app.presets") / f"{name_or_path}.yaml").is_file():
        beside = [p for p in (name_or_path, f"{name_or_path}.yaml", f"{name_or_path}.yml") if Path(p).is_file()]
        if beside:
            import sys

            print(f"note: {name_or_path!r} is the preset {name_or_path}; the file {beside[0]} here is not read "
                  f"(write ./{beside[0]} to run it)", file=sys.stderr)
        return None
    if path.is_dir():
        raise FewgenError(f"{name_or_path} is a folder, not a config: give a YAML file or a preset name "
                          "(fewgen presets lists them)")
    if as_path and not path.is_file():
        raise FewgenError(f"config file {name_or_path} does not exist")
    return path if path.is_file() else None


def read_yaml_config(name_or_path: str, _seen: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """The chain of YAML mappings for a preset name or file, base first."""
    if name_or_path in _seen:
        raise FewgenError(f"config 'base' chain loops: {' -> '.join((*_seen, name_or_path))}")
    path = config_file(name_or_path)
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FewgenError(f"config file {path} is not UTF-8 text ({e.reason} at byte {e.start}); "
                              "save it as UTF-8") from None
        except OSError as e:
            raise FewgenError(f"cannot read config file {path} ({e.strerror or e})") from None
    else:
        res = resources.files("fewgen.app.presets") / f"{name_or_path}.yaml"
        if not res.is_file():
            names = preset_names()
            close = difflib.get_close_matches(name_or_path, names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise FewgenError(f"unknown preset {name_or_path!r}.{hint} Presets: {', '.join(names)}; or give a YAML file path")
        text = res.read_text()
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise FewgenError(f"{name_or_path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:  # an empty file would silently run every default
        raise FewgenError(f"config {name_or_path} is empty; give at least one key (e.g. 'base: demo'), or run a preset "
                          "by name (fewgen presets lists them)")
    if not isinstance(data, dict):
        raise FewgenError(f"{name_or_path} must hold a YAML mapping at the top level")
    base = data.pop("base", None)
    chain = read_yaml_config(base, (*_seen, name_or_path)) if base else []
    return [*chain, data]


def pretrain_options(cfg: RunConfig) -> tuple[BackboneConfig, PretrainConfig]:
    """The options pretraining takes (``fewgen.pretrain.pretrain_backbone(*pretrain_options(cfg), data, ...)``)."""
    return cfg.backbone, cfg.pretrain


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
