"""The checks of a run's settings taken together, before anything is computed.

:func:`fewgen.app.runner.check_config` checks each value on its own (``fewgen.options``: names,
ranges, registries) and the pipeline's order; :func:`check_combinations` checks what only the
settings together decide: an option that needs another (``learner.model=clip`` needs
``learner.clip_path``), an option a step would otherwise refuse hours in (``export`` of a CLIP
learner), a generator whose adaptation step is missing while synthesis runs. It reads the config
alone (and whether a named folder exists), so ``fewgen run`` and ``fewgen fit`` refuse such a run
in one line before the first step. :func:`check_data` runs right after the data loads, for what the
data decides (class counts, domains), still before the first step.

Options that only apply to some settings are documented as such in their help and skipped where
they do not apply (``learner.frozen_synthetic`` and ``learner.head_init`` with ``learner.model=clip``);
a setting a user chose that the run would silently drop is refused here.
"""

from __future__ import annotations

from pathlib import Path

from fewgen.app.config import RunConfig
from fewgen.errors import FewgenError
from fewgen.generators.diffusion import DiffusionOptions
from fewgen.generators.pixels import PixelUNetOptions
from fewgen.generators.registry import generator_kind

GENERATIVE_STEPS = ("generator", "adapt", "synthesize")


def resolve_defaults(cfg: RunConfig) -> list[str]:
    """Settings that follow from others, filled in before the checks (so config.yaml and every cache
    key hold what runs); returns a line for the log per change:

    * ``learner.clip_path`` empty with ``learner.model=clip`` and ``backbone.name=clip``: the
      backbone's model (the photos preset fine-tunes the CLIP it evaluates);
    * ``generator.stable_diffusion.optional`` with a Stable Diffusion kind and no model: the generative
      steps and the learner methods that need generated images are left out."""
    notes = []
    lc, g = cfg.learner, cfg.generator
    if lc.model == "clip" and not lc.clip_path and cfg.backbone.name == "clip" and cfg.backbone.model:
        lc.clip_path = cfg.backbone.model
        notes.append(f"learner.clip_path: the backbone's CLIP, {lc.clip_path}")
    sd = g.stable_diffusion
    if sd.optional and generator_kind(g.kind).pretrained and not sd.model and set(GENERATIVE_STEPS) & set(cfg.pipeline):
        from fewgen.learners.registry import method_specs

        dropped = [s.name for s in method_specs(lc) if s.uses_synthetic]
        cfg.pipeline = [s for s in cfg.pipeline if s not in GENERATIVE_STEPS]
        lc.methods = [m for m in lc.methods if m not in dropped]
        lc.sweep = []
        if "learn" in cfg.pipeline and not lc.methods:
            cfg.pipeline.remove("learn")
        notes.append("no generator.stable_diffusion.model: the generator, adapt and synthesize steps"
                     + (f" and the learner methods {', '.join(dropped)}" if dropped else "")
                     + " are left out (real images only); set generator.stable_diffusion.model=<a Stable Diffusion "
                       "folder or hub id> for DataDream's recipe")
    if lc.cuda_only and "learn" in cfg.pipeline:
        from fewgen.utils import resolve_device

        if resolve_device(cfg.device).type != "cuda":
            cfg.pipeline.remove("learn")
            notes.append("learner.cuda_only and no CUDA device: the learn step (fine-tuning) is left out; "
                         "set learner.cuda_only=false to fine-tune on the CPU anyway (slow)")
    return notes


def check_combinations(cfg: RunConfig) -> None:
    """Raise one :class:`FewgenError` line for the first combination of settings the run cannot honour."""
    _check_learner(cfg)
    _check_export(cfg)
    _check_generator(cfg)
    _check_synthesis(cfg)
    _check_pretrain(cfg)
    _check_domainfusion(cfg)
    _check_gan(cfg)
    if "import-synthetic" in cfg.pipeline:
        folder = cfg.synthesis.import_dir
        if not folder or not Path(folder).expanduser().is_dir():
            raise FewgenError(f"the import-synthetic step needs synthesis.import_dir=<folder>/<class>/*.png"
                              f"{f'; {folder} is not a folder' if folder else ''}")


