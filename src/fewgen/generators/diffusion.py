"""Class- and name-conditioned pixel diffusion (DDPM training; DDIM / DPM-Solver++ sampling).

The "pretrained generator" at a scale two CPU cores can train: a small diffusers
``UNet2DConditionModel`` in pixel space, trained on the base classes with the DDPM
objective (Ho et al., 2020, Eq. 14)::

    L = E_{x0, eps ~ N(0, I), t} || eps - eps_theta(sqrt(abar_t) x0 + sqrt(1 - abar_t) eps, t, c) ||^2

and sampled with DDIM (Song et al., 2021, eta = 0) or DPM-Solver++ (Lu et al., 2022, 2nd
order multistep) under classifier-free guidance (Ho & Salimans, 2022)::

    eps_hat = eps(x_t, t, null) + w * (eps(x_t, t, c) - eps(x_t, t, null))

The condition ``c`` is a short sequence of tokens read by cross-attention (and, pooled, added
to the time embedding): a learned **class token** (one row per known class) and, optionally,
a **name token**, a learned projection of the MiniLM embedding of the class name (so a class
the model never saw can be generated "from its name", DiffAlign's zero-shot mode). During
training each token is replaced by its learned null token with probability ``p_uncond``
(all tokens at once) or ``p_drop_class`` (class token only, so name-only sampling is in
distribution).

Public API (used by the DataDream, DiffAlign and DomainFusion learners)::

    gen = DiffusionGenerator(DiffusionConfig(image_size=28, channels=1), class_names)
    gen.fit(dataset, steps=2000, batch_size=64, lr=5e-4, seed=0)      # labels index class_names
    new_ids = gen.add_classes(["novel a", "novel b"])                 # new condition rows
    x = gen.sample(labels, seed=0, steps=50, guidance=2.0, sampler="ddim")   # uint8 (n, C, H, W)
    x = gen.img2img(images_uint8, labels, strength=0.5, steps=50, seed=0)    # uint8 (n, C, H, W)
    eps_hat = gen.predict_noise(x_t, t, labels)     # x_t float in [-1, 1] space, t long (B,)
    gen.unet, gen.conditioner, gen.noise_scheduler  # diffusers UNet, conditions, DDPMScheduler
    gen.save(folder); DiffusionGenerator.load(folder)

Labels index ``gen.class_names``; label ``-1`` means the null (unconditional) condition.
Images enter and leave as uint8 in [0, 255]; the model works on ``x / 127.5 - 1``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.errors import FewgenError
from fewgen.generators.pixels import (  # noqa: F401  (SAMPLERS, PRECISIONS, FitResult: part of this module's API)
    PRECISIONS,
    SAMPLERS,
    FitResult,
    PixelUNetConfig,
    PixelUNetOptions,
    autocast,
    build_conditional_unet,
    build_noise_scheduler,
    build_sampler,
    guided_noise,
    load_modules,
    per_image_noise,
    save_modules,
    to_model_space,
    to_uint8,
)
from fewgen.options import opt
from fewgen.training import TrainingMonitor, cosine_schedule, periodic, run_steps
from fewgen.utils import make_generator, seed_hash, stable_hash

COND_MODES = ("class", "name", "class+name")


@dataclass
class DiffusionOptions(PixelUNetOptions):
    """Options of the class-token generator (``generator.kind=diffusion``; the config section
    ``generator.diffusion``): its UNet, condition tokens and base training."""

    cond_mode: str = opt("class+name", "condition tokens: class, name (MiniLM of the class name) or class+name",
                         choices=COND_MODES)


@dataclass
class DiffusionConfig(PixelUNetConfig):
    """Architecture and noise schedule of the class-token model."""

    cond_mode: str = "class+name"
    p_drop_class: float = 0.2

    def __post_init__(self) -> None:
        if self.cond_mode not in COND_MODES:
            raise FewgenError(f"cond_mode {self.cond_mode!r} is not one of {', '.join(COND_MODES)}")
        super().__post_init__()

    @property
    def n_tokens(self) -> int:
        return 2 if self.cond_mode == "class+name" else 1


def build_unet(cfg: DiffusionConfig):
    """The diffusers ``UNet2DConditionModel`` for ``cfg`` (cross-attention on condition tokens)."""
    return build_conditional_unet(cfg, cfg.channels, cfg.cond_dim * cfg.n_tokens)


class Conditioner(nn.Module):
    """Condition tokens (B, T, cond_dim) and their pooled vector (B, T * cond_dim) for labels.

    Class embeddings live in ``tables`` (a list of chunks: the base classes, then each set of
    classes added later), so an adaptation can train only the rows it added.
    """

    def __init__(self, cfg: DiffusionConfig, n_classes: int, text_embeddings: torch.Tensor | None):
        super().__init__()
        self.cfg = cfg
        d = cfg.cond_dim
        self.use_class = cfg.cond_mode in ("class", "class+name")
        self.use_name = cfg.cond_mode in ("name", "class+name")
        self.tables = nn.ParameterList([nn.Parameter(torch.randn(n_classes, d) * 0.02)])
        self.null_class = nn.Parameter(torch.zeros(1, d))
        self.null_name = nn.Parameter(torch.zeros(1, d))
        if self.use_name:
            from fewgen.generators.text import TEXT_DIM

            if text_embeddings is None or text_embeddings.shape != (n_classes, TEXT_DIM):
                raise FewgenError("cond_mode with 'name' needs MiniLM embeddings of every class name")
            self.text_proj = nn.Sequential(nn.Linear(TEXT_DIM, d), nn.SiLU(), nn.Linear(d, d))
            self.register_buffer("text_embeddings", text_embeddings.float().clone())
        else:
            self.register_buffer("text_embeddings", torch.zeros(n_classes, 0))

    @property
    def n_classes(self) -> int:
        return sum(t.shape[0] for t in self.tables)

    def class_table(self) -> torch.Tensor:
        return torch.cat(list(self.tables)) if len(self.tables) > 1 else self.tables[0]

    def add_classes(self, n: int, text_embeddings: torch.Tensor | None, init: torch.Tensor | None = None) -> None:
        d = self.cfg.cond_dim
        rows = init.clone() if init is not None else self.class_table().detach().mean(0, keepdim=True).repeat(n, 1)
        self.tables.append(nn.Parameter(rows.reshape(n, d).to(self.null_class)))
        te = text_embeddings if self.use_name else torch.zeros(n, 0)
        self.text_embeddings = torch.cat([self.text_embeddings, te.to(self.text_embeddings)])

    def forward(self, labels: torch.Tensor, drop_class: torch.Tensor | None = None,
                drop_all: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """labels (B,) long, -1 = null; drop_* (B,) bool. Returns tokens (B, T, D), pooled (B, T*D)."""
        labels = labels.long()
        null = labels < 0
        safe = labels.clamp_min(0)
        if drop_all is not None:
            null = null | drop_all
        tokens = []
        if self.use_class:
            cls = self.class_table()[safe]
            mask = null if drop_class is None else (null | drop_class)
            tokens.append(torch.where(mask[:, None], self.null_class.expand_as(cls), cls))
        if self.use_name:
            name = self.text_proj(self.text_embeddings[safe])
            tokens.append(torch.where(null[:, None], self.null_name.expand_as(name), name))
        tok = torch.stack(tokens, 1)
        return tok, tok.flatten(1)


def norm_groups(channels: Sequence[int]) -> int:
    """GroupNorm groups of a UNet with these level widths: 8 when every width divides by 8, else 1."""
    return 8 if min(channels) % 8 == 0 else 1


class DiffusionGenerator:
    """A pixel diffusion model conditioned on class tokens and/or class-name embeddings."""

    kind = "diffusion"  # generator.kind (fewgen.generators.registry)
    file_format = "pixel-diffusion"  # generator.json's "kind"

    @classmethod
    def from_options(cls, g: DiffusionOptions, base, encoder=None,
                     device: torch.device | str = "cpu") -> DiffusionGenerator:
        """An untrained generator of options ``g`` for the base classes ``base``; it reads no encoder."""
        c, s = base.image_shape[0], base.image_shape[1]
        g.check_shape(s, "generator.diffusion")
        cfg = DiffusionConfig(image_size=s, channels=c, block_out_channels=list(g.block_out_channels),
                              attention_levels=list(g.attention_levels), cond_dim=g.cond_dim, cond_mode=g.cond_mode,
                              norm_num_groups=norm_groups(g.block_out_channels))
        return cls(cfg, base.class_names, device)

    @classmethod
    def load_trained(cls, folder: str | Path, encoder=None, device: torch.device | str = "cpu") -> DiffusionGenerator:
        return cls.load(folder, device)

    def __init__(self, cfg: DiffusionConfig, class_names: list[str], device: torch.device | str = "cpu",
                 text_embeddings: torch.Tensor | None = None, text_encoder_path: str | None = None):
        self.cfg = cfg
        self.class_names = list(class_names)
        self.device = torch.device(device)
        self.text_encoder_path = text_encoder_path
        if cfg.cond_mode != "class" and text_embeddings is None:
            from fewgen.generators.text import encode_class_names

            text_embeddings = encode_class_names(self.class_names, text_encoder_path)
        self.unet = build_unet(cfg).to(self.device)
        self.conditioner = Conditioner(cfg, len(class_names), text_embeddings).to(self.device)
        self.noise_scheduler = build_noise_scheduler(cfg)
        self.trained_key: str | None = None  # content key of the weights, set by the caller / cache

    # ------------------------------------------------------------------ conditions
    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "conditioner": self.conditioner}

    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.modules().values() for p in m.parameters())

    def class_index(self, names: Sequence[str]) -> list[int]:
        pos = {n: i for i, n in enumerate(self.class_names)}
        missing = [n for n in names if n not in pos]
        if missing:
            raise FewgenError(f"the generator has no condition for class {missing[0]!r}; "
                              "adapt it to the novel classes first (add_classes)")
        return [pos[n] for n in names]

    def add_classes(self, names: Sequence[str], init: torch.Tensor | None = None) -> list[int]:
        """Add condition rows for new classes (class token initialised to the mean base token).

        Returns their label indices. The name token comes from MiniLM, so a name-conditioned
        model can sample them at once (zero-shot); the class token needs adaptation.
        """
        names = list(names)
        te = None
        if self.conditioner.use_name:
            from fewgen.generators.text import encode_class_names

            te = encode_class_names(names, self.text_encoder_path)
        start = len(self.class_names)
        self.conditioner.add_classes(len(names), te, init)
        self.class_names += names
        return list(range(start, start + len(names)))

    def conditions(self, labels: torch.Tensor, use_class: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.to(self.device)
        drop_class = None if use_class else torch.ones_like(labels, dtype=torch.bool)
        return self.conditioner(labels, drop_class=drop_class)

    # ------------------------------------------------------------------ the network
    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
                      guidance: float | None = None, use_class: bool = True) -> torch.Tensor:
        """eps_theta(x_t, t, c), shape (B, C, H, W); with ``guidance``, the CFG-combined noise.

        x_t: noisy images in model space, shape (B, C, H, W); t: timesteps (B,) or scalar;
        labels: (B,) indices into ``class_names`` (-1 = null).
        """
        t = torch.as_tensor(t, device=x_t.device).long()
        if t.dim() == 0:
            t = t.expand(x_t.shape[0])
        if guidance is None or guidance == 1.0:
            tok, pooled = self.conditions(labels, use_class)
            return self.unet(x_t, t, encoder_hidden_states=tok, class_labels=pooled).sample
        n = x_t.shape[0]
        labels = labels.to(self.device)
        null = torch.full_like(labels, -1)
        tok_c, pooled_c = self.conditions(labels, use_class)
        tok_u, pooled_u = self.conditions(null)
        eps = self.unet(torch.cat([x_t, x_t]), torch.cat([t, t]), encoder_hidden_states=torch.cat([tok_c, tok_u]),
                        class_labels=torch.cat([pooled_c, pooled_u])).sample
        return guided_noise(eps[:n], eps[n:], guidance)

    def diffusion_loss(self, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator,
                       p_uncond: float | None = None, p_drop_class: float | None = None) -> torch.Tensor:
        """The DDPM epsilon loss on a batch; x0 in model space (B, C, H, W); randomness from ``g``."""
        cfg = self.cfg
        b = x0.shape[0]
        p_u = cfg.p_uncond if p_uncond is None else p_uncond
        p_c = cfg.p_drop_class if p_drop_class is None else p_drop_class
        noise = torch.randn(x0.shape, generator=g).to(self.device)
        t = torch.randint(0, self.noise_scheduler.config.num_train_timesteps, (b,), generator=g).to(self.device)
        drop_all = (torch.rand(b, generator=g) < p_u).to(self.device)
        drop_class = (torch.rand(b, generator=g) < p_c).to(self.device) if cfg.cond_mode == "class+name" else None
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        tok, pooled = self.conditioner(labels.to(self.device), drop_class=drop_class, drop_all=drop_all)
        eps = self.unet(x_t, t, encoder_hidden_states=tok, class_labels=pooled).sample
        return F.mse_loss(eps, noise)

    # ------------------------------------------------------------------ training
    def fit(self, dataset, steps: int = 2000, batch_size: int = 64, lr: float = 5e-4, weight_decay: float = 1e-2,
            warmup: int = 100, seed: int = 0, state_path: str | Path | None = None, save_every: int = 200,
            log: Callable[[str], None] | None = None, log_every: int = 100, progress: bool = False,
            log_dir: str | Path | None = None) -> FitResult:
        """Train on ``dataset`` (an ArrayDataset whose labels index ``class_names``) with AdamW and a
        warmup + cosine schedule. Batches are drawn from a generator seeded by (seed, step), so a run
        resumed from ``state_path`` (saved every ``save_every`` steps) matches an uninterrupted one.
        ``progress``: a bar with the ETA; ``log_dir``: TensorBoard events of the loss and learning
        rate per step."""
        from fewgen.checkpoint import load_training_state

        if list(dataset.class_names) != self.class_names[:len(dataset.class_names)]:
            raise FewgenError("the dataset's class names differ from the generator's; build the generator "
                              "with class_names=dataset.class_names")
        params = [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = cosine_schedule(opt, steps, warmup)
        start = 0
        if state_path is not None and Path(state_path).exists():
            start = int(load_training_state(state_path, self.modules(), opt, sched).get("step", 0))
        x_all = to_model_space(dataset.images)
        y_all = dataset.labels
        for m in self.modules().values():
            m.train()
        t0 = time.time()

        def step_loss(step: int) -> torch.Tensor:
            g = make_generator("diffusion-fit", seed, step)
            idx = torch.randint(0, len(x_all), (batch_size,), generator=g)
            return self.diffusion_loss(x_all[idx].to(self.device), y_all[idx], g)

        with TrainingMonitor("[diffusion] training", steps, start=start, log=log, progress=progress,
                             log_dir=log_dir) as monitor:
            losses = run_steps(step_loss, opt, sched, steps, start=start, params=params, max_norm=1.0,
                               monitor=monitor, name="diffusion generator", hint="lower generator.diffusion.lr",
                               after_step=periodic(log, log_every, "[diffusion]", steps, t0, state_path,
                                                   self.modules(), opt, sched, save_every))
        for m in self.modules().values():
            m.eval()
        dt = time.time() - t0
        done = steps - start
        return FitResult(steps, losses, dt, done * batch_size / max(dt, 1e-9))

    # ------------------------------------------------------------------ sampling
    def image_seeds(self, n: int, seed: int) -> list[int]:
        return [seed_hash("pixel-diffusion-sample", seed, i) for i in range(n)]

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, labels: torch.Tensor, timesteps, scheduler, guidance: float,
                use_class: bool = True, precision: str = "float32") -> torch.Tensor:
        ctx = autocast(self.device, precision)
        for t in timesteps:
            with ctx:
                eps = self.predict_noise(scheduler.scale_model_input(x, t), t, labels, guidance, use_class)
            x = scheduler.step(eps.float(), t, x).prev_sample
        return x

    @torch.no_grad()
    def sample(self, labels: torch.Tensor | Sequence[int], seed: int = 0, steps: int = 50, guidance: float = 2.0,
               sampler: str = "ddim", seeds: Sequence[int] | None = None, batch_size: int = 64,
               use_class: bool = True, output: str = "uint8", precision: str = "float32") -> torch.Tensor:
        """Generate one image per label, shape (n, C, H, W): uint8, or float in [-1, 1] with
        ``output="float"``. Image i starts from noise seeded by ``seeds[i]`` (default: derived from
        ``seed`` and i); DDIM (eta 0) and DPM-Solver++ are deterministic after that.
        ``use_class=False`` conditions on the name token only (zero-shot from the class name).
        ``precision``: the UNet's autocast dtype (see :func:`autocast`)."""
        labels = torch.as_tensor(labels, dtype=torch.long)
        self._check_labels(labels)
        if seeds is None:
            seeds = self.image_seeds(len(labels), seed)
        if len(seeds) != len(labels):
            raise FewgenError(f"{len(seeds)} seeds for {len(labels)} labels; give one seed per image")
        if steps < 1 or steps > self.noise_scheduler.config.num_train_timesteps:
            raise FewgenError(f"steps must be in [1, {self.noise_scheduler.config.num_train_timesteps}], got {steps}")
        c, s = self.cfg.channels, self.cfg.image_size
        out = []
        for i in range(0, len(labels), batch_size):
            sch = build_sampler(self.noise_scheduler, sampler)
            sch.set_timesteps(steps)
            x = per_image_noise(seeds[i:i + batch_size], (c, s, s)).to(self.device) * sch.init_noise_sigma
            x = self.denoise(x, labels[i:i + batch_size], sch.timesteps, sch, guidance, use_class, precision)
            out.append(x.cpu())
        x = torch.cat(out) if out else torch.zeros(0, c, s, s)
        return to_uint8(x) if output == "uint8" else x.clamp(-1, 1)

    @torch.no_grad()
    def img2img(self, images: torch.Tensor, labels: torch.Tensor | Sequence[int], strength: float = 0.5,
                steps: int = 50, seed: int = 0, guidance: float = 2.0, sampler: str = "ddim",
                seeds: Sequence[int] | None = None, batch_size: int = 64, output: str = "uint8",
                precision: str = "float32", use_class: bool = True) -> torch.Tensor:
        """SDEdit-style img2img: noise real images (uint8 (n, C, H, W)) to the timestep at
        ``strength`` (0 = unchanged, 1 = pure noise) and denoise with the label's condition
        (``use_class=False``: the name token only, as :meth:`sample`)."""
        if not 0.0 <= strength <= 1.0:
            raise FewgenError(f"strength must be in [0, 1], got {strength}")
        labels = torch.as_tensor(labels, dtype=torch.long)
        self._check_labels(labels)
        if len(images) != len(labels):
            raise FewgenError(f"{len(images)} images but {len(labels)} labels")
        seeds = list(seeds) if seeds is not None else [seed_hash("pixel-diffusion-img2img", seed, i)
                                                       for i in range(len(labels))]
        x0_all = to_model_space(images) if images.dtype == torch.uint8 else images.float()
        out = []
        for i in range(0, len(labels), batch_size):
            sch = build_sampler(self.noise_scheduler, sampler)
            sch.set_timesteps(steps)
            n_run = min(int(round(steps * strength)), steps)
            timesteps = sch.timesteps[steps - n_run:]
            x0 = x0_all[i:i + batch_size].to(self.device)
            if n_run == 0:
                out.append(x0.cpu())
                continue
            if hasattr(sch, "set_begin_index"):
                sch.set_begin_index(steps - n_run)
            noise = per_image_noise(seeds[i:i + batch_size], tuple(x0.shape[1:])).to(self.device)
            x = self.noise_scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(x0)))
            out.append(self.denoise(x, labels[i:i + batch_size], timesteps, sch, guidance, use_class,
                                    precision=precision).cpu())
        x = torch.cat(out)
        return to_uint8(x) if output == "uint8" else x.clamp(-1, 1)

    def _check_labels(self, labels: torch.Tensor) -> None:
        if len(labels) and (labels.max() >= len(self.class_names) or labels.min() < -1):
            raise FewgenError(f"labels must be in [-1, {len(self.class_names) - 1}] (the generator knows "
                              f"{len(self.class_names)} classes), got [{labels.min()}, {labels.max()}]")

    # ------------------------------------------------------------------ the generator protocol
    parallel_sampling = True  # small UNets: in-process streams, each with its own copy, sample faster

    def adapt(self, few_shot, cfg, cache, parts: dict, ctx=None, log: Callable[[str], None] | None = None,
              progress: bool = False, log_dir: str | Path | None = None):
        """DataDream LoRA and class tokens for ``few_shot`` (``fewgen.generators.datadream``), cached
        under ``parts`` in ``cache``; ``progress`` and ``log_dir`` (TensorBoard) as
        :func:`train_datadream`'s."""
        from fewgen.generators.datadream import DataDreamAdapter, cached_adaptation, train_datadream

        if log:
            log(f"DataDream {cfg.mode}: {few_shot.num_classes} classes x {len(few_shot) // few_shot.num_classes} "
                f"shots, {cfg.steps_per_class * few_shot.num_classes} steps in total")
        return cached_adaptation(cache, parts, lambda entry: train_datadream(self, few_shot, cfg, ctx, log, progress, log_dir),
                                 lambda adapter, entry: adapter.save(entry), DataDreamAdapter.load, ctx, log,
                                 f"DataDream {cfg.mode} adapter")

    def synthesis_sample_fn(self, spec, adapter, image_shape, sources=None):
        return pixel_sample_fn(self, spec, adapter, sources)

    # ------------------------------------------------------------------ persistence
    def state_key(self) -> str:
        return self.trained_key or stable_hash({"cfg": dataclasses.asdict(self.cfg), "classes": self.class_names})

    def save(self, folder: str | Path, meta: dict | None = None) -> None:
        """``generator.safetensors`` (UNet + conditions) and ``generator.json`` (config, class names)."""
        save_modules(folder, self.modules(), meta, {"kind": self.file_format, "config": dataclasses.asdict(self.cfg),
                                                    "class_names": self.class_names,
                                                    "n_base_classes": self.conditioner.tables[0].shape[0]})

    @classmethod
    def load(cls, folder: str | Path, device: torch.device | str = "cpu",
             text_encoder_path: str | None = None) -> DiffusionGenerator:
        from fewgen.checkpoint import load_tensors

        folder = Path(folder)
        try:
            info = json.loads((folder / "generator.json").read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise FewgenError(f"cannot read {folder / 'generator.json'} ({e}); delete {folder} to retrain") from None
        cfg = DiffusionConfig(**info["config"])
        tensors, _ = load_tensors(folder / "generator.safetensors")
        n_base = info["n_base_classes"]
        names = info["class_names"]
        te = tensors.get("conditioner.text_embeddings")
        gen = cls(cfg, names[:n_base], device, text_embeddings=None if te is None or te.shape[1] == 0
                  else te[:n_base], text_encoder_path=text_encoder_path)
        n_extra = len([k for k in tensors if k.startswith("conditioner.tables.")]) - 1
        if n_extra:  # re-create added chunks so the state dict matches
            sizes = [tensors[f"conditioner.tables.{i + 1}"].shape[0] for i in range(n_extra)]
            start = n_base
            for sz in sizes:
                gen.conditioner.add_classes(sz, None if te is None or te.shape[1] == 0 else te[start:start + sz])
                start += sz
            gen.class_names = names
        load_modules(gen.modules(), tensors)
        return gen


def pixel_sample_fn(gen, spec, adapter=None, sources: list[torch.Tensor] | None = None):
    """sample_fn(class index, seeds, image indices) for the synthesis cache: the adapted generator
    (class tokens + LoRA) or the base one from class names (zero-shot); from pure noise, or SDEdit
    from ``sources[c]`` (class c's shots, uint8 (K, C, H, W)) when ``spec.strengths`` is set."""
    from fewgen.generators.datadream import AdaptedDiffusion
    from fewgen.synthesis.store import sdedit_or_sample

    if adapter is not None:
        adapted = AdaptedDiffusion(gen, adapter)
        model, labels, use_class = adapted.gen, adapted.labels, True
    else:
        import copy

        if not gen.conditioner.use_name:
            raise FewgenError("zero-shot synthesis needs a name-conditioned generator (generator.diffusion.cond_mode=name or "
                              "class+name); or adapt it first (put 'adapt' before 'synthesize')")
        adapted = None
        model = copy.deepcopy(gen)
        labels, use_class = model.add_classes(spec.class_names), False
    kw = {"steps": spec.steps, "guidance": spec.guidance, "sampler": spec.sampler, "batch_size": spec.chunk,
          "precision": spec.precision, "use_class": use_class}

    def fn(c, seeds, indices):
        if adapted is not None:
            adapted.use(c)
        return sdedit_or_sample(
            spec, None if sources is None else sources[c], seeds, indices,
            sample=lambda s: model.sample([labels[c]] * len(s), seeds=list(s), **kw),
            img2img=lambda x, strength, s: model.img2img(x, [labels[c]] * len(x), strength=strength, seeds=list(s),
                                                          **kw))
    return fn
