"""The cache key of every artifact kind, derived in one place from what the artifact depends on.

Each kind declares a :class:`KeyRule`: the config sections or fields (dotted paths) it depends
on, the names of its inputs (content digests of data, keys of the artifacts it is made from),
and, beside the rule, the fields under those sections that cannot change it, each with the
reason. The key is the hash of exactly the declared fields and inputs; a field added to a
declared section is in the key until someone declares, with a reason, that it is not.
``tests/test_cache_keys.py`` walks every config field for every kind: changing it must change
the key exactly when the rule says the artifact depends on it.

Data enters keys only by content (:meth:`ArrayDataset.digest`), never by the folder it came
from, so a changed image, a changed class split or another dataset at the same path is a new
key.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

#: bumped when the layout of the parts changes for every kind
KEY_VERSION = 2

Inputs = Mapping[str, Any]


def config_leaves(obj: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(dotted path, value) for every leaf field of a (nested) config dataclass."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        path = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from config_leaves(value, f"{path}.")
        else:
            yield path, value


def sections(**parts: Any) -> Any:
    """A config of only these sections (config dataclasses, by name), for the key of a library
    function that takes its options rather than the run's config: the same paths, so the same key."""
    cls = dataclasses.make_dataclass("Sections", [(name, type(value)) for name, value in parts.items()])
    return cls(**parts)


def config_value(cfg: Any, path: str) -> Any:
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _under(path: str, prefixes) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


@dataclass(frozen=True)
class KeyRule:
    """What one artifact kind depends on.

    Attributes:
        kind: the cache folder (``<cache>/<kind>/<key>``).
        config: dotted config paths (sections or single fields) the artifact depends on.
        ignore: paths under ``config`` that cannot change the artifact, with the reason.
        inputs: names of the inputs every key of this kind holds (digests, keys, ids).
        ignore_if: more ``ignore`` entries that hold only for some configs or inputs (e.g. IER
            options when the recipe is CE), as ``f(cfg, inputs) -> {path: reason}``.
        derive: builds the parts from (cfg, inputs) when a library dataclass carries the key
            (synthetic sets, GANs); by default the parts are the declared fields and inputs.
    """

    kind: str
    config: tuple[str, ...] = ()
    ignore: Mapping[str, str] = field(default_factory=dict)
    inputs: tuple[str, ...] = ()
    ignore_if: Callable[[Any, Inputs], Mapping[str, str]] | None = None
    derive: Callable[[Any, Inputs], dict[str, Any]] | None = None

    def ignored(self, cfg: Any, inputs: Inputs) -> dict[str, str]:
        out = dict(self.ignore)
        if self.ignore_if is not None:
            out.update(self.ignore_if(cfg, inputs))
        return out

    def fields(self, cfg: Any, inputs: Inputs | None = None) -> dict[str, Any]:
        """The config values the artifact depends on, by dotted path."""
        if not self.config:
            return {}
        skip = self.ignored(cfg, inputs or {})
        out = {}
        for path, value in config_leaves(cfg):
            if _under(path, self.config) and not _under(path, skip):
                out[path] = value
        return out

    def parts(self, cfg: Any, **inputs: Any) -> dict[str, Any]:
        """The parts the key hashes: the declared config fields and the inputs."""
        if set(inputs) != set(self.inputs):
            raise TypeError(f"key of {self.kind!r} takes inputs {sorted(self.inputs)}, got {sorted(inputs)}")
        if self.derive is not None:
            return self.derive(cfg, inputs)
        return {"kind": self.kind, "version": KEY_VERSION, "config": self.fields(cfg, inputs), "inputs": inputs}


RULES: dict[str, KeyRule] = {}


def rule(kind: str, **kw: Any) -> KeyRule:
    r = KeyRule(kind, **kw)
    RULES[kind] = r
    return r


def key_parts(kind: str, cfg: Any, **inputs: Any) -> dict[str, Any]:
    """The parts of the cache key of ``kind`` for this config and these inputs."""
    return RULES[kind].parts(cfg, **inputs)


# ----------------------------------------------------------------------------- the rules

def _ier_options(cfg, inputs) -> dict[str, str]:
    if cfg.pretrain.recipe.startswith("ier"):
        return {}
    return {"pretrain.ier": "options of the IER recipes; a CE backbone never reads them"}


