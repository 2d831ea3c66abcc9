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

from fewgen.dg.domainfusion import (
    LatentDistillationOptions,
    OfflineOptions,
    OnlineAugmentationOptions,
    SourceDiffusionOptions,
)
from fewgen.dg.protocol import DGTrainOptions
from fewgen.errors import FewgenError
from fewgen.evaluation.protocol import ExtraSupportOptions
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
from fewgen.pretrain.loop import TrainSettings


@dataclass
class DataConfig:
    dataset: str = opt("digits", "registered dataset (fewgen datasets lists them)", choices="dataset")
    root: str | None = opt(None, "data root with one folder per dataset (default $FEWGEN_DATA, else ./data); for imagefolder the folder itself")
    image_size: int | None = opt(None, "square image side; when null the dataset's default, or with a pretrained "
                                 "backbone (clip, dinov2) the side its image processor resizes to (e.g. 224, "
                                 "256), so photos reach its own resize and centre crop at full size", min=4, max=1024)
    channels: int | None = opt(None, "1 or 3 (imagefolder only)", choices=(1, 3))
    download: bool = opt(False, "download official files when missing (omniglot)")
    base_classes: list[str] | None = opt(None, "override the base classes by name")
    val_classes: list[str] | None = opt(None, "override the validation classes by name")
    novel_classes: list[str] | None = opt(None, "override the novel classes by name (with data.novel_dataset: the "
                                          "classes of that dataset to use; default all)")
    novel_dataset: str | None = opt(None, "take the novel classes from another dataset (a registered one, or "
                                    "imagefolder with data.novel_root), brought to the base side's image shape; "
                                    "the base dataset's own novel classes then join its base classes",
                                    choices="dataset")
    novel_root: str | None = opt(None, "data.novel_dataset=imagefolder: the folder <root>/<class>/*.png of the novel classes")
    eval_split: str = opt("novel", "classes the few-shot episodes are drawn from: novel (results), or val to choose "
                          "hyperparameters on the validation classes without touching the novel ones",
                          choices=("novel", "val"))


@dataclass
class BackboneConfig:
    name: str = opt("conv4", "registered backbone: conv4, conv4-wide, resnet12, resnet12-small (trained by the "
                    "pretrain step), or clip, dinov2 (frozen pretrained models: backbone.model)", choices="backbone")
    kwargs: dict[str, Any] = opt({}, "extra constructor arguments")
    model: str | None = opt(None, "clip / dinov2: the pretrained model, a local folder or hub id (transformers; clip: "
                            "a CLIPModel or CLIPVisionModelWithProjection, with its preprocessor_config.json)")
    dtype: str = opt("float32", "clip / dinov2: the dtype the frozen model runs in",
                     choices=("float32", "float16", "bfloat16"))


@dataclass
class IERConfig:
    """IER pretraining (recipes ``ier`` and ``ier-distill``; Rizve et al. 2021). Any loss is off at weight 0."""

    ce_weight: float = opt(1.0, "weight of the cross-entropy on base classes (head f_Phi)")
    equivariant_weight: float = opt(1.0, "weight of the transformation-prediction loss (head f_Psi)")
    invariant_weight: float = opt(1.0, "weight of the memory-bank contrastive loss (head f_Omega)")
    distill_weight: float = opt(1.0, "weight of the teacher terms (KL on class/transformation heads, L2 on f_Omega) in generations >= 1")
    distill_feature_weight: float = opt(0.0, "extra L2 between student and teacher backbone features (the official code uses it; not in the paper's equations)")
    transforms: list[str] = opt(["rotate"], "transformation families whose product is the equivariance set: rotate (4), flip (2), crop (4), affine (4)", choices=("rotate", "flip", "crop", "affine"), nonempty=True)
    num_views: int | None = opt(None, "views per image per step, the identity included (default: every transformation); bounds memory", min=1)
    temperature: float = opt(1.0, "temperature of the contrastive loss (official code: 1.0)", gt=0)
    bank_negatives: int = opt(6400, "negatives drawn from the memory bank per step (official: 6400)", min=1)
    feature_dim: int = opt(64, "output size of the contrastive head f_Omega", min=1)
    bank_momentum: float = opt(0.99, "momentum of the memory-bank update", min=0, max=1)
    head_hidden: int | None = opt(None, "hidden width of the f_Psi / f_Omega MLPs (default: backbone feature size)", min=1)
    rotation_classes: str = opt("relabel", "with pretrain.rotation_classes and rotate in transforms: relabel (each rotated view of an unrotated base image is labelled with its rotation class, as CE sees them) or drop (train on the unrotated base classes only; rotations are just the transformations)", choices=("relabel", "drop"))
    generations: int = opt(1, "distillation generations after the first model (ier-distill)", min=0)
    distill_temperature: float = opt(4.0, "temperature of the distillation KL terms", gt=0)


