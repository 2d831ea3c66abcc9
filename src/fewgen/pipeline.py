"""``fewgen run``: a config's pipeline steps, in order, in one run directory.

Steps are registered functions of a :class:`Run`; each reads and writes artifacts through
the content-addressed cache, so a rerun or a second preset reuses what exists. The core
steps (``pretrain``, ``evaluate``) live here; later stages register theirs in their own
modules, listed in ``STEP_MODULES``.
"""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fewgen.cache import ArtifactCache
from fewgen.config import RunConfig
from fewgen.data.base import FewShotData
from fewgen.data.fewshot import Episodes, check_setting, sample_episodes
from fewgen.errors import FewgenError
from fewgen.registry import Registry
from fewgen.runs import (
    RunLog,
    best_of_each_kind,
    check_run_dir,
    environment,
    format_best,
    format_table,
    prepare_staging,
    publish_run,
    write_config,
    write_metrics,
)
from fewgen.utils import resolve_device, seed_everything, write_json

STEPS: Registry = Registry("pipeline step")
EPISODE_STEPS = {"evaluate", "learn"}  # steps that draw few-shot episodes from cfg.eval
STEP_MODULES: tuple[str, ...] = (  # modules that register more steps when imported
    "fewgen.learners.steps",
    "fewgen.reports.steps",
    "fewgen.learners.domainfusion_steps",
    "fewgen.generators.gan_steps",
    "fewgen.generators.steps",
)


@dataclass
class Run:
    cfg: RunConfig
    dir: Path | None
    cache: ArtifactCache
    device: torch.device
    log: RunLog
    progress: bool = True
    data: FewShotData | None = None
    artifacts: dict[str, Any] = field(default_factory=dict)
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


def load_data(cfg: RunConfig) -> FewShotData:
    from fewgen.data import load_dataset

    d = cfg.data
    foreign = d.novel_dataset is not None
    if foreign and (d.base_classes is None) != (d.val_classes is None):
        raise FewgenError("with data.novel_dataset give both data.base_classes and data.val_classes, or neither")
    data = load_dataset(d.dataset, d.root, d.image_size, base_classes=d.base_classes, val_classes=d.val_classes,
                        novel_classes=([] if d.base_classes is not None else None) if foreign else d.novel_classes,
                        download=d.download, channels=d.channels)
    if foreign:
        from fewgen.data.novel import load_novel, with_novel_dataset

        novel, rule = load_novel(d.novel_dataset, d.root, data.base.image_shape, d.novel_classes, d.novel_root)
        data = with_novel_dataset(data, novel, rule, d.novel_dataset)
    if d.eval_split == "val":  # model selection: the val classes stand in for the novel ones, never seen here
        import dataclasses

        data = dataclasses.replace(data, novel=data.val, full=None,
                                   protocol=f"{data.protocol}; episodes from the VALIDATION classes "
                                            "(data.eval_split=val, for choosing hyperparameters)")
    return data


def check_eval_settings(cfg: RunConfig, data: FewShotData) -> None:
    if 0 in cfg.eval.n_shots:
        steps = [s for s in cfg.pipeline if s in EPISODE_STEPS]
        raise FewgenError(f"eval.n_shots has 0 (every image of a class as a shot), which leaves no query images for "
                          f"the {steps[0]} step; use K >= 1, or drop {' and '.join(steps)} from pipeline (fewgen fit)")
    for n_way in cfg.eval.n_ways:
        for n_shot in cfg.eval.n_shots:
            check_setting(data.novel, n_way, n_shot, cfg.eval.n_query)
    from fewgen.evaluation.classifiers import CLASSIFIERS

    for c in cfg.eval.classifiers:
        CLASSIFIERS.get(c)


@STEPS.register("pretrain")
def step_pretrain(run: Run) -> None:
    from fewgen.pretrain import pretrain_backbone

    pb = pretrain_backbone(run.cfg, run.data, run.cache, run.device, run.log, run.progress)
    run.artifacts["backbone"] = pb
    if run.dir is not None:
        write_json(run.dir / "pretrain_history.json",
                   {"history": pb.history, "best_epoch": pb.best_epoch, "best_val": pb.best_val, "cache_key": pb.key})
        link = run.dir / "checkpoints" / "backbone.safetensors"
        if not link.exists():
            link.symlink_to(pb.path.resolve())


def novel_features(run: Run) -> torch.Tensor:
    from fewgen.evaluation.features import cached_features

    pb = run.artifacts["backbone"]
    return cached_features(run.cache, pb.key, pb.backbone, run.data.novel, run.device, run.log)