def check_data(cfg: RunConfig, data) -> None:
    """What the loaded data (a :class:`fewgen.data.base.FewShotData`) decides, before the first step."""
    steps = cfg.pipeline
    if "pretrain" in steps and data.val.num_classes >= 2:  # one val class: the loop keeps the last epoch
        need = cfg.pretrain.val_n_shot + 1
        counts = data.val.counts()
        low = int(counts.argmin())
        if int(counts[low]) < need:
            raise FewgenError(f"validation class {data.val.class_names[low]!r} has {int(counts[low])} image(s), but a "
                              f"{cfg.pretrain.val_n_shot}-shot validation episode needs {need} per class (a shot and a "
                              "query): lower pretrain.val_n_shot or give data.val_classes classes with more images")
    if "domainfusion" in steps:
        full = data.full
        if full is None or full.domains is None:
            raise FewgenError(f"the domainfusion step needs a domain dataset (pacs, or imagefolder with "
                              f"<root>/<domain>/<class>/ folders); {data.name!r} has no domains")
        bad = [t for t in cfg.domainfusion.targets or [] if t not in full.domain_names]
        if bad:
            raise FewgenError(f"unknown target domain(s) {bad} in domainfusion.targets; the dataset has "
                              f"{list(full.domain_names)}")
    if "import-synthetic" in steps:
        root = Path(cfg.synthesis.import_dir).expanduser()
        missing = [c for c in data.novel.class_names if not (root / c).is_dir()]
        if missing:
            raise FewgenError(f"{root} has no folder for novel class(es) {', '.join(map(repr, missing[:5]))}; "
                              f"synthesis.import_dir needs one subfolder per novel class, named as the classes: "
                              f"{', '.join(data.novel.class_names[:10])}")


def image_size(cfg: RunConfig) -> int:
    """The side of the run's (base) images: ``data.image_size``, else the dataset's default."""
    from fewgen.data.datasets import DATASETS

    return int(cfg.data.image_size or DATASETS.meta(cfg.data.dataset)["image_size"])


def _local_path_missing(value: str) -> bool:
    """A value written as a local path (absolute, ./, ../, ~) that does not exist; a hub id passes."""
    return value.startswith(("/", "./", "../", "~")) and not Path(value).expanduser().exists()


def _check_learner(cfg: RunConfig) -> None:
    if "learn" not in cfg.pipeline:
        return
    lc = cfg.learner
    if lc.precision == "float16":
        from fewgen.utils import resolve_device

        if resolve_device(cfg.device).type != "cuda":
            raise FewgenError("learner.precision=float16 needs a CUDA device (its loss scaling is CUDA's) and this "
                              "run is on the CPU; use learner.precision=bfloat16 or float32")
    if lc.model == "clip":
        if not lc.clip_path:
            raise FewgenError("learner.model=clip needs learner.clip_path (a local CLIP folder, e.g. ViT-B/16)")
        if _local_path_missing(lc.clip_path):
            raise FewgenError(f"learner.clip_path={lc.clip_path} does not exist; give a local CLIP folder "
                              "(config.json, weights and tokenizer files) or a hub id")
        if lc.augmented_control:
            raise FewgenError("learner.augmented_control needs learner.model=backbone (the control is the pretrained "
                              "backbone's frozen classifiers); set learner.augmented_control=false with "
                              "learner.model=clip")
        if lc.synthetic_keep < 1:
            raise FewgenError(f"learner.synthetic_keep={lc.synthetic_keep} needs learner.model=backbone (the "
                              "pretrained backbone ranks the synthetic images); leave it at 1 with learner.model=clip")
        if lc.sweep and lc.sweep_method == "frozen":
            raise FewgenError("learner.sweep_method=frozen sweeps the pretrained backbone's frozen classifiers, not "
                              "the CLIP learner: set learner.sweep_method to a method (e.g. datadream) or "
                              "learner.sweep=[] with learner.model=clip")
        if not lc.methods and not lc.sweep:
            raise FewgenError("learner.model=clip fine-tunes CLIP for each of learner.methods, and learner.methods "
                              "and learner.sweep are empty: list methods (e.g. learner.methods=[real-only,datadream]) "
                              "or use learner.model=backbone")
    from fewgen.learners.registry import method_specs

    for spec in method_specs(lc):
        w = spec.weights
        if spec.kind == "diffalign" and w.w_real == w.w_synthetic == w.w_hallucination == w.w_mmd == 0:
            raise FewgenError(f"every loss weight of {spec.name} is zero (learner.w_real, w_synthetic, "
                              "w_hallucination, w_mmd, less the term learner.ablations switches off): set one above "
                              "zero or drop that term from learner.ablations")