def _trained_backbone_ignores(cfg, inputs) -> dict[str, str]:
    return {**_ier_options(cfg, inputs),
            **{f: "options of the frozen pretrained backbones (clip, dinov2; their own key), never trained"
               for f in ("backbone.model", "backbone.dtype")}}


BACKBONE = rule(
    "backbones", config=("backbone", "pretrain"), inputs=("base", "val"), ignore_if=_trained_backbone_ignores,
)
"""The pretrained backbone: trained on the base images (digest ``base``), selected on val (``val``)."""

PRETRAINED_BACKBONE = rule(
    "pretrained-backbones", config=("backbone",), inputs=("model",),
    ignore={"backbone.model": "the model enters by content (input model: its config, processor config and "
                              "weight files), never by its path or hub id"},
)
"""A frozen pretrained backbone (clip, dinov2): its section and the content of its model folder
(``model``, :func:`fewgen.backbones.pretrained.model_digest`). Nothing is trained, so neither the
pretrain section nor the base images enter; the key names its features in the cache."""

FEATURES = rule("features", inputs=("checkpoint", "images"))
"""Frozen features of a set of images (digest ``images``) under a backbone (``checkpoint`` key)."""

_ADAPTATION = ("generator.datadream",)
_PROMPT = "generator.stable_diffusion.prompt"
#: how the Stable Diffusion pipeline runs, not what it draws: attention and VAE slicing split the
#: same sums into slices, torch.compile fuses the same operations; the images agree up to rounding,
#: as they do across devices (``device`` enters no key either), so no key holds them and turning one
#: on reuses the adapters and synthetic sets already made
_SD_RUNTIME = ("generator.stable_diffusion.attention_slicing", "generator.stable_diffusion.vae_slicing",
               "generator.stable_diffusion.compile")


def _kind(cfg):
    from fewgen.generators.registry import generator_kind

    return generator_kind(cfg.generator.kind)


def _generator_ignores(cfg, inputs) -> dict[str, str]:
    """A kind reads ``generator.kind`` and its own section only: every other section is out."""
    import dataclasses

    kind = _kind(cfg)
    return {f"generator.{f.name}": f"not read by the {kind.name} generator (its options: generator.{kind.options})"
            for f in dataclasses.fields(cfg.generator)
            if f.name not in ("kind", kind.options) and f"generator.{f.name}" not in _ADAPTATION}


GENERATOR = rule(
    "generators", config=("generator",), inputs=("base", "encoder"), ignore_if=_generator_ignores,
    ignore={**{f: "adaptation to the shots: in the adapters' key" for f in _ADAPTATION},
            **{f: "how Stable Diffusion runs (memory, speed), not what it draws: in no key (_SD_RUNTIME)"
               for f in _SD_RUNTIME},
            "generator.stable_diffusion.optional": "whether the generative steps run without a model, not what "
                                                   "they make"},
)
"""The base pixel generator, trained on the base images (digest ``base``); an exemplar generator
conditioned on backbone features also on that backbone (key ``encoder``)."""


def _adapter_ignores(cfg, inputs) -> dict[str, str]:
    if _kind(cfg).prompted:
        return {"generator.datadream.target_modules": "a pixel UNet's LoRA targets; Stable Diffusion has its own set",
                "generator.datadream.p_uncond": "the null condition of a pixel generator's adaptation; Stable "
                                                "Diffusion's adaptation always has its prompt"}
    return {_PROMPT: "the prompt template of Stable Diffusion; a pixel generator has no prompt"}


ADAPTER = rule(
    "adapters", config=(*_ADAPTATION, _PROMPT), inputs=("generator", "few_shot"),
    ignore_if=_adapter_ignores,
)
"""A DataDream adapter of a generator (key ``generator``, which holds how it was trained) to one
few-shot set (digest ``few_shot``)."""


def _synthetic_parts(cfg, inputs) -> dict[str, Any]:
    from fewgen.synthesis.store import synthesis_spec

    return synthesis_spec(cfg.synthesis, cfg.generator, **inputs).parts()


def _synthetic_ignores(cfg, inputs) -> dict[str, str]:
    out = {}
    if not inputs.get("stable_diffusion"):
        out[_PROMPT] = "the prompt template of Stable Diffusion; pixel generators are prompted by class name"
    else:
        out["synthesis.precision"] = "Stable Diffusion samples in generator.stable_diffusion.dtype (in the generator's key)"
    if _kind(cfg).exemplar:
        out["synthesis.guidance"] = "an exemplar generator is guided by synthesis.exemplar_guidance"
        out["synthesis.zero_shot"] = "an exemplar generator always draws from the shots, adapted or not"
    else:
        out["synthesis.exemplar_guidance"] = "guidance of the exemplar generator"
        out["synthesis.exemplar_condition"] = "conditioning of the exemplar generator"
    return out


