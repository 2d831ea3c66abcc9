"""DataDream: few-shot guided dataset generation (Kim, Wang, Pal, Baek & Akata, ECCV 2024).

DataDream adapts a pretrained text-to-image diffusion model to the K real shots of each
novel class before generating a synthetic training set. It trains LoRA (Hu et al., 2022)
on the attention projections of the UNet::

    W' x = W x + (alpha / r) B A x,   A in R^{r x d_in}, B in R^{d_out x r}, B initialised to 0

on ``to_q``, ``to_k``, ``to_v`` and ``to_out.0`` (rank r = 16), with the standard diffusion
loss (its Eq. 1) on the few-shot images and their class condition. Two modes:

* ``cls``: one adapter per class, trained only on that class's K shots (DataDream_cls);
* ``dset``: one adapter for all novel classes, trained on the whole few-shot set (DataDream_dset).

As in the paper the two modes get the same total number of training steps: ``cls`` trains
each of the C adapters for ``steps_per_class`` steps, ``dset`` its one adapter for
``C * steps_per_class`` steps. Where the paper puts the class name in a prompt, the pixel
model here also learns a new class token per novel class (initialised to the mean base
token; textual-inversion style), trained together with the LoRA.

Adapters are saved in the peft/diffusers layout: ``pytorch_lora_weights.safetensors`` with
``unet.<module>.lora.down/up.weight`` keys (what ``save_lora_weights`` writes and
``load_lora_weights`` / ``UNet2DConditionModel.load_lora_adapter`` read), one per class in
``class_<i>/`` for ``cls``, plus ``class_embeddings.safetensors`` and ``adapter_config.json``.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.generators.pixels import to_model_space
from fewgen.options import opt
from fewgen.synthesis.sharding import ProcessContext, shard
from fewgen.training import TrainingMonitor, cosine_schedule, run_steps
from fewgen.utils import content_digest, make_generator, read_json, stable_hash, write_json


class PixelGenerator(Protocol):
    """What DataDream reads of the class-token pixel generator
    (:class:`fewgen.generators.diffusion.DiffusionGenerator`, which imports this module)."""

    unet: torch.nn.Module
    conditioner: torch.nn.Module
    device: torch.device

    def add_classes(self, names, init=None) -> list[int]: ...
    def modules(self) -> dict[str, torch.nn.Module]: ...
    def diffusion_loss(self, *args, **kwargs) -> torch.Tensor: ...
    def sample(self, *args, **kwargs) -> torch.Tensor: ...
    def state_key(self) -> str: ...


MODES = ("cls", "dset")
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


@dataclass
class DataDreamConfig:
    """DataDream's adaptation of a generator to the shots: the config section ``generator.datadream``
    and what :func:`run_datadream` and the generators' ``adapt`` read."""

    mode: str = opt("dset", "cls (one LoRA per class, trained on its shots) or dset (one LoRA for all classes; the "
                    "same total steps)", choices=MODES)
    rank: int = opt(16, "LoRA rank", min=1)
    alpha: float | None = opt(None, "LoRA alpha (the update is scaled by alpha / rank); default: the rank", gt=0)
    target_modules: list[str] = opt(["to_q", "to_k", "to_v", "to_out.0"], "attention projections of a pixel "
                                    "generator's UNet that get LoRA (Stable Diffusion: its own fixed set)",
                                    nonempty=True)
    steps_per_class: int = opt(40, "steps per class (dset trains classes x this, the same total)", min=1)
    batch_size: int = opt(16, "batch size", min=1)
    lr: float = opt(1e-3, "learning rate (AdamW, warmup + cosine; the paper's 1e-4 for Stable Diffusion)", gt=0)
    warmup: int = opt(10, "warmup steps (at most half of each adapter's steps)", min=0)
    weight_decay: float = opt(1e-2, "AdamW weight decay", min=0)
    p_uncond: float = opt(0.1, "probability of the null condition in a step (for guidance); pixel generators",
                          min=0, max=1)
    seed: int = opt(0, "seed of the adapters' initialisation and batches")

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise FewgenError(f"DataDream mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.rank < 1 or self.steps_per_class < 1:
            raise FewgenError(f"rank ({self.rank}) and steps_per_class ({self.steps_per_class}) must be >= 1")

    @property
    def lora_alpha(self) -> float:
        return float(self.rank) if self.alpha is None else float(self.alpha)


def lora_config(cfg: DataDreamConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.target_modules),
                      init_lora_weights="gaussian")


def inject_lora(gen: PixelGenerator, cfg: DataDreamConfig) -> None:
    """Add one LoRA adapter ("default") to ``gen.unet`` and freeze everything else."""
    for m in gen.modules().values():
        m.requires_grad_(False)
    gen.unet.add_adapter(lora_config(cfg))


