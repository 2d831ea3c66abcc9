"""The runner of ``fewgen run``: a config's pipeline steps, in order, in one run directory.

Steps are registered functions of a :class:`Run` (``fewgen.app.steps``), each declaring which
fields of the typed :class:`RunState` it needs and which it makes, so a pipeline in the wrong order
is refused before anything runs. Each step reads and writes its results through the content-addressed
cache, so a rerun or a second preset reuses what exists.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from fewgen.app.checks import check_combinations, check_data, resolve_defaults
from fewgen.app.config import RunConfig
from fewgen.app.rundir import (
    RunLog,
    check_run_dir,
    check_run_name,
    environment,
    prepare_staging,
    publish_run,
    run_lock,
    write_config,
    write_metrics,
)
from fewgen.cache import ArtifactCache
from fewgen.data.base import ArrayDataset, FewShotData
from fewgen.data.fewshot import Episodes, check_setting, sample_episodes
from fewgen.data.loading import load_data
from fewgen.errors import FewgenError
from fewgen.registry import Registry
from fewgen.reports.tables import best_of_each_kind, format_best, format_table
from fewgen.utils import resolve_device, seed_everything, write_json

if TYPE_CHECKING:  # heavy (diffusers, the GAN) or circular at run time; the types only
    from fewgen.classifier import FewgenClassifier
    from fewgen.gan.model import SourceGAN
    from fewgen.gan.setup import GenerationSetup
    from fewgen.generators.protocol import Generator
    from fewgen.pretrain import PretrainedBackbone

STEPS: Registry = Registry("pipeline step")
EPISODE_STEPS = {"evaluate", "learn"}  # steps that draw few-shot episodes from cfg.eval
STEP_MODULES: tuple[str, ...] = (  # the modules that register the steps
    "fewgen.app.steps.core",
    "fewgen.app.steps.generate",
    "fewgen.app.steps.learn",
    "fewgen.app.steps.export",
    "fewgen.app.steps.gan",
    "fewgen.app.steps.domainfusion",
    "fewgen.app.steps.report",
)


@dataclass
class RunState:
    """What the steps of a run hand each other. A step declares the fields it needs and makes
    (:func:`step`); the runner checks the pipeline's order against them before anything runs."""

    backbone: PretrainedBackbone | None = None
    generator: Generator | None = None
    adapters: dict[tuple[int, int], Any] = field(default_factory=dict)  # (seed, K) -> what generator.adapt returned
    adapter_entries: list[Path] = field(default_factory=list)  # their cache entries
    synthetic: dict[tuple[int, int], ArrayDataset] = field(default_factory=dict)  # (seed, K) -> images
    synthetic_kind: str | None = None  # generated | augmented-copies | imported
    synthetic_source: str | None = None  # a sentence for the log and the report
    learn_histories: dict | None = None
    classifier: FewgenClassifier | None = None
    gan_setups: dict[int, GenerationSetup] | None = None  # seed -> its generation setup
    gan_source: SourceGAN | None = None


Needs = tuple[str, ...] | Callable[[RunConfig], tuple[str, ...]]


def step(name: str, needs: Needs = (), makes: tuple[str, ...] = (), generative: bool = False):
    """Register a pipeline step: ``needs`` (fields of :class:`RunState`, or a function of the config
    giving them) must have been made by earlier steps; ``makes`` are the fields it fills;
    ``generative``: it needs the gen extra (diffusers, transformers, peft)."""
    unknown = [f for f in (*makes, *(needs if not callable(needs) else ())) if f not in RunState.__dataclass_fields__]
    if unknown:
        raise ValueError(f"step {name!r} names unknown run state fields {unknown}")
    return STEPS.register(name, needs=needs, makes=tuple(makes), generative=generative)


def step_needs(name: str, cfg: RunConfig) -> tuple[str, ...]:
    needs = STEPS.meta(name).get("needs", ())
    return tuple(needs(cfg) if callable(needs) else needs)


def check_pipeline(cfg: RunConfig) -> None:
    """Every step's needs are made by a step before it, or one clear error naming who makes them."""
    made: set[str] = set()
    for name in cfg.pipeline:
        for need in step_needs(name, cfg):
            if need not in made:
                makers = [s for s in STEPS.names() if need in STEPS.meta(s).get("makes", ())]
                raise FewgenError(f"the {name} step needs the run's {need}: put "
                                  f"{' or '.join(repr(m) for m in makers)} before it in pipeline")
        made.update(STEPS.meta(name).get("makes", ()))


def check_made(run: Run, name: str) -> None:
    """After step ``name``: every run state field it declares in ``makes`` was filled (a step that
    does not is a bug in it, reported as one, not a confusing error in a later step)."""
    empty = [f for f in STEPS.meta(name).get("makes", ()) if getattr(run.state, f) is None]
    if empty:
        raise RuntimeError(f"step {name!r} declares that it makes {', '.join(empty)} but left "
                           f"{'it' if len(empty) == 1 else 'them'} empty")