SYNTHETIC = rule(
    "synthetic", config=("synthesis", _PROMPT),
    inputs=("generator", "adapter", "class_names", "image_shape", "stable_diffusion", "sources"),
    ignore={"synthesis.streams": "parallel sampling streams write the same bytes as one (tested)",
            "synthesis.grid_classes": "grids are drawn in the run folder, not in the set",
            "synthesis.import_dir": "images made elsewhere are read by import-synthetic; they make no cache entry"},
    ignore_if=_synthetic_ignores, derive=_synthetic_parts,
)
"""A synthetic set: carried by :class:`fewgen.synthesis.store.SynthesisSpec` (its own parts)."""

_DIFFALIGN_WEIGHTS = ("learner.w_real", "learner.w_synthetic", "learner.w_hallucination", "learner.w_mmd",
                      "learner.label_smoothing", "learner.mmd_bandwidths", "learner.hallucination_temperature")
_SYNTHETIC_CHOICE = ("learner.synthetic_per_class", "learner.synthetic_keep", "learner.augmented_copies_per_class")
_WHICH_RUNS = ("learner.methods", "learner.ablations", "learner.sweep", "learner.sweep_method",
               "learner.sweep_shots")


def _learner_ignores(cfg, inputs) -> dict[str, str]:
    method = inputs.get("method") or {}
    kind = method.get("kind")
    weights = method.get("weights") or {}
    out = {}
    if kind != "datadream":
        out["learner.datadream_lambda"] = "read by the datadream method only"
    if kind != "diffalign":
        for f in ("learner.synthetic_batch_size", "learner.base_batch_size"):
            out[f] = "read by the diffalign methods only"
    if kind != "diffalign" or not weights.get("hallucination"):
        for f in ("learner.base_batch_size", "eval.logreg_c", "eval.logreg_iters"):
            out[f] = "the hallucinated soft labels' batch and solver: read only with the hallucination term"
    if cfg.learner.model != "clip":
        for f in ("learner.clip_path", "learner.clip_lora_rank", "learner.clip_prompt"):
            out[f] = "options of learner.model=clip"
    return out


LEARNER = rule(
    "learners", config=("learner", "eval.logreg_c", "eval.logreg_iters"),
    inputs=("method", "backbone", "real", "synthetic", "base", "seed"), ignore_if=_learner_ignores,
    ignore={**{f: "which models are trained; each method and sweep point is its own entry (input method)"
               for f in _WHICH_RUNS},
            **{f: "the DiffAlign loss weights, ablations applied, enter through the method (input method)"
               for f in _DIFFALIGN_WEIGHTS},
            **{f: "choose the synthetic images, which enter by content (input synthetic)" for f in _SYNTHETIC_CHOICE},
            "learner.eval_with": "how the trained model is evaluated, not its weights",
            "learner.cuda_only": "whether the learn step runs on a CPU at all, not what it trains",
            "learner.frozen_synthetic": "an evaluation of the frozen backbone; trains nothing",
            "learner.augmented_control": "a frozen-classifier evaluation; trains nothing",},
)
"""A fine-tuned classifier: one method (its spec) on one seed's shots (``real``) and synthetic set."""


def _gan_source_parts(cfg, inputs) -> dict[str, Any]:
    from fewgen.gan.model import gan_arch, gan_train_settings, source_gan_key

    return source_gan_key(inputs["images"], gan_arch(cfg.gan, inputs["channels"]), gan_train_settings(cfg.gan))


_GAN_TARGET = ("gan.setup", "gan.target_range", "gan.source_domains", "gan.target_domain", "gan.target_root",
               "gan.n_shots")
_GAN_ADAPT = ("gan.adapt", "gan.methods", "gan.freezed_layers", "gan.cdc_weight", "gan.dcl_lambda1", "gan.dcl_lambda2",
              "gan.dcl_temperature", "gan.track_samples")
_GAN_METRICS = ("gan.eval_samples", "gan.kid_subset_size", "gan.feature_net", "gan.lpips_weights")