def _check_export(cfg: RunConfig) -> None:
    if "export" not in cfg.pipeline:
        return
    ec, lc = cfg.export, cfg.learner
    if ec.model == "learner":
        if lc.model != "clip":
            raise FewgenError("export.model=learner exports the fine-tuned CLIP + LoRA learner: set learner.model=clip "
                              "(and learner.clip_path, or backbone.name=clip backbone.model=...), or export.model=backbone")
        if not lc.clip_path:
            raise FewgenError("export.model=learner needs the CLIP to fine-tune: learner.clip_path=<CLIPModel folder "
                              "or hub id>, or backbone.name=clip backbone.model=<the same> (taken as clip_path)")
        if ec.method not in lc.methods:
            raise FewgenError(f"export.method={ec.method!r} is not among learner.methods {lc.methods}; name one of "
                              "them (real-only: the shots alone; datadream: the shots and the generated images)")
        from fewgen.learners.registry import method_specs

        spec = next(s for s in method_specs(lc) if s.name == ec.method)
        if spec.uses_synthetic and "synthesize" not in cfg.pipeline:
            raise FewgenError(f"export.method={ec.method} trains on generated images, and no 'synthesize' step is in "
                              "pipeline: add the generator steps (generator.stable_diffusion.model for Stable Diffusion) or export "
                              "export.method=real-only")
    elif lc.model == "clip" and cfg.backbone.name != "clip" and "learn" in cfg.pipeline:
        from fewgen.backbones.registry import BACKBONES

        if "clip" in BACKBONES.names():
            folder = f" backbone.model={cfg.learner.clip_path or '<CLIP folder>'}" if hasattr(cfg.backbone, "model") else ""
            alternative = (f"for a classifier on frozen CLIP features use backbone.name=clip{folder} with "
                           "learner.model=backbone")
        else:
            alternative = "use learner.model=backbone"
        raise FewgenError("the export step writes a classifier on the run's backbone, not the fine-tuned CLIP of "
                          f"learner.model=clip: set export.model=learner to export that, or {alternative}")
    ec = cfg.export
    n_shot = max(cfg.eval.n_shots) if ec.n_shot is None else ec.n_shot
    seed = cfg.seeds[0] if ec.seed is None else ec.seed
    if n_shot not in cfg.eval.n_shots or seed not in cfg.seeds:
        raise FewgenError(f"export.n_shot={n_shot} and export.seed={seed} must be among eval.n_shots "
                          f"{cfg.eval.n_shots} and seeds {cfg.seeds}; set them, or leave them null for the largest "
                          "K and the first seed")


def _check_generator(cfg: RunConfig) -> None:
    if "generator" not in cfg.pipeline:
        return
    g = cfg.generator
    kind = generator_kind(g.kind)
    o, section = kind.section(g), f"generator.{kind.options}"
    if "adapt" in cfg.pipeline and not kind.adaptable:
        raise FewgenError(f"generator.kind={g.kind} draws from the shots and has no DataDream adapter: drop 'adapt' "
                          "from pipeline")
    if kind.pretrained:
        if not o.model:
            raise FewgenError(f"generator.kind={g.kind} needs {section}.model=<local folder or hub id>")
        if _local_path_missing(o.model):
            raise FewgenError(f"{section}.model={o.model} does not exist; give a local diffusers folder "
                              "(model_index.json) or a hub id")
        return
    if hasattr(o, "check_run"):  # checks of its own, against the run's counts
        o.check_run(cfg.synthesis.synthetic_per_class if "synthesize" in cfg.pipeline else 0)
    if isinstance(o, PixelUNetOptions):
        o.check_shape(image_size(cfg), section)
    if isinstance(o, DiffusionOptions) and "name" in o.cond_mode:  # the class names' MiniLM embeddings
        from fewgen.generators.text import default_text_encoder_path

        default_text_encoder_path()


