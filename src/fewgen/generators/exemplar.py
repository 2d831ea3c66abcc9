"""Exemplar-conditioned pixel diffusion: draw *another* image of the class an exemplar shows.

A generator that never saw a novel class must be told it by the shots. This one is trained on
the base classes only, on pairs (exemplar, target) of two different images of one class (two
drawers of one Omniglot character; never an image with itself), with the DDPM objective::

    L = E || eps - eps_theta(sqrt(abar_t) x_target + sqrt(1 - abar_t) eps, t, c(x_exemplar)) ||^2

so what it learns is how a class varies around one of its images, which carries over to classes
it has not seen. The condition ``c`` (``cond_mode``):

* ``features``: the exemplar's features from the FROZEN pretrained backbone (the one the few-shot
  classifier uses; it separates novel classes), projected by a small MLP to ``n_tokens``
  cross-attention tokens and, pooled, into the UNet's class embedding: an image prompt, as
  IP-Adapter (Ye et al. 2023) feeds CLIP image embeddings to Stable Diffusion;
* ``channels``: the exemplar image concatenated to the noisy input as extra channels (Boutin,
  Fel, Ye, Serre, Tan & Frank, ICML 2023, "Diffusion models as artists");
* ``both``.

In training the exemplar is replaced by the null condition with probability ``p_uncond`` (0.1),
and sampling uses Boutin et al.'s guidance::

    eps = (1 + w) eps(x_t, t, exemplar) - w eps(x_t, t, null)

``w = 0`` is the conditional model; larger ``w`` trades originality for recognisability.
Synthesis starts from pure noise, or from the exemplar itself noised to a strength t0 (SDEdit,
Meng et al. 2022; DA-Fusion, Trabucco et al. 2024, mixes strengths per image).

    gen = ExemplarDiffusion(ExemplarConfig(image_size=28, channels=1), encoder=backbone)
    gen.fit(base_dataset, steps=3000, state_path="state.safetensors")    # resumable
    x = gen.sdedit(shots_uint8, strengths=[0.5] * n, seeds=seeds, steps=20, guidance=0.5)
    gen.save(folder); ExemplarDiffusion.load(folder, encoder=backbone)

Images enter and leave as uint8 (n, C, H, W); the model works on ``x / 127.5 - 1``.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.generators.datadream import AdaptedGenerator
from fewgen.generators.pixels import (
    FitResult,
    PixelUNetConfig,
    PixelUNetOptions,
    autocast,
    build_conditional_unet,
    build_noise_scheduler,
    build_sampler,
    load_modules,
    per_image_noise,
    save_modules,
    to_model_space,
    to_uint8,
)
from fewgen.options import opt
from fewgen.training import TrainingMonitor, cosine_schedule, periodic, run_steps
from fewgen.utils import make_generator, stable_hash

COND_MODES = ("features", "channels", "both")
T_DISTS = ("uniform", "high")


@dataclass
class ExemplarOptions(PixelUNetOptions):
    """Options of the exemplar-conditioned generator (``generator.kind=exemplar``; the config section
    ``generator.exemplar``): its UNet, how it reads the exemplar, and base training on pairs."""

    cond: str = opt("features", "condition on the exemplar's frozen-backbone features as cross-attention tokens "
                    "(features; needs pretrain first), on its pixels as extra input channels (channels), or both",
                    choices=COND_MODES)
    tokens: int = opt(4, "cross-attention tokens made from the exemplar's features", min=1)
    dropout: float = opt(0.1, "probability of the null condition in training (for guidance)", min=0, max=1)
    t_dist: str = opt("uniform", "training timesteps uniform, or high (more weight on the noisy steps, where the "
                      "condition decides the image)", choices=T_DISTS)
    aug: float = opt(0.0, "strength of a random affine distortion of the exemplar only, in training (0 = off)", min=0)
    pair_aug: float = opt(0.0, "strength of one random affine distortion applied to both images of a training pair "
                          "(0 = off)", min=0)
    rotations: bool = opt(False, "also train on the 90/180/270-degree rotations of the base classes (each a class of "
                          "its own)")


@dataclass
class ExemplarConfig(PixelUNetConfig):
    """Architecture, conditioning and training noise of the exemplar-conditioned model."""

    cond_mode: str = "features"
    n_tokens: int = 4
    feat_dim: int = 64
    t_dist: str = "uniform"
    exemplar_aug: float = 0.0
    pair_aug: float = 0.0
    rotations: bool = False

    def __post_init__(self) -> None:
        if self.cond_mode not in COND_MODES:
            raise FewgenError(f"exemplar cond_mode {self.cond_mode!r} is not one of {', '.join(COND_MODES)}")
        if self.t_dist not in T_DISTS:
            raise FewgenError(f"exemplar t_dist {self.t_dist!r} is not one of {', '.join(T_DISTS)}")
        super().__post_init__()

    @property
    def uses_features(self) -> bool:
        return self.cond_mode in ("features", "both")

    @property
    def uses_channels(self) -> bool:
        return self.cond_mode in ("channels", "both")


def build_unet(cfg: ExemplarConfig):
    """The diffusers ``UNet2DConditionModel``: cross-attention on the exemplar tokens, their pooled
    vector added to the time embedding, and (``channels``) the exemplar as extra input channels."""
    return build_conditional_unet(cfg, cfg.channels * (2 if cfg.uses_channels else 1), cfg.cond_dim)


def exemplar_guidance(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """Boutin et al.'s guidance: (1 + w) eps_c - w eps_u; w = 0 is the conditional model."""
    return (1.0 + w) * eps_cond - w * eps_uncond