GAN_SOURCE = rule(
    "gans", config=("gan",), inputs=("images", "channels"), derive=_gan_source_parts,
    ignore={**{f: "choose the source images, which enter by content (input images)" for f in _GAN_TARGET},
            **{f: "adaptation of the source GAN: in the adapted GANs' key" for f in _GAN_ADAPT},
            **{f: "metrics computed after training" for f in _GAN_METRICS}},
)
"""The source GAN, trained on the source images (digest ``images``)."""


def _gan_adapted_parts(cfg, inputs) -> dict[str, Any]:
    from fewgen.gan.model import adapted_gan_key

    return adapted_gan_key(cfg.gan, **inputs)


def _gan_method_ignores(cfg, inputs) -> dict[str, str]:
    import fewgen.gan  # noqa: F401  (the methods register their options)
    from fewgen.gan.model import GAN_METHODS

    name = inputs.get("method", "")
    used = {f"gan.{f}" for f in (GAN_METHODS.get(name).options.values() if name in GAN_METHODS else ())}
    options = ("gan.freezed_layers", "gan.cdc_weight", "gan.dcl_lambda1", "gan.dcl_lambda2", "gan.dcl_temperature")
    return {f: "an option of another adaptation method" for f in options if f not in used}


GAN_ADAPTED = rule(
    "gan-adapted", config=("gan",), inputs=("source", "shots", "target", "method", "seed", "feature_net", "lpips"),
    derive=_gan_adapted_parts, ignore_if=_gan_method_ignores,
    ignore={**{f: "choose the shots and held-out target images, which enter by content (inputs shots, target)"
               for f in _GAN_TARGET},
            **{f: "source GAN training: in the source's key (input source)"
               for f in ("gan.source", "gan.arch")},
            "gan.adapt.seed": "replaced by each of the run's seeds, the shot draw (input seed)",
            "gan.methods": "which methods run; each is its own entry (input method)",
            "gan.eval_samples": "final metrics, computed after adaptation",
            "gan.kid_subset_size": "final metrics, computed after adaptation",
            "gan.feature_net": "the tracking network enters by content (input feature_net)",
            "gan.lpips_weights": "the LPIPS weights enter by content (input lpips)"},
)
"""A source GAN (key ``source``) adapted by one method to one seed's shots."""

DG_GENERATOR = rule(
    "dg-diffusion", inputs=("data", "sources"),
    config=("domainfusion.diffusion",),
)
"""DomainFusion's pixel diffusion model of one target's source domains (``sources``) of ``data``."""

DG_RESULT = rule(
    "dg-result", config=("domainfusion", "backbone"),
    inputs=("data", "target", "seed", "method", "generator", "pretrained"),
    ignore={"domainfusion.methods": "which methods run; each is its own entry (input method)",
            "domainfusion.targets": "which targets run; each is its own entry (input target)",
            "domainfusion.pretrained": "the starting checkpoint enters by content (input pretrained)",
            "domainfusion.generator": "the generator enters by its key (input generator)"},
)
"""One DG method's test correctness on one held-out domain (``target``) for one seed."""

#: fields no artifact depends on: how and where a run runs, not what it computes
RUN_ONLY = {
    "name": "the run's name (its folder)",
    "seeds": "which few-shot seeds run; each is its own entry (input seed or few-shot digest)",
    "pipeline": "which steps run",
    "device": "where a model runs; its results are reused on another device",
    "num_threads": "CPU threads: the same computation",
    "cache_dir": "where the cache is",
}

#: fields that enter no key as config values: the data enter by content, evaluation is never cached
NOT_IN_KEYS = {
    "data": "the data enter every key by content (ArrayDataset.digest), never by name, path or size setting",
    "eval.n_ways": "episodes are drawn per run and evaluated afresh",
    "eval.n_shots": "which few-shot sets are used; each enters by content",
    "eval.n_query": "episodes are drawn per run and evaluated afresh",
    "eval.episodes": "episodes are drawn per run and evaluated afresh",
    "eval.classifiers": "frozen-feature classifiers are fitted per run",
    "eval.all_way": "the all-way evaluation is computed per run",
    "eval.zero_shot": "CLIP's zero-shot rows are computed per run (the features they read are cached by content)",
    "eval.prompt": "the zero-shot rows' prompt: computed per run",
    "eval.synthetic_weight": "weights synthetic supports of the frozen classifiers, fitted per run",
    "eval.augmented_weight": "weights augmented copies in the frozen classifiers, fitted per run",
    "eval.proto_share": "weights extra supports of the proto classifier, fitted per run",
    "export": "the exported classifier is fitted per run, in the run folder",
}