def _check_synthesis(cfg: RunConfig) -> None:
    steps = cfg.pipeline
    if "synthesize" not in steps:
        return
    g, s = cfg.generator, cfg.synthesis
    adapted = "adapt" in steps and steps.index("adapt") < steps.index("synthesize")
    if generator_kind(g.kind).adapted and not s.zero_shot and not adapted:
        fixed = [x for x in steps if x != "adapt"]
        fixed.insert(fixed.index("synthesize"), "adapt")
        raise FewgenError(f"generator.kind={g.kind} draws the novel classes from a DataDream adapter of the shots, "
                          f"but no 'adapt' step comes before 'synthesize' in pipeline: use "
                          f"pipeline=[{','.join(fixed)}], or synthesis.zero_shot=true to draw them from their names "
                          "alone")
    if s.zero_shot and adapted:
        raise FewgenError("synthesis.zero_shot=true draws the novel classes from their names, leaving the adapt "
                          "step's adapters unused: drop 'adapt' from pipeline, or set synthesis.zero_shot=false")
    if s.zero_shot and g.kind == "diffusion" and g.diffusion.cond_mode == "class":
        raise FewgenError("zero-shot generation needs the class names: set generator.diffusion.cond_mode=name or "
                          "class+name")
    if generator_kind(g.kind).pretrained and 0 in s.sdedit_strengths:
        raise FewgenError(f"synthesis.sdedit_strengths={s.sdedit_strengths}: Stable Diffusion's img2img needs "
                          "strengths in (0, 1]; drop the 0 (the shot itself)")
    if s.precision == "float16" and not generator_kind(g.kind).pretrained:
        from fewgen.utils import resolve_device

        if resolve_device(cfg.device).type == "cpu":
            raise FewgenError("synthesis.precision=float16 needs a GPU and this run is on the CPU; use bfloat16 "
                              "or float32")


def _check_pretrain(cfg: RunConfig) -> None:
    if "pretrain" in cfg.pipeline and cfg.pretrain.recipe in ("ier", "ier-distill"):
        from fewgen.pretrain.ier import check_ier_settings

        check_ier_settings(cfg.pretrain.ier, cfg.pretrain.recipe)


def _check_gan(cfg: RunConfig) -> None:
    gc = cfg.gan
    if "gan-adapt" not in cfg.pipeline or gc.lpips_weights:
        return
    from fewgen.backbones.registry import BACKBONES

    # intra-diversity compares feature maps: the frozen pretrained models (and clip:<folder>) give none
    if gc.feature_net and gc.feature_net.startswith("clip:"):
        net = f"gan.feature_net={gc.feature_net}"
    elif BACKBONES.meta(cfg.backbone.name).get("pretrained"):
        net = f"backbone.name={cfg.backbone.name}"
    else:
        return
    raise FewgenError(f"gan-adapt's intra-diversity reads the metrics network's feature maps, which {net} does not "
                      "give: set gan.lpips_weights=<LPIPS-AlexNet safetensors>, or use a trained backbone "
                      "(backbone.name=conv4)")


def _check_domainfusion(cfg: RunConfig) -> None:
    if "domainfusion" not in cfg.pipeline:
        return
    from fewgen.data.datasets import DATASETS

    d = cfg.domainfusion
    if cfg.data.dataset != "imagefolder" and not DATASETS.meta(cfg.data.dataset).get("domains"):
        raise FewgenError(f"the domainfusion step needs a domain dataset (pacs, or imagefolder with "
                          f"<root>/<domain>/<class>/ folders); {cfg.data.dataset} has no domains")
    if d.ld_t_min > d.ld_t_max:
        raise FewgenError(f"domainfusion.ld_t_min={d.ld_t_min} is above domainfusion.ld_t_max={d.ld_t_max}; "
                          "give ld_t_min <= ld_t_max")
    if d.generator:
        if "{}" not in d.prompt:
            raise FewgenError(f"domainfusion.prompt {d.prompt!r} has no {{}} for the class name; "
                              "e.g. 'a photo of a {}'")
    elif d.diffusion.image_size > image_size(cfg):
        raise FewgenError(f"domainfusion.diffusion.image_size {d.diffusion.image_size} is larger than the images "
                          f"({image_size(cfg)}); use at most {image_size(cfg)}")