def lora_state(unet) -> dict[str, torch.Tensor]:
    """The LoRA weights in peft layout (``...to_q.lora_A.weight``), detached copies."""
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unet).items()}


def set_lora_state(unet, state: dict[str, torch.Tensor]) -> None:
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(unet, state)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise FewgenError(f"adapter has {len(unexpected)} keys the model lacks (e.g. {unexpected[0]}); "
                          "it was trained for another generator architecture")


def init_lora_state(unet, g: torch.Generator, rank: int) -> dict[str, torch.Tensor]:
    """A fresh LoRA: A ~ N(0, 1/r^2) (peft's "gaussian"), B = 0, drawn from ``g``."""
    out = {}
    for k, v in lora_state(unet).items():
        out[k] = torch.randn(v.shape, generator=g) / rank if "lora_A" in k else torch.zeros_like(v)
    return out


def to_diffusers_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers

    return {f"unet.{k}": v for k, v in convert_state_dict_to_diffusers(state).items()}


def from_diffusers_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft({k[len("unet."):]: v for k, v in state.items() if k.startswith("unet.")})


@dataclass
class DataDreamAdapter:
    """Trained DataDream weights for a list of novel classes.

    Attributes:
        cfg: the DataDream settings.
        class_names: the novel classes, in label order.
        lora: LoRA states in peft layout, one per class (``cls``) or one (``dset``).
        class_embeddings: the learned class tokens, shape (n_classes, cond_dim).
        generator_key: key of the base generator the adapter belongs to.
    """

    cfg: DataDreamConfig
    class_names: list[str]
    lora: list[dict[str, torch.Tensor]]
    class_embeddings: torch.Tensor
    generator_key: str
    history: list[dict] = field(default_factory=list)

    @property
    def key(self) -> str:
        return stable_hash({"datadream": asdict(self.cfg), "classes": self.class_names, "gen": self.generator_key,
                            "weights": [content_digest(s) for s in self.lora],
                            "embeddings": content_digest(self.class_embeddings)})

    def save(self, folder: str | Path) -> None:
        from fewgen.checkpoint import save_tensors
        from fewgen.utils import atomic_path

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        subdirs = [folder] if self.cfg.mode == "dset" else [folder / f"class_{i:04d}" for i in range(len(self.lora))]
        for sub, state in zip(subdirs, self.lora, strict=True):
            from safetensors.torch import save_file

            sub.mkdir(parents=True, exist_ok=True)
            tensors = {k: v.contiguous() for k, v in to_diffusers_layout(state).items()}
            with atomic_path(sub / LORA_WEIGHTS) as tmp:
                save_file(tensors, str(tmp), metadata={"format": "pt"})
        save_tensors(folder / "class_embeddings.safetensors", {"class_embeddings": self.class_embeddings})
        lc = lora_config(self.cfg).to_dict()
        lc = {k: (sorted(v) if isinstance(v, set) else v) for k, v in lc.items()}
        write_json(folder / "adapter_config.json", {"method": "datadream", "datadream": asdict(self.cfg),
                                                    "class_names": self.class_names, "lora": lc,
                                                    "generator_key": self.generator_key, "history": self.history})

    @classmethod
    def load(cls, folder: str | Path) -> DataDreamAdapter:
        from safetensors.torch import load_file

        from fewgen.checkpoint import load_tensors

        folder = Path(folder)
        info = read_json(folder / "adapter_config.json")
        cfg = DataDreamConfig(**info["datadream"])
        n = len(info["class_names"])
        subdirs = [folder] if cfg.mode == "dset" else [folder / f"class_{i:04d}" for i in range(n)]
        lora = []
        for sub in subdirs:
            if not (sub / LORA_WEIGHTS).exists():
                raise FewgenError(f"adapter file {sub / LORA_WEIGHTS} is missing; delete {folder} to retrain")
            lora.append(from_diffusers_layout(load_file(str(sub / LORA_WEIGHTS))))
        emb, _ = load_tensors(folder / "class_embeddings.safetensors")
        return cls(cfg, info["class_names"], lora, emb["class_embeddings"], info["generator_key"],
                   info.get("history", []))


class AdaptedGenerator:
    """A copy of a pixel generator (``gen``) with a DataDream adapter's LoRA injected; :meth:`use`
    loads class c's LoRA (``cls``; the set's one for ``dset``)."""

    def __init__(self, base, adapter: DataDreamAdapter):
        self.adapter = adapter
        self.gen = copy.deepcopy(base)
        inject_lora(self.gen, adapter.cfg)
        self._active: int | None = None
        self.use(0)

    def use(self, c: int) -> None:
        """Load class ``c``'s LoRA (``cls``; the set's one for ``dset``) into the UNet."""
        i = 0 if self.adapter.cfg.mode == "dset" else c
        if self._active != i:
            set_lora_state(self.gen.unet, self.adapter.lora[i])
            self._active = i