def evaluate_frozen(run: Run, features: torch.Tensor, method: str, extra=None, extra_fields=None) -> list[dict]:
    """Rows for every (classifier, N, K) and all-way, on the run's shared episodes.

    ``extra``: an :class:`~fewgen.evaluation.protocol.ExtraSupport` (synthetic images added to
    every support, weighted), or None. ``extra_fields`` go into every row (``uses_synthetic``
    among them; False by default)."""
    from fewgen.data.fewshot import all_way_split
    from fewgen.evaluation.protocol import all_way_accuracy, episode_accuracies, summary_row

    cfg, novel = run.cfg, run.data.novel
    n_classes = novel.num_classes
    kw = {"logreg": {"c": cfg.eval.logreg_c, "max_iter": cfg.eval.logreg_iters}}
    fields = {"uses_synthetic": False, **(extra_fields or {})}
    rows = []
    bar = None
    if run.progress:
        from tqdm.auto import tqdm

        total = len(cfg.eval.classifiers) * len(cfg.eval.n_ways) * len(cfg.eval.n_shots) * len(cfg.seeds)
        bar = tqdm(total=total, desc=f"evaluate {method}", leave=False)
    for clf in cfg.eval.classifiers:
        for n_way in cfg.eval.n_ways:
            for n_shot in cfg.eval.n_shots:
                per_seed = []
                for seed in cfg.seeds:
                    if bar is not None:
                        bar.update()
                    ep = run.episodes(n_way, n_shot, seed)
                    es = None if extra is None else \
                        (lambda classes, s=seed, k=n_shot: extra.for_episodes(classes, s, k, n_classes))
                    per_seed.append(episode_accuracies(features, ep, clf, classifier_kwargs=kw.get(clf), extra_support=es))
                rows.append(summary_row(method, n_way, n_shot, per_seed, cfg.seeds, classifier=clf,
                                        n_query=cfg.eval.n_query, **fields))
        if cfg.eval.all_way:
            for n_shot in cfg.eval.n_shots:
                correct = []
                for seed in cfg.seeds:
                    sup, qry = all_way_split(novel, n_shot, seed)
                    more = None if extra is None else extra.for_all_way(seed, n_shot, n_classes)
                    correct.append(all_way_accuracy(features, novel.labels, sup, qry, clf, kw.get(clf), extra=more))
                row = summary_row(method, n_classes, n_shot, correct, cfg.seeds, classifier=clf, all_way=True, **fields)
                row["queries"], row["episodes"] = row["episodes"], len(cfg.seeds)
                row["seed_accuracies"] = [round(float(c.mean()) * 100, 3) for c in correct]
                rows.append(row)
    if bar is not None:
        bar.close()
    return rows


@STEPS.register("evaluate")
def step_evaluate(run: Run) -> None:
    if "backbone" not in run.artifacts:
        raise FewgenError("the evaluate step needs a backbone: put 'pretrain' before it in pipeline")
    feats = novel_features(run)
    rows = evaluate_frozen(run, feats, method=run.cfg.pretrain.recipe)
    run.add_rows(rows)


def vocabularies() -> dict[str, list[str]]:
    """The names each registry-valued config key admits (``fewgen.config.opt(choices=...)``)."""
    from fewgen.backbones.registry import BACKBONES
    from fewgen.data.augment import AUGMENTATIONS
    from fewgen.data.datasets import DATASETS
    from fewgen.evaluation.classifiers import CLASSIFIERS
    from fewgen.generators import cdc, dcl, freezed  # noqa: F401  (registration)
    from fewgen.generators.diffusion import SAMPLERS
    from fewgen.generators.gan import ADAPTERS
    from fewgen.generators.steps import GENERATOR_KINDS
    from fewgen.learners.domainfusion_steps import METHODS as DG_METHODS
    from fewgen.learners.steps import KNOWN_METHODS
    from fewgen.pretrain import RECIPES

    return {"dataset": DATASETS.names(), "backbone": BACKBONES.names(), "recipe": RECIPES.names(),
            "augmentation": list(AUGMENTATIONS), "classifier": CLASSIFIERS.names(),
            "learner method": list(KNOWN_METHODS), "learner evaluation": ["head", *CLASSIFIERS.names()],
            "sweep method": [*KNOWN_METHODS, "frozen"],
            "GAN adaptation method": ADAPTERS.names(), "generator kind": list(GENERATOR_KINDS),
            "sampler": list(SAMPLERS), "pipeline step": STEPS.names(), "domainfusion method": list(DG_METHODS)}


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


def check_config(cfg: RunConfig) -> None:
    """Every name and range in ``cfg`` (registries, devices, counts, threads), before anything runs."""
    from fewgen.config import check_values

    for module in STEP_MODULES:
        importlib.import_module(module)
    check_values(cfg, vocabularies())
    check_device(cfg.device)
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


def run(cfg: RunConfig, out_dir: str | Path | None = None, overwrite: bool = False, progress: bool = True,
        quiet: bool = False) -> Run:
    """Run ``cfg.pipeline`` and return the finished :class:`Run` (rows in ``run.rows``).

    Everything the config names is checked first; then the run is built in a hidden folder beside
    ``out_dir`` and renamed into place only when every step has finished, so an earlier run there
    survives a failed or interrupted one, and the same call again resumes from the cache.
    """
    check_config(cfg)
    out_dir = Path(out_dir or Path("runs") / cfg.name)
    check_run_dir(out_dir, overwrite)
    cache = ArtifactCache(cfg.cache_dir)
    cache.check_writable()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = resolve_device(cfg.device)
    seed_everything(cfg.pretrain.seed)
    t0 = time.time()
    data = load_data(cfg)  # bad data or impossible settings fail before anything is written
    if EPISODE_STEPS & set(cfg.pipeline):
        check_eval_settings(cfg, data)
    run_dir = prepare_staging(out_dir)
    write_config(run_dir, cfg)
    log = RunLog(run_dir / "log.txt", quiet=quiet)
    write_json(run_dir / "env.json", environment(str(device)))
    r = Run(cfg, run_dir, cache, device, log, progress, data=data)
    write_json(run_dir / "splits.json", r.data.summary())
    log(f"data: {r.data.protocol}; base {len(r.data.base)} images / {r.data.base.num_classes} classes, "
        f"val {r.data.val.num_classes} classes, novel {r.data.novel.num_classes} classes")
    r.timings["load_data"] = round(time.time() - t0, 2)
    for step in cfg.pipeline:
        t = time.time()
        log(f"== step {step}")
        STEPS.get(step)(r)
        r.timings[step] = round(time.time() - t, 2)
        log(f"== step {step} done in {r.timings[step]:.0f}s")
    r.timings["total"] = round(time.time() - t0, 2)
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
    return r