@dataclass
class PretrainConfig(TrainSettings):
    """Base-class pretraining: the recipe, its loss and data options, and the epoch loop's (``TrainSettings``)."""

    recipe: str = opt("ce", "base-class pretraining recipe", choices="recipe")
    label_smoothing: float = opt(0.0, "label smoothing of the cross-entropy", min=0, max=0.99)
    augment: list[str] = opt(["crop"], "kornia augmentations: crop, resized_crop, flip, affine, color", choices="augmentation")
    rotation_classes: bool = opt(True, "add the 90-degree rotations of base classes as new classes (Vinyals et al.)")
    ier: IERConfig = field(default_factory=IERConfig)


@dataclass
class EvalConfig(ExtraSupportOptions):
    """Episodes, classifiers and the extra supports of the frozen classifiers (``eval.synthetic_weight``, ...)."""

    n_ways: list[int] = opt([5], "episode ways", min=2, nonempty=True, unique=True)
    n_shots: list[int] = opt([1, 5], "shots per class (the few-shot set size K); 0 = every image of a class "
                             "(no queries left: only without evaluate and learn, as fewgen fit)", min=0, nonempty=True,
                             unique=True)
    n_query: int = opt(15, "queries per class per episode", min=1)
    episodes: int = opt(600, "episodes per (seed, N, K)", min=1)
    classifiers: list[str] = opt(["logreg", "proto"], "frozen-feature classifiers: logreg, proto", choices="classifier", nonempty=True,
                                  unique=True)
    all_way: bool = opt(True, "also classify all remaining novel images among all novel classes")
    logreg_c: float = opt(1.0, "inverse L2 strength of the logistic regression (scikit-learn's C)", gt=0)
    logreg_iters: int = opt(1000, "maximum iterations of the batched logistic regression", min=1)
    zero_shot: bool = opt(True, "with backbone.name=clip (a CLIPModel with its text tower): also a zero-shot row per "
                          "setting, each query classified by its nearest class prompt (eval.prompt), no shots used")
    prompt: str = opt("a photo of a {}.", "the class prompt of the zero-shot row ({} = the class name, underscores "
                      "read as spaces)")


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
class SynthesisConfig:
    """Synthetic images of the novel classes (fewgen.synthesis): sampler, count, cache."""

    synthetic_per_class: int = opt(20, "synthetic images per novel class", min=1)
    sampler: str = opt("dpmsolver++", "ddim, dpmsolver++ (time-uniform steps), dpmsolver++-logsnr "
                       "(steps uniform in log-SNR) or dpmsolver++-full (no lambda clipping near t = T)", choices="sampler")
    steps: int = opt(25, "sampling steps", min=1)
    guidance: float = opt(2.0, "classifier-free guidance scale (1 = none) of the class-token and Stable Diffusion "
                          "generators", min=0)
    exemplar_guidance: float = opt(0.5, "exemplar generator: Boutin et al.'s guidance w, eps = (1 + w) eps_c - w eps_u "
                                   "(0 = the conditional model; more: closer to the exemplar's class, less original)",
                                   min=0)
    exemplar_condition: str = opt("each", "exemplar generator with K > 1 shots: condition each image on its shot "
                                  "(each: image i on shot i mod K) or on the mean feature of the class's shots (mean)",
                                  choices=("each", "mean"))
    seed: int = opt(0, "synthesis seed (each image's seed derives from it, the class and the index)")
    chunk: int = opt(16, "images per generation batch (part of the cache key: fixes each image's batch); Stable "
                     "Diffusion without per-class adapters fills a batch with several classes' images", min=1)
    precision: str = opt("float32", "pixel UNet precision while sampling: float32, bfloat16 (2x the images/s on "
                         "CPUs with native bf16 at chunks >= 40), float16 (GPU); Stable Diffusion uses generator.stable_diffusion.dtype", choices=("float32", "bfloat16", "float16"))
    streams: int | None = opt(None, "parallel sampling streams in each process, each a copy of the pixel "
                              "generator with an equal share of the CPU threads (bytes unchanged); default: one "
                              "per CPU thread up to 8 on CPU, 1 on GPU and for Stable Diffusion", min=1)
    zero_shot: bool = opt(False, "no adaptation: generate novel classes from their names with the base generator")
    sdedit_strengths: list[float] = opt([], "SDEdit from the shots (DA-Fusion): image i of a class starts from its shot "
                                        "i mod K noised to strength s (0 = the shot, 1 = pure noise), s cycling "
                                        "through this list, e.g. [0.25, 0.5, 0.75]; empty: start from pure noise",
                                        min=0, max=1)
    grid_classes: int = opt(8, "novel classes drawn as real-vs-synthetic grids per (seed, K); 0 = none", min=0)
    import_dir: str | None = opt(None, "folder <dir>/<class>/*.png|jpg of images made elsewhere, read by the "
                                 "import-synthetic step as the synthetic set (first synthetic_per_class per class)")


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