class AdaptedDiffusion(AdaptedGenerator):
    """A class-token generator with the novel classes added and a DataDream adapter loaded.

    ``sample_class(c, seeds, ...)`` switches to class c's LoRA (``cls``) before sampling.
    """

    def __init__(self, base: PixelGenerator, adapter: DataDreamAdapter):
        super().__init__(base, adapter)
        self.labels = self.gen.add_classes(adapter.class_names, init=adapter.class_embeddings)

    def sample_class(self, c: int, seeds, steps: int = 50, guidance: float = 2.0, sampler: str = "ddim",
                     batch_size: int = 64, precision: str = "float32") -> torch.Tensor:
        """uint8 images of novel class ``c`` (index into adapter.class_names), one per seed."""
        self.use(c)
        return self.gen.sample([self.labels[c]] * len(seeds), seeds=list(seeds), steps=steps, guidance=guidance,
                               sampler=sampler, batch_size=batch_size, precision=precision)


def _train_adapter(gen: PixelGenerator, images: torch.Tensor, labels: torch.Tensor, steps: int,
                   cfg: DataDreamConfig, seed_parts: tuple, log: Callable[[str], None] | None,
                   monitor: TrainingMonitor | None = None) -> list[float]:
    """Train the LoRA currently in ``gen.unet`` plus the newest class-token chunk, in place
    (each step reported to ``monitor``)."""
    lora_params = [p for n, p in gen.unet.named_parameters() if "lora_" in n]
    table = gen.conditioner.tables[-1]
    for p in lora_params:
        p.requires_grad_(True)
    table.requires_grad_(True)
    params = [*lora_params, table]
    x_all = to_model_space(images)
    gen.unet.train()

    def step_loss(step: int) -> torch.Tensor:
        g = make_generator("datadream", *seed_parts, step)
        idx = torch.randint(0, len(x_all), (cfg.batch_size,), generator=g)
        return gen.diffusion_loss(x_all[idx].to(gen.device), labels[idx], g, p_uncond=cfg.p_uncond, p_drop_class=0.0)

    losses = adapter_steps(step_loss, params, cfg, steps, monitor)
    gen.unet.eval()
    for p in params:
        p.requires_grad_(False)
    return losses