@dataclass
class Run:
    cfg: RunConfig
    dir: Path | None
    cache: ArtifactCache
    device: torch.device
    log: RunLog
    progress: bool = True
    data: FewShotData | None = None
    out: Path | None = None  # where the run is published when it finishes (``dir`` is its staging folder till then)
    state: RunState = field(default_factory=RunState)
    rows: list[dict] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    _episodes: dict[tuple, Episodes] = field(default_factory=dict)

    def episodes(self, n_way: int, n_shot: int, seed: int) -> Episodes:
        """The run's episodes for one setting: drawn once, saved in the run, reused by every method."""
        e = self.cfg.eval
        key = (n_way, n_shot, seed)
        if key not in self._episodes:
            path = self.dir / "episodes" / f"seed{seed}_{n_way}way_{n_shot}shot.npz" if self.dir else None
            if path is not None and path.exists():
                self._episodes[key] = Episodes.load(path)
            else:
                ep = sample_episodes(self.data.novel, n_way, n_shot, e.n_query, e.episodes, seed)
                if path is not None:
                    ep.save(path)
                self._episodes[key] = ep
        return self._episodes[key]

    def add_rows(self, rows: list[dict]) -> None:
        for row in rows:  # one schema for every method: a script can take the best row of each kind
            if not isinstance(row.get("uses_synthetic"), bool):
                raise ValueError(f"metrics row {row.get('method')!r} has no boolean 'uses_synthetic'")
        self.rows.extend(rows)
        if self.dir is not None:
            write_metrics(self.dir, self.rows, {"timings_s": self.timings})


def import_steps() -> None:
    for module in STEP_MODULES:
        importlib.import_module(module)


def check_eval_settings(cfg: RunConfig, data: FewShotData) -> None:
    if 0 in cfg.eval.n_shots:
        steps = [s for s in cfg.pipeline if s in EPISODE_STEPS]
        raise FewgenError(f"eval.n_shots has 0 (every image of a class as a shot), which leaves no query images for "
                          f"the {steps[0]} step; use K >= 1, or drop {' and '.join(steps)} from pipeline (fewgen fit)")
    from fewgen.data.fewshot import episode_bytes
    from fewgen.utils import check_memory

    for n_way in cfg.eval.n_ways:
        for n_shot in cfg.eval.n_shots:
            check_setting(data.novel, n_way, n_shot, cfg.eval.n_query)
            check_memory(episode_bytes(data.novel, n_way, n_shot, cfg.eval.n_query, cfg.eval.episodes),
                         f"eval.episodes={cfg.eval.episodes:,} at {n_way}-way {n_shot}-shot (the episodes' indices)",
                         "lower eval.episodes")
    from fewgen.evaluation.classifiers import CLASSIFIERS

    for c in cfg.eval.classifiers:
        CLASSIFIERS.get(c)


def vocabularies() -> dict[str, list[str]]:
    """The names each registry-valued config key admits (``fewgen.options.opt(choices=...)``)."""
    from fewgen.backbones.registry import BACKBONES
    from fewgen.data.augment import AUGMENTATIONS
    from fewgen.data.datasets import DATASETS
    from fewgen.dg.algorithms import DG_ALGORITHMS
    from fewgen.evaluation.classifiers import CLASSIFIERS
    from fewgen.gan import GAN_METHODS
    from fewgen.generators.diffusion import SAMPLERS
    from fewgen.generators.registry import GENERATORS
    from fewgen.learners import LEARNER_METHODS
    from fewgen.pretrain import RECIPES

    return {"dataset": DATASETS.names(), "backbone": BACKBONES.names(), "recipe": RECIPES.names(),
            "augmentation": list(AUGMENTATIONS), "classifier": CLASSIFIERS.names(),
            "learner method": LEARNER_METHODS.names(), "learner evaluation": ["head", *CLASSIFIERS.names()],
            "sweep method": [*LEARNER_METHODS.names(), "frozen"],
            "GAN adaptation method": GAN_METHODS.names(), "generator kind": GENERATORS.names(),
            "sampler": list(SAMPLERS), "pipeline step": STEPS.names(), "domainfusion method": DG_ALGORITHMS.names()}


def check_device(name: str) -> None:
    """``device`` is auto, cpu, cuda or cuda:N, and a CUDA device is there when asked for."""
    import re

    if name in ("auto", "cpu"):
        return
    if not re.fullmatch(r"cuda(:\d+)?", name):
        raise FewgenError(f"config key 'device': unknown device {name!r}; use auto, cpu, cuda or cuda:N")
    if not torch.cuda.is_available():
        build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
        raise FewgenError(f"device={name} but no CUDA device is available (torch {torch.__version__} is {build}); "
                          "use device=cpu or device=auto, or install a CUDA build of torch")
    index = int(name.split(":")[1]) if ":" in name else 0
    if index >= torch.cuda.device_count():
        raise FewgenError(f"device={name} but only {torch.cuda.device_count()} CUDA device(s) are visible")