def random_affine(x: torch.Tensor, strength: float, g: torch.Generator) -> torch.Tensor:
    """A random affine distortion of each image (model space, (B, C, H, W), background -1), drawn
    from ``g``: rotation +-15s degrees, scale 1 +- 0.15s, shear +-10s degrees, shift +-0.1s."""
    b = x.shape[0]

    def u() -> torch.Tensor:
        return torch.rand(b, generator=g) * 2 - 1

    ang, sc, sh = u() * math.radians(15) * strength, 1 + u() * 0.15 * strength, u() * math.radians(10) * strength
    tx, ty = u() * 0.2 * strength, u() * 0.2 * strength
    cos, sin = torch.cos(ang), torch.sin(ang)
    theta = torch.stack([torch.stack([cos / sc, (-sin + torch.tan(sh) * cos) / sc, tx], 1),
                         torch.stack([sin / sc, (cos + torch.tan(sh) * sin) / sc, ty], 1)], 1)
    grid = F.affine_grid(theta.to(x), list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def pair_indices(labels: torch.Tensor, batch_size: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(exemplar, target) indices into a dataset: for each pair a random class with at least two
    images, then two *different* images of it. Raises when no class has two images."""
    order = labels.argsort(stable=True)
    groups = [ix for ix in order.split(torch.bincount(labels).tolist()) if len(ix) >= 2]
    if not groups:
        raise FewgenError("exemplar pairs need a class with at least two images; every base class has one")
    cls = torch.randint(0, len(groups), (batch_size,), generator=g).tolist()
    ex, tg = [], []
    for c in cls:
        two = groups[c][torch.randperm(len(groups[c]), generator=g)[:2]]
        ex.append(two[0])
        tg.append(two[1])
    return torch.stack(ex), torch.stack(tg)


class ExemplarConditioner(nn.Module):
    """Exemplar features -> (tokens (B, T, D), pooled (B, D)), with learned null tokens.

    With ``cond_mode=channels`` the tokens are the (learned) null tokens always: the exemplar
    reaches the UNet through its input channels only.
    """

    def __init__(self, cfg: ExemplarConfig):
        super().__init__()
        self.cfg = cfg
        d, t = cfg.cond_dim, cfg.n_tokens
        self.tokens = nn.Sequential(nn.Linear(cfg.feat_dim, 256), nn.SiLU(), nn.Linear(256, t * d))
        self.pooled = nn.Sequential(nn.Linear(cfg.feat_dim, 256), nn.SiLU(), nn.Linear(256, d))
        self.null_tokens = nn.Parameter(torch.zeros(1, t, d))
        self.null_pooled = nn.Parameter(torch.zeros(1, d))

    def forward(self, feats: torch.Tensor | None, null: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """feats (B, F) encoder features (or None for ``channels``); null (B,) bool."""
        b = null.shape[0]
        if not self.cfg.uses_features:
            return self.null_tokens.expand(b, -1, -1), self.null_pooled.expand(b, -1)
        f = F.normalize(feats.float(), dim=-1) * math.sqrt(self.cfg.feat_dim)
        tok = self.tokens(f).view(b, self.cfg.n_tokens, self.cfg.cond_dim)
        pooled = self.pooled(f)
        tok = torch.where(null[:, None, None], self.null_tokens.expand_as(tok), tok)
        pooled = torch.where(null[:, None], self.null_pooled.expand_as(pooled), pooled)
        return tok, pooled


class ExemplarDiffusion:
    """Pixel diffusion conditioned on an exemplar image (module docstring)."""

    kind = "exemplar"  # generator.kind (fewgen.generators.registry)
    file_format = "exemplar-diffusion"  # generator.json's "kind", and part of an untrained model's state_key

    @classmethod
    def from_options(cls, g: ExemplarOptions, base, encoder: nn.Module | None = None,
                     device: torch.device | str = "cpu") -> ExemplarDiffusion:
        """An untrained generator of options ``g`` for images shaped as ``base``'s, reading exemplars
        through ``encoder`` (features/both)."""
        from fewgen.generators.diffusion import norm_groups

        c, s = base.image_shape[0], base.image_shape[1]
        g.check_shape(s, "generator.exemplar")
        feat_dim = getattr(encoder, "num_features", 0) if encoder is not None else g.cond_dim
        cfg = ExemplarConfig(image_size=s, channels=c, block_out_channels=list(g.block_out_channels),
                             attention_levels=list(g.attention_levels), norm_num_groups=norm_groups(g.block_out_channels),
                             cond_mode=g.cond, cond_dim=g.cond_dim, n_tokens=g.tokens, feat_dim=feat_dim,
                             p_uncond=g.dropout, t_dist=g.t_dist, exemplar_aug=g.aug, pair_aug=g.pair_aug,
                             rotations=g.rotations)
        return cls(cfg, encoder, device)

    @classmethod
    def load_trained(cls, folder: str | Path, encoder: nn.Module | None = None,
                     device: torch.device | str = "cpu") -> ExemplarDiffusion:
        return cls.load(folder, encoder, device)

    def __init__(self, cfg: ExemplarConfig, encoder: nn.Module | None = None, device: torch.device | str = "cpu"):
        if cfg.uses_features and encoder is None:
            raise FewgenError("exemplar cond_mode features/both needs the pretrained backbone as its encoder")
        self.cfg = cfg
        self.device = torch.device(device)
        self.encoder = None
        if encoder is not None and cfg.uses_features:
            self.encoder = copy.deepcopy(encoder).to(self.device).eval().requires_grad_(False)
            if getattr(self.encoder, "num_features", cfg.feat_dim) != cfg.feat_dim:
                raise FewgenError(f"the encoder gives {self.encoder.num_features}-d features but feat_dim is "
                                  f"{cfg.feat_dim}")
        self.unet = build_unet(cfg).to(self.device)
        self.conditioner = ExemplarConditioner(cfg).to(self.device)
        self.noise_scheduler = build_noise_scheduler(cfg)
        self.trained_key: str | None = None  # content key of the weights, set by the caller / cache

    def modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "conditioner": self.conditioner}

    def num_parameters(self) -> int:
        return sum(p.numel() for m in self.modules().values() for p in m.parameters())

    # ------------------------------------------------------------------ the network
    @torch.no_grad()
    def encode(self, exemplars: torch.Tensor) -> torch.Tensor | None:
        """Frozen-backbone features (B, F) of exemplars in model space, or None (``channels``)."""
        if not self.cfg.uses_features:
            return None
        return self.encoder.forward_features((exemplars.to(self.device) + 1) / 2).float()

    def _eps(self, x_t: torch.Tensor, t: torch.Tensor, exemplars: torch.Tensor, feats: torch.Tensor | None,
             null: torch.Tensor) -> torch.Tensor:
        tok, pooled = self.conditioner(feats, null)
        x_in = x_t
        if self.cfg.uses_channels:
            ex = torch.where(null[:, None, None, None], torch.zeros_like(exemplars), exemplars)
            x_in = torch.cat([x_t, ex], 1)
        return self.unet(x_in, t, encoder_hidden_states=tok, class_labels=pooled).sample

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, exemplars: torch.Tensor,
                      feats: torch.Tensor | None = None, guidance: float | None = None) -> torch.Tensor:
        """eps_theta(x_t, t, exemplar) (B, C, H, W); with ``guidance`` w, (1 + w) eps_c - w eps_u.

        x_t and exemplars in model space (B, C, H, W); feats: the exemplars' features (default: encoded).
        """
        b = x_t.shape[0]
        t = torch.as_tensor(t, device=x_t.device).long()
        if t.dim() == 0:
            t = t.expand(b)
        if feats is None:
            feats = self.encode(exemplars)
        cond = torch.zeros(b, dtype=torch.bool, device=x_t.device)
        if guidance is None or guidance == 0.0:
            return self._eps(x_t, t, exemplars, feats, cond)
        two = (lambda a: None if a is None else torch.cat([a, a]))  # noqa: E731
        eps = self._eps(torch.cat([x_t, x_t]), torch.cat([t, t]), two(exemplars), two(feats), torch.cat([cond, ~cond]))
        return exemplar_guidance(eps[:b], eps[b:], guidance)

    def pair_batch(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int,
                   g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A training batch (exemplar, target) in model space: two different images of one class,
        with the config's rotations (both images alike) and augmentations."""
        cfg = self.cfg
        ex_i, tg_i = pair_indices(labels, batch_size, g)
        ex, tg = to_model_space(images[ex_i]), to_model_space(images[tg_i])
        if cfg.rotations:  # a rotated character is another character, drawn by the same hands
            k = torch.randint(0, 4, (batch_size,), generator=g)
            for r in (1, 2, 3):
                m = k == r
                ex[m], tg[m] = torch.rot90(ex[m], r, (2, 3)), torch.rot90(tg[m], r, (2, 3))
        if cfg.pair_aug > 0:
            state = g.get_state()
            ex = random_affine(ex, cfg.pair_aug, g)
            g.set_state(state)
            tg = random_affine(tg, cfg.pair_aug, g)
        if cfg.exemplar_aug > 0:
            ex = random_affine(ex, cfg.exemplar_aug, g)
        return ex, tg

    def _timesteps(self, b: int, g: torch.Generator) -> torch.Tensor:
        T = self.noise_scheduler.config.num_train_timesteps
        if self.cfg.t_dist == "high":  # more weight where the condition decides the image
            return (torch.rand(b, generator=g).sqrt() * T).long().clamp_max(T - 1)
        return torch.randint(0, T, (b,), generator=g)

    def diffusion_loss(self, exemplars: torch.Tensor, targets: torch.Tensor, g: torch.Generator,
                       p_uncond: float | None = None) -> torch.Tensor:
        """The DDPM epsilon loss of denoising ``targets`` given ``exemplars`` (model space)."""
        b = targets.shape[0]
        p = self.cfg.p_uncond if p_uncond is None else p_uncond
        noise = torch.randn(targets.shape, generator=g).to(self.device)
        t = self._timesteps(b, g).to(self.device)
        null = (torch.rand(b, generator=g) < p).to(self.device)
        targets, exemplars = targets.to(self.device), exemplars.to(self.device)
        x_t = self.noise_scheduler.add_noise(targets, noise, t)
        return F.mse_loss(self._eps(x_t, t, exemplars, self.encode(exemplars), null), noise)

    # ------------------------------------------------------------------ training
    def fit(self, dataset: ArrayDataset, steps: int = 3000, batch_size: int = 64, lr: float = 1e-3,
            weight_decay: float = 1e-2, warmup: int = 100, seed: int = 0, state_path: str | Path | None = None,
            save_every: int = 200, log: Callable[[str], None] | None = None, log_every: int = 100,
            progress: bool = False, log_dir: str | Path | None = None) -> FitResult:
        """Train on the pairs of ``dataset`` (base classes) with AdamW, warmup + cosine. Batches come
        from a generator seeded by (seed, step), so a run resumed from ``state_path`` (saved every
        ``save_every`` steps) matches an uninterrupted one. ``progress``: a bar with the ETA;
        ``log_dir``: TensorBoard events of the loss and learning rate per step."""
        from fewgen.checkpoint import load_training_state

        if dataset.image_shape != (self.cfg.channels, self.cfg.image_size, self.cfg.image_size):
            raise FewgenError(f"the generator draws {self.cfg.channels}x{self.cfg.image_size}x{self.cfg.image_size} "
                              f"images but the dataset's are {dataset.image_shape}")
        params = [p for m in self.modules().values() for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        sched = cosine_schedule(opt, steps, warmup)
        start = 0
        if state_path is not None and Path(state_path).exists():
            start = int(load_training_state(state_path, self.modules(), opt, sched).get("step", 0))
        for m in self.modules().values():
            m.train()
        t0 = time.time()

        def step_loss(step: int) -> torch.Tensor:
            g = make_generator("exemplar-fit", seed, step)
            ex, tg = self.pair_batch(dataset.images, dataset.labels, batch_size, g)
            return self.diffusion_loss(ex, tg, g)

        with TrainingMonitor("[exemplar] training", steps, start=start, log=log, progress=progress,
                             log_dir=log_dir) as monitor:
            losses = run_steps(step_loss, opt, sched, steps, start=start, params=params, max_norm=1.0,
                               monitor=monitor, name="exemplar generator", hint="lower generator.exemplar.lr",
                               after_step=periodic(log, log_every, "[exemplar]", steps, t0, state_path,
                                                   self.modules(), opt, sched, save_every))
        for m in self.modules().values():
            m.eval()
        dt = time.time() - t0
        return FitResult(steps, losses, dt, (steps - start) * batch_size / max(dt, 1e-9))

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def sdedit(self, exemplars: torch.Tensor, strengths: float | Sequence[float], seeds: Sequence[int],
               steps: int = 20, guidance: float = 0.0, sampler: str = "dpmsolver++-full",
               precision: str = "float32", batch_size: int = 64, feats: torch.Tensor | None = None,
               sources: torch.Tensor | None = None) -> torch.Tensor:
        """One image per exemplar (uint8 (n, C, H, W)), conditioned on it.

        Image i starts from ``sources[i]`` (default: the exemplar) noised to ``strengths[i]`` of the
        ``steps``-step schedule (1 = pure noise seeded by ``seeds[i]``; 0 = the source unchanged);
        images of one strength run together. ``feats`` replaces the exemplars' encoded features
        (e.g. the mean feature of a class's shots). Image i depends only on its own inputs.
        """
        n = len(exemplars)
        if len(seeds) != n:
            raise FewgenError(f"{len(seeds)} seeds for {n} exemplars; give one seed per image")
        strengths = [float(strengths)] * n if isinstance(strengths, int | float) else [float(s) for s in strengths]
        if len(strengths) != n or any(not 0.0 <= s <= 1.0 for s in strengths):
            raise FewgenError("give one strength in [0, 1] per exemplar")
        if steps < 1:
            raise FewgenError(f"steps must be at least 1, got {steps}")
        sources = exemplars if sources is None else sources
        out = torch.empty(n, self.cfg.channels, self.cfg.image_size, self.cfg.image_size, dtype=torch.uint8)
        for s in sorted(set(strengths)):
            chosen = [i for i in range(n) if strengths[i] == s]
            for j in range(0, len(chosen), batch_size):
                idx = torch.tensor(chosen[j:j + batch_size])
                out[idx] = self._sdedit_batch(exemplars[idx], sources[idx], s, [seeds[i] for i in idx.tolist()],
                                              steps, guidance, sampler, precision,
                                              None if feats is None else feats[idx])
        return out

    def _sdedit_batch(self, exemplars, sources, strength, seeds, steps, guidance, sampler, precision, feats):
        ex = to_model_space(exemplars).to(self.device)
        x0 = to_model_space(sources).to(self.device)
        n_run = steps if strength >= 1.0 else int(round(steps * strength))
        if n_run == 0:
            return to_uint8(x0.cpu())
        sch = build_sampler(self.noise_scheduler, sampler)
        sch.set_timesteps(steps)
        timesteps = sch.timesteps[steps - n_run:]
        noise = per_image_noise(seeds, tuple(x0.shape[1:])).to(self.device)
        if strength >= 1.0:
            x = noise * sch.init_noise_sigma
        else:
            if hasattr(sch, "set_begin_index"):
                sch.set_begin_index(steps - n_run)
            x = self.noise_scheduler.add_noise(x0, noise, timesteps[:1].repeat(len(x0)))
        feats = self.encode(ex) if feats is None else feats.to(self.device)
        ctx = autocast(self.device, precision)
        for t in timesteps:
            with ctx:
                eps = self.predict_noise(sch.scale_model_input(x, t), t, ex, feats, guidance)
            x = sch.step(eps.float(), t, x).prev_sample
        return to_uint8(x.cpu())

    def sample(self, exemplars: torch.Tensor, seeds: Sequence[int], **kw) -> torch.Tensor:
        """One image per exemplar from pure noise (:meth:`sdedit` at strength 1)."""
        return self.sdedit(exemplars, 1.0, seeds, **kw)

    # ------------------------------------------------------------------ the generator protocol
    parallel_sampling = True

    def adapt(self, few_shot: ArrayDataset, cfg, cache, parts: dict, ctx=None,
              log: Callable[[str], None] | None = None, progress: bool = False, log_dir: str | Path | None = None):
        """DataDream's LoRA fitted to ``few_shot`` (:func:`train_exemplar_datadream`), cached under
        ``parts`` in ``cache``; ``progress`` (a bar with the ETA) and ``log_dir`` (TensorBoard events of
        the loss) while it trains."""
        from fewgen.generators.datadream import DataDreamAdapter, cached_adaptation

        return cached_adaptation(cache, parts,
                                 lambda entry: train_exemplar_datadream(self, few_shot, cfg, ctx, log, progress, log_dir),
                                 lambda adapter, entry: adapter.save(entry), DataDreamAdapter.load, ctx, log,
                                 f"exemplar DataDream {cfg.mode} adapter")

    def synthesis_sample_fn(self, spec, adapter, image_shape, sources=None):
        return exemplar_sample_fn(self, spec, adapter, sources)

    # ------------------------------------------------------------------ persistence
    def state_key(self) -> str:
        return self.trained_key or stable_hash({"cfg": dataclasses.asdict(self.cfg), "kind": self.file_format})

    def save(self, folder: str | Path, meta: dict | None = None) -> None:
        """``generator.safetensors`` (UNet + conditioner) and ``generator.json`` (config); the
        encoder is the pretrained backbone, cached on its own."""
        save_modules(folder, self.modules(), meta, {"kind": self.file_format, "config": dataclasses.asdict(self.cfg)})

    @classmethod
    def load(cls, folder: str | Path, encoder: nn.Module | None = None,
             device: torch.device | str = "cpu") -> ExemplarDiffusion:
        from fewgen.checkpoint import load_tensors
        from fewgen.utils import read_json

        folder = Path(folder)
        info = read_json(folder / "generator.json")
        if info.get("kind") != cls.file_format:
            raise FewgenError(f"{folder} holds a {info.get('kind')!r} generator, not an exemplar-conditioned one")
        gen = cls(ExemplarConfig(**info["config"]), encoder, device)
        tensors, _ = load_tensors(folder / "generator.safetensors")
        load_modules(gen.modules(), tensors)
        return gen


# ----------------------------------------------------------------------------- DataDream on top


def train_exemplar_datadream(base: ExemplarDiffusion, few_shot: ArrayDataset, cfg, ctx=None,
                             log: Callable[[str], None] | None = None, progress: bool = False,
                             log_dir: str | Path | None = None):
    """DataDream's LoRA (``fewgen.generators.datadream``) on the exemplar generator, fitted to the
    few-shot set: each step conditions on a shot and denoises an augmented copy of a shot of the
    same class (the same one when K = 1). ``dset`` trains one adapter on all classes for
    ``classes x steps_per_class`` steps, ``cls`` one per class (sharded over processes). Returns a
    :class:`~fewgen.generators.datadream.DataDreamAdapter` (no class tokens: the exemplar is the
    condition). The base generator is not modified."""
    from fewgen.generators.datadream import (
        DataDreamAdapter,
        adapter_steps,
        init_lora_state,
        inject_lora,
        lora_state,
        run_datadream,
        set_lora_state,
    )

    names = list(few_shot.class_names)
    groups = few_shot.indices_by_class()
    if any(len(ix) == 0 for ix in groups):
        raise FewgenError("every novel class needs at least one shot to adapt the exemplar generator")
    gen = copy.deepcopy(base)
    inject_lora(gen, cfg)

    def train(classes: list[int], name: str, steps: int, monitor) -> tuple[dict, list[float]]:
        set_lora_state(gen.unet, init_lora_state(gen.unet, make_generator("exemplar-datadream-init", cfg.seed, name),
                                                 cfg.rank))
        params = [p for n, p in gen.unet.named_parameters() if "lora_" in n]
        for p in params:
            p.requires_grad_(True)
        gen.unet.train()

        def step_loss(step: int) -> torch.Tensor:
            g = make_generator("exemplar-datadream", cfg.seed, name, step)
            cls = torch.tensor(classes)[torch.randint(0, len(classes), (cfg.batch_size,), generator=g)].tolist()
            ex = to_model_space(few_shot.images[_one_shot_each(groups, cls, g)])
            tg = random_affine(to_model_space(few_shot.images[_one_shot_each(groups, cls, g)]), 1.0, g)
            return gen.diffusion_loss(ex, tg, g, p_uncond=cfg.p_uncond)

        losses = adapter_steps(step_loss, params, cfg, steps, monitor)
        gen.unet.eval()
        for p in params:
            p.requires_grad_(False)
        return lora_state(gen.unet), losses

    loras, history = run_datadream(names, cfg, train, ctx, log, progress, log_dir, "exemplar datadream")
    return DataDreamAdapter(cfg, names, loras, torch.zeros(len(names), 0), base.state_key(), history)


def _one_shot_each(groups: list[torch.Tensor], classes: list[int], g: torch.Generator) -> torch.Tensor:
    """A random image index of each class in ``classes`` (``groups[c]``: class c's indices)."""
    return torch.stack([groups[c][torch.randint(0, len(groups[c]), (1,), generator=g)][0] for c in classes])


class AdaptedExemplar(AdaptedGenerator):
    """An exemplar generator with a DataDream adapter's LoRA loaded (``use(c)`` switches to class c's
    for ``cls`` adapters); draws as :meth:`ExemplarDiffusion.sdedit`."""

    def sdedit(self, *args, **kw) -> torch.Tensor:
        return self.gen.sdedit(*args, **kw)


def exemplar_sample_fn(gen, spec, adapter=None, sources: list[torch.Tensor] | None = None):
    """sample_fn(class index, seeds, image indices) of an exemplar generator: image i of class c is
    conditioned on its shot ``sources[c][i mod K]`` (or, ``exemplar_condition=mean``, on the mean
    feature of the class's shots) and starts from pure noise or, with ``spec.strengths``, from
    that shot noised to its strength (SDEdit)."""
    if sources is None:
        raise FewgenError("the exemplar generator draws from the shots: give each class's shots")
    import copy

    model = copy.deepcopy(gen) if adapter is None else AdaptedExemplar(gen, adapter)  # one copy per stream
    mean = spec.extra.get("exemplar_condition") == "mean"

    def fn(c, seeds, indices):
        if adapter is not None:
            model.use(c)
        shots = sources[c]
        starts = [spec.start(i, len(shots)) for i in indices]
        exemplars = shots[torch.tensor([j for j, _ in starts])]
        feats = None
        if mean and gen.cfg.uses_features:
            feats = model.gen.encode(to_model_space(shots)) if adapter is not None else model.encode(to_model_space(shots))
            feats = feats.mean(0, keepdim=True).expand(len(seeds), -1)
        return model.sdedit(exemplars, [1.0 if s is None else s for _, s in starts], list(seeds), steps=spec.steps,
                            guidance=spec.guidance, sampler=spec.sampler, precision=spec.precision,
                            batch_size=spec.chunk, feats=feats)
    return fn