def adapter_steps(step_loss: Callable[[int], torch.Tensor], params: list, cfg: DataDreamConfig, steps: int,
                  monitor: TrainingMonitor | None) -> list[float]:
    """One adapter's training on the core (:func:`fewgen.training.run_steps`), the same for every
    generator: AdamW (``cfg.lr``, ``cfg.weight_decay``), warmup (at most half the steps) + cosine,
    gradients clipped to norm 1."""
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = cosine_schedule(opt, steps, min(cfg.warmup, steps // 2))
    return run_steps(step_loss, opt, sched, steps, params=params, max_norm=1.0, monitor=monitor,
                     name="DataDream adaptation", hint="lower generator.datadream.lr")


def adaptation_monitor(name: str, steps: int, ctx: ProcessContext, log: Callable[[str], None] | None,
                       progress: bool, log_dir: str | Path | None) -> TrainingMonitor:
    """The monitor of this process's share (``steps``) of an adaptation: one bar, estimate and
    TensorBoard curve over all its classes' steps (the ``loss`` of class after class), its events in
    ``log_dir`` (``log_dir/rank<r>`` when several processes share the classes; none for no steps)."""
    if log_dir is not None and ctx.world > 1:
        log_dir = Path(log_dir) / f"rank{ctx.rank}"
    return TrainingMonitor(name, steps, log=log, progress=progress, log_dir=log_dir if steps else None)


#: One adapter's training: ``train(classes, name, steps, monitor) -> (state, losses)``, where
#: ``classes`` are the indices (into the few-shot set's class names) of the classes it sees and
#: ``name`` seeds it (``"dset"``, or the class's name for ``cls``).
TrainOne = Callable[[list[int], str, int, TrainingMonitor], tuple[object, list[float]]]


def run_datadream(names: list[str], cfg: DataDreamConfig, train: TrainOne, ctx: ProcessContext | None = None,
                  log: Callable[[str], None] | None = None, progress: bool = False,
                  log_dir: str | Path | None = None, label: str = "datadream") -> tuple[list, list[dict]]:
    """DataDream's schedule, the same for every generator; the generator supplies ``train`` (its
    LoRA target, loss and state). ``dset``: one adapter on all classes for ``classes x
    steps_per_class`` steps, trained on the main process. ``cls``: one adapter per class, each
    seeded by its class name, sharded over the processes and gathered in class order, so the result
    equals one process's. Returns the states (one for ``dset``, one per class for ``cls``) and one
    history record each; a bar with the ETA (``progress``) and TensorBoard events of the loss
    (``log_dir``) while it trains (:func:`adaptation_monitor`)."""
    ctx = ctx or ProcessContext()
    n = len(names)
    t0 = time.time()

    def record(name: str, steps: int, losses: list[float]) -> dict:
        return {"class": name, "steps": steps, "loss_first": losses[0], "loss_last": sum(losses[-10:]) / len(losses[-10:])}

    if cfg.mode == "dset":
        states, history = [], []
        if ctx.is_main:
            steps = cfg.steps_per_class * n
            with adaptation_monitor(f"[{label} dset] adaptation", steps, ctx, log, progress, log_dir) as monitor:
                state, losses = train(list(range(n)), "dset", steps, monitor)
            states, history = [state], [record("all", steps, losses)]
            if log:
                log(f"[{label} dset] {steps} steps, loss {history[0]['loss_last']:.4f} ({time.time() - t0:.0f}s)")
        return ctx.gather_objects((states, history))[0]

    mine: dict[int, tuple] = {}
    my_classes = shard(list(range(n)), ctx.rank, ctx.world)
    with adaptation_monitor(f"[{label} cls] adaptation", cfg.steps_per_class * len(my_classes), ctx, log, progress,
                            log_dir) as monitor:
        for c in my_classes:
            state, losses = train([c], names[c], cfg.steps_per_class, monitor)
            mine[c] = (state, record(names[c], cfg.steps_per_class, losses))
            if log and len(mine) % max(1, n // 10) == 0:
                log(f"[{label} cls] {len(mine)} classes on rank {ctx.rank} ({time.time() - t0:.0f}s)")
    merged: dict[int, tuple] = {}
    for part in ctx.gather_objects(mine):
        merged.update(part)
    return [merged[c][0] for c in range(n)], [merged[c][1] for c in range(n)]


def images_of(few_shot: ArrayDataset, classes: list[int]) -> torch.Tensor:
    """Indices of the images of ``classes`` in ``few_shot``, in their order there."""
    return torch.nonzero(torch.isin(few_shot.labels, torch.tensor(classes))).squeeze(1)


def train_datadream(base: PixelGenerator, few_shot: ArrayDataset, cfg: DataDreamConfig,
                    ctx: ProcessContext | None = None, log: Callable[[str], None] | None = None,
                    progress: bool = False, log_dir: str | Path | None = None) -> DataDreamAdapter:
    """Adapt the class-token generator ``base`` to ``few_shot`` (K real images per novel class; its
    labels index its class_names) and return the adapter: LoRA on the UNet's attention and a new
    class token per class (:func:`run_datadream`'s schedule). The base generator is not modified."""
    names = list(few_shot.class_names)
    gen = copy.deepcopy(base)
    new_labels = torch.tensor(gen.add_classes(names))
    init_table = gen.conditioner.tables[-1].detach().clone()
    inject_lora(gen, cfg)

    def train(classes: list[int], name: str, steps: int, monitor: TrainingMonitor) -> tuple[tuple, list[float]]:
        with torch.no_grad():
            gen.conditioner.tables[-1].copy_(init_table)
        set_lora_state(gen.unet, init_lora_state(gen.unet, make_generator("datadream-init", cfg.seed, name), cfg.rank))
        idx = images_of(few_shot, classes)
        losses = _train_adapter(gen, few_shot.images[idx], new_labels[few_shot.labels[idx]], steps, cfg,
                                (cfg.seed, name), log, monitor)
        return (lora_state(gen.unet), gen.conditioner.tables[-1][classes].detach().clone()), losses

    states, history = run_datadream(names, cfg, train, ctx, log, progress, log_dir)
    return DataDreamAdapter(cfg, names, [lora for lora, _ in states], torch.cat([rows for _, rows in states]),
                            base.state_key(), history)


def cached_adaptation(cache, parts: dict, train: Callable[[Path], object], save: Callable[[object, Path], None],
                      load: Callable[[Path], object], ctx: ProcessContext | None = None,
                      log: Callable[[str], None] | None = None, what: str = "DataDream adapter"):
    """The adapter of cache kind ``adapters`` for ``parts`` (:meth:`ArtifactCache.build_or_load`):
    loaded when its entry is done and intact; else ``train(entry)`` on every process (``cls``
    adapters are sharded; a generator may write its files into the entry as it trains),
    ``save(trained, entry)`` and the done marker from the main process, then loaded."""
    ctx = ctx or ProcessContext()

    def build(entry: Path) -> None:
        t0 = time.time()
        trained = train(entry)
        if ctx.is_main:
            save(trained, entry)
            cache.mark_done(entry, {"train_s": round(time.time() - t0, 1)})
        ctx.barrier()

    return cache.build_or_load("adapters", parts, build, load, log, what)