def check_config(cfg: RunConfig) -> list[str]:
    """Every name and range in ``cfg`` (registries, devices, counts, threads), before anything runs.
    Settings that follow from others are filled in first (:func:`fewgen.app.checks.resolve_defaults`);
    returns its lines for the log."""
    from fewgen.app.config import check_values

    import_steps()
    check_run_name(cfg.name)
    check_values(cfg, vocabularies())
    notes = resolve_defaults(cfg)
    check_pipeline(cfg)
    check_device(cfg.device)
    check_combinations(cfg)
    if cfg.data.eval_split == "val":
        whole = [s for s in cfg.pipeline if s in ("domainfusion", "gan-source", "gan-adapt")]
        if whole:
            raise FewgenError(f"data.eval_split=val draws few-shot episodes from the validation classes; the "
                              f"{whole[0]} step uses the whole dataset instead: leave data.eval_split=novel")
    from fewgen.deps import check_generative_stack

    for step in cfg.pipeline:
        if STEPS.meta(step).get("generative") or (step == "learn" and cfg.learner.model == "clip"):
            check_generative_stack(step)
    if cfg.data.channels is not None and cfg.data.dataset != "imagefolder":
        from fewgen.data.datasets import DATASETS

        native = DATASETS.meta(cfg.data.dataset)["channels"]
        if cfg.data.channels != native:
            raise FewgenError(f"config key 'data.channels': {cfg.data.dataset} images have {native} channel(s); "
                              f"data.channels={cfg.data.channels} applies to imagefolder only (leave it null)")
    return notes


def run(cfg: RunConfig, out_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
        quiet: bool = False) -> Run:
    """Run ``cfg.pipeline`` and return the finished :class:`Run` (rows in ``run.rows``).

    Everything the config names is checked first; then the run is built in a hidden folder beside
    ``out_dir`` and renamed into place only when every step has finished, so an earlier run there
    survives a failed or interrupted one, and the same call again resumes from the cache.
    """
    from fewgen.utils import is_main_process

    notes = check_config(cfg)
    out_dir = Path(out_dir or Path("runs") / cfg.name)
    if not is_main_process():  # under a launcher the other processes do their share of the work and write no run
        return _run_locked(cfg, None, progress=False, quiet=True, notes=notes)
    check_run_dir(out_dir, overwrite)  # the quick refusals before taking the lock
    with run_lock(out_dir):
        check_run_dir(out_dir, overwrite)  # again, now that no other process can change it
        return _run_locked(cfg, out_dir, progress, quiet, notes)


def _run_locked(cfg: RunConfig, out_dir: Path | None, progress: bool, quiet: bool, notes: list[str] = ()) -> Run:
    """The run itself, its folder's lock held (``out_dir`` None: a helper process of a launch, which
    writes no run folder and logs nothing)."""
    cache = ArtifactCache(cfg.cache_dir)
    cache.check_writable()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.pretrain.seed)
    t0 = time.time()
    data = load_data(cfg.data, cfg.backbone)  # bad data or impossible settings fail before anything is written
    check_data(cfg, data)
    if EPISODE_STEPS & set(cfg.pipeline):
        check_eval_settings(cfg, data)
    run_dir = None if out_dir is None else prepare_staging(out_dir)
    log = RunLog(None if run_dir is None else run_dir / "log.txt", quiet=quiet)
    if run_dir is not None:
        write_config(run_dir, cfg)
        write_json(run_dir / "env.json", environment(str(device)))
        write_json(run_dir / "splits.json", data.summary())
    r = Run(cfg, run_dir, cache, device, log, progress, data=data, out=out_dir)
    for note in notes:
        log(f"config: {note}")
    log(f"data: {r.data.protocol}; base {len(r.data.base)} images / {r.data.base.num_classes} classes, "
        f"val {r.data.val.num_classes} classes, novel {r.data.novel.num_classes} classes")
    r.timings["load_data"] = round(time.time() - t0, 2)
    for step in cfg.pipeline:
        t = time.time()
        log(f"== step {step}")
        STEPS.get(step)(r)
        check_made(r, step)
        r.timings[step] = round(time.time() - t, 2)
        log(f"== step {step} done in {r.timings[step]:.0f}s")
    r.timings["total"] = round(time.time() - t0, 2)
    if run_dir is None:
        return r
    write_metrics(run_dir, r.rows, {"timings_s": r.timings})
    write_json(run_dir / "done", {"timings_s": r.timings})
    log("\n" + format_table(r.rows))
    best = format_best(best_of_each_kind(r.rows))
    if best:
        log("\nreal images only against real + generated images (best row of each kind):\n" + best)
    log("cost per step: " + ", ".join(f"{k} {v:.0f}s" for k, v in r.timings.items() if k != "total"))
    r.dir = publish_run(run_dir, out_dir)
    log.path = r.dir / "log.txt"
    log(f"run finished in {r.timings['total']:.0f}s: {r.dir}")
    if (r.dir / "tensorboard").is_dir():
        log(f"training curves: tensorboard --logdir {r.dir / 'tensorboard'}")
    return r
