"""A small GAN this machine can train, its source pretraining, and the few-shot adaptation loop.

Generator: ProGAN/DCGAN-style (Karras et al. 2018; Radford et al. 2016) with an optional
mapping network: ``z -> [MLP] -> 4x4 -> (upsample, conv, conv) per resolution -> tanh``,
pixel-norm instead of batch-norm so every sample's features depend on its own ``z`` only
(CDC and DCL compare features of the same ``z`` through two generators). The discriminator
mirrors it and exposes the feature map after each block (``features``) plus a patch head
(CDC's patch-level discriminator). Loss: non-saturating GAN loss (Goodfellow et al. 2014)

    L_D = softplus(-D(x)) + softplus(D(G(z)))      L_G = softplus(-D(G(z)))

with a lazy R1 penalty ``gamma/2 * |grad_x D(x)|^2`` on real images (Mescheder et al. 2018).

Adaptation methods (``GAN_METHODS``, one file each: freezed.py, cdc.py, dcl.py) provide the
discriminator and generator losses of one step; :func:`adapt_gan` runs them from the same
source checkpoint, tracks metrics every K iterations, and checkpoints resumably.

Images given to this module are uint8 (n, C, H, W); the networks see floats in [-1, 1].
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.checkpoint import load_training_state, save_training_state
from fewgen.errors import FewgenError
from fewgen.options import opt
from fewgen.registry import Registry
from fewgen.training import TrainingMonitor, run_steps

GAN_METHODS: Registry = Registry("GAN adaptation method")


# ----------------------------------------------------------------------------- networks


class PixelNorm(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.square().mean(1, keepdim=True) + 1e-8)


@dataclass
class GANShape:
    """The shape of a GAN as its options give it (the config section ``gan.arch``); the channels
    follow the images (:meth:`for_channels`)."""

    image_size: int = opt(32, "GAN resolution: 8, 16, 32 or 64 (images are resized)", choices=(8, 16, 32, 64))
    z_dim: int = opt(64, "latent size", min=1)
    width: int = opt(16, "channel width (4 x width at 4x4, halving per resolution)", min=1)
    mapping_layers: int = opt(0, "layers of the optional mapping network", min=0)

    def for_channels(self, channels: int) -> GANArch:
        return GANArch(**asdict(self), channels=channels)


@dataclass
class GANArch(GANShape):
    """The shape of a GAN for images of ``channels`` channels; part of every cache key."""

    channels: int = 1

    def widths(self) -> list[int]:
        """Channels at resolutions 4, 8, ..., image_size."""
        n_up = int(round(math.log2(self.image_size / 4)))
        if n_up < 1 or 4 * 2**n_up != self.image_size:
            raise FewgenError(f"GAN image_size must be 4 * 2^k >= 8 (8, 16, 32, 64), got {self.image_size}")
        return [max(self.width * 4 // 2**i, 8) for i in range(n_up + 1)]


class Generator(nn.Module):
    """z (B, z_dim) -> images (B, C, H, W) in [-1, 1]; ``return_features`` adds the map of each block."""

    def __init__(self, arch: GANArch):
        super().__init__()
        self.arch = arch
        w = arch.widths()
        layers: list[nn.Module] = [PixelNorm()]
        for _ in range(arch.mapping_layers):
            layers += [nn.Linear(arch.z_dim, arch.z_dim), nn.LeakyReLU(0.2)]
        self.mapping = nn.Sequential(*layers)
        self.fc = nn.Linear(arch.z_dim, w[0] * 16)
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Upsample(scale_factor=2, mode="nearest"),
                nn.Conv2d(w[i], w[i + 1], 3, padding=1), nn.LeakyReLU(0.2), PixelNorm(),
                nn.Conv2d(w[i + 1], w[i + 1], 3, padding=1), nn.LeakyReLU(0.2), PixelNorm(),
            )
            for i in range(len(w) - 1)
        )
        self.to_image = nn.Conv2d(w[-1], arch.channels, 3, padding=1)

    @property
    def num_feature_layers(self) -> int:
        return len(self.blocks) + 1

    def forward(self, z: torch.Tensor, return_features: bool = False):
        h = F.leaky_relu(self.fc(self.mapping(z)), 0.2).view(z.shape[0], -1, 4, 4)
        h = h * torch.rsqrt(h.square().mean(1, keepdim=True) + 1e-8)
        feats = [h]
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        img = torch.tanh(self.to_image(h))
        return (img, feats) if return_features else img


class Discriminator(nn.Module):
    """images (B, C, H, W) in [-1, 1] -> logits (B,); ``features(x)`` gives the map after each block."""

    def __init__(self, arch: GANArch):
        super().__init__()
        self.arch = arch
        w = arch.widths()[::-1]  # image_size ... 4
        self.from_image = nn.Sequential(nn.Conv2d(arch.channels, w[0], 1), nn.LeakyReLU(0.2))
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(w[i], w[i], 3, padding=1), nn.LeakyReLU(0.2),
                nn.Conv2d(w[i], w[i + 1], 3, padding=1), nn.LeakyReLU(0.2),
                nn.AvgPool2d(2),
            )
            for i in range(len(w) - 1)
        )
        self.final = nn.Sequential(nn.Conv2d(w[-1], w[-1], 3, padding=1), nn.LeakyReLU(0.2), nn.Flatten(),
                                   nn.Linear(w[-1] * 16, 1))
        # CDC's patch-level discriminator: logits per location of the first block's map
        self.patch_head = nn.Conv2d(w[1], 1, 1)

    def layers(self) -> list[nn.Module]:
        """In input-to-output order: from_image, blocks..., final (FreezeD freezes a prefix)."""
        return [self.from_image, *self.blocks, self.final]

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Maps after each block, (B, C_l, H_l, W_l), input side first."""
        h = self.from_image(x)
        feats = []
        for block in self.blocks:
            h = block(h)
            feats.append(h)
        return feats

    def forward(self, x: torch.Tensor, return_features: bool = False):
        feats = self.features(x)
        logits = self.final(feats[-1]).squeeze(1)
        return (logits, feats) if return_features else logits

    def patch_logits(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """(B, h*w) patch logits from the maps ``features`` returned."""
        return self.patch_head(feats[0]).flatten(1)


# ----------------------------------------------------------------------------- losses


def ns_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating discriminator loss: mean softplus(-D(x)) + mean softplus(D(G(z)))."""
    return F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()


def ns_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss: mean softplus(-D(G(z)))."""
    return F.softplus(-fake_logits).mean()


def r1_penalty(discriminator: nn.Module, real: torch.Tensor) -> torch.Tensor:
    """mean |grad_x D(x)|^2 on real images (Mescheder et al. 2018), (B, C, H, W) -> scalar."""
    real = real.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(discriminator(real).sum(), real, create_graph=True)
    return grad.square().flatten(1).sum(1).mean()


def to_gan_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W) -> float in [-1, 1]."""
    return images.float().div(127.5).sub(1.0)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] floats -> uint8 images, on the CPU."""
    from fewgen.data.images import signed_to_uint8

    return signed_to_uint8(x.detach()).cpu()


@torch.no_grad()
def sample(generator: Generator, n: int, seed: int, batch_size: int = 256, device: torch.device | str = "cpu") -> torch.Tensor:
    """n uint8 images from seeded latents (the same seed gives the same z for every generator)."""
    was = generator.training
    generator.eval()
    z = torch.randn(n, generator.arch.z_dim, generator=torch.Generator().manual_seed(seed))
    out = torch.cat([to_uint8(generator(chunk.to(device))) for chunk in torch.split(z, batch_size)])
    generator.train(was)
    return out


# ----------------------------------------------------------------------------- source pretraining


@dataclass
class GANOptimiser:
    """The optimiser and R1 regularisation options both GAN stages share (each stage its own values)."""

    lr: float = opt(2e-3, "Adam learning rate", gt=0)
    beta1: float = opt(0.0, "Adam beta1", min=0, max=0.999)
    beta2: float = opt(0.99, "Adam beta2", min=0, max=0.9999)
    r1_gamma: float = opt(1.0, "R1 penalty weight (lazy, every r1_every iterations)", min=0)
    r1_every: int = opt(4, "iterations between R1 penalties", min=1)


@dataclass
class GANTrainSettings(GANOptimiser):
    """How the source GAN is trained: the config section ``gan.source``."""

    iters: int = opt(2000, "source GAN iterations", min=1)
    batch_size: int = opt(32, "source GAN batch size", min=1)
    ema_decay: float = opt(0.995, "decay of the generator's moving average (the source GAN is the average)",
                           min=0, max=1)
    checkpoint_every: int = opt(250, "iterations between resumable checkpoints and history records", min=1)
    seed: int = opt(0, "seed of the source GAN pretraining (one source GAN serves every shot draw)")


@dataclass
class SourceGAN:
    generator: Generator  # the EMA generator: what adaptation starts from and what samples come from
    discriminator: Discriminator
    key: str
    path: Path | None
    history: list[dict] = field(default_factory=list)


def _d_step(D: Discriminator, opt: torch.optim.Optimizer, loss: torch.Tensor, real: torch.Tensor, step: int,
            settings: GANTrainSettings | AdaptSettings) -> float:
    """One discriminator update, with the lazy R1 penalty every ``r1_every`` steps (``r1_gamma``,
    ``r1_every`` of the source training's or the adaptation's settings)."""
    opt.zero_grad(set_to_none=True)
    total = loss
    if settings.r1_gamma > 0 and step % settings.r1_every == 0:
        total = total + 0.5 * settings.r1_gamma * settings.r1_every * r1_penalty(D, real)
    total.backward()
    opt.step()
    return float(loss.detach())


def train_source_gan(images: torch.Tensor, arch: GANArch, settings: GANTrainSettings, entry: Path | None = None,
                     log: Callable[[str], None] = print, device: torch.device | str = "cpu", progress: bool = False,
                     log_dir: str | Path | None = None) -> SourceGAN:
    """Pretrain G and D on source images (uint8 (n, C, H, W)) with the non-saturating loss.

    With ``entry`` (a cache folder), checkpoints every ``checkpoint_every`` iterations to
    ``entry/state.safetensors`` and resumes from it; the final EMA generator and D are
    saved as ``generator.safetensors`` / ``discriminator.safetensors``. ``progress``: a bar with
    the ETA; ``log_dir``: TensorBoard events of ``loss/d`` and ``loss/g`` per iteration.
    """
    if tuple(images.shape[1:]) != (arch.channels, arch.image_size, arch.image_size):
        raise FewgenError(f"source images are {tuple(images.shape[1:])}, the GAN expects "
                          f"({arch.channels}, {arch.image_size}, {arch.image_size}); set gan.arch.image_size")
    torch.manual_seed(settings.seed)
    G, D = Generator(arch).to(device), Discriminator(arch).to(device)
    G_ema = copy.deepcopy(G).requires_grad_(False)
    opt_g = torch.optim.Adam(G.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2))
    opt_d = torch.optim.Adam(D.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2))
    modules = {"G": G, "D": D, "G_ema": G_ema}
    optims = {"G": opt_g, "D": opt_d}
    start, history = 0, []
    state_path = entry / "state.safetensors" if entry is not None else None
    if state_path is not None and state_path.exists():
        extra = load_training_state(state_path, modules, optimizers=optims)
        start, history = extra["step"], extra["history"]
        log(f"resuming source GAN at iteration {start}")
    real_all = to_gan_range(images)
    n = len(real_all)
    t0, acc = time.time(), {"d": 0.0, "g": 0.0, "count": 0}
    monitor = TrainingMonitor("source GAN", settings.iters, start=start, log=log, progress=progress, log_dir=log_dir,
                              unit="iteration")
    d_loss = 0.0

    def step_loss(step: int) -> torch.Tensor:
        """The discriminator's update, then the generator's loss (the core's optimiser step)."""
        nonlocal d_loss
        g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)  # per-step stream: resumable
        real = real_all[torch.randint(0, n, (settings.batch_size,), generator=g)].to(device)
        z = torch.randn(settings.batch_size, arch.z_dim, generator=g).to(device)
        with torch.no_grad():
            fake = G(z)
        d_loss = _d_step(D, opt_d, ns_d_loss(D(real), D(fake)), real, step, settings)
        z = torch.randn(settings.batch_size, arch.z_dim, generator=g).to(device)
        return ns_g_loss(D(G(z)))

    def after_step(step: int, values: dict[str, float]) -> None:
        nonlocal acc
        with torch.no_grad():
            for pe, p in zip(G_ema.parameters(), G.parameters()):
                pe.lerp_(p, 1 - settings.ema_decay)
        acc["d"] += d_loss
        acc["g"] += values["loss"]
        acc["count"] += 1
        monitor.step({"loss/d": d_loss, "loss/g": values["loss"]})
        done = step + 1
        if done % settings.checkpoint_every == 0 or done == settings.iters:
            row = {"iter": done, "d_loss": acc["d"] / acc["count"], "g_loss": acc["g"] / acc["count"],
                   "seconds": round(time.time() - t0, 1)}
            history.append(row)
            acc = {"d": 0.0, "g": 0.0, "count": 0}
            log(f"source GAN iter {done}/{settings.iters}: d_loss {row['d_loss']:.3f} g_loss {row['g_loss']:.3f}")
            if state_path is not None:
                save_training_state(state_path, modules, optimizers=optims, extra={"step": done, "history": history})

    run_steps(step_loss, opt_g, None, settings.iters, start=start, after_step=after_step, name="source GAN",
              hint="lower gan.source.lr")
    monitor.close()
    G_ema.eval()
    D.eval()
    return SourceGAN(G_ema, D, key="", path=entry, history=history)


def gan_arch(gc, channels: int) -> GANArch:
    """The GAN architecture of a ``GANConfig`` (its section ``gan.arch``) for images with ``channels`` channels."""
    return gc.arch.for_channels(channels)


def gan_train_settings(gc) -> GANTrainSettings:
    """Source pretraining settings of a ``GANConfig``: its section ``gan.source``."""
    return replace(gc.source)


def source_gan_key(images: str, arch: GANArch, settings: GANTrainSettings) -> dict[str, Any]:
    """Cache-key parts of a source GAN: the content digest of its images, its architecture and training."""
    return {"kind": "gan-source", "images": images, "arch": asdict(arch), "train": asdict(settings)}


def pretrained_source_gan(images: torch.Tensor, arch: GANArch, settings: GANTrainSettings, cache,
                          log: Callable[[str], None] = print, device: torch.device | str = "cpu",
                          progress: bool = False, log_dir: str | Path | None = None) -> SourceGAN:
    """Train (or load from the cache, or resume) the source GAN for these images and settings
    (``progress`` and ``log_dir`` as :func:`train_source_gan`'s; a cached GAN writes no events)."""
    from fewgen.checkpoint import load_model, save_model
    from fewgen.utils import content_digest, read_json, write_json

    parts = source_gan_key(content_digest(images), arch, settings)
    key = cache.key(parts)

    def load(entry: Path) -> SourceGAN:
        G, D = Generator(arch).to(device), Discriminator(arch).to(device)
        load_model(entry / "generator.safetensors", G)
        load_model(entry / "discriminator.safetensors", D)
        return SourceGAN(G.eval(), D.eval(), key, entry, read_json(entry / "history.json")["history"])

    def build(entry: Path) -> SourceGAN:
        G, D = Generator(arch), Discriminator(arch)
        n_g = sum(p.numel() for p in G.parameters())
        n_d = sum(p.numel() for p in D.parameters())
        log(f"pretraining source GAN ({n_g / 1e3:.0f}k + {n_d / 1e3:.0f}k parameters) on {len(images)} images, "
            f"{settings.iters} iterations")
        src = train_source_gan(images, arch, settings, entry, log, device, progress, log_dir)
        save_model(entry / "generator.safetensors", src.generator, {"arch": asdict(arch)})
        save_model(entry / "discriminator.safetensors", src.discriminator, {"arch": asdict(arch)})
        write_json(entry / "history.json", {"history": src.history})
        (entry / "state.safetensors").unlink(missing_ok=True)
        cache.mark_done(entry, {"iters": settings.iters})
        src.key, src.path = key, entry
        return src

    return cache.build_or_load("gans", parts, build, load, log, what="source GAN")


# ----------------------------------------------------------------------------- adaptation


@dataclass
class AdaptSettings(GANOptimiser):
    """How each method adapts the source GAN to the shots: the config section ``gan.adapt`` (the
    same for every method; ``seed`` is each of the run's seeds, one adaptation per shot draw)."""

    iters: int = opt(500, "adaptation iterations (the same for every method)", min=1)
    batch_size: int = opt(16, "latents per adaptation iteration", min=1)
    track_every: int = opt(50, "iterations between tracked realism / intra-diversity / FID", min=1)
    checkpoint_every: int = opt(50, "iterations between resumable checkpoints and history records", min=1)
    seed: int = opt(0, "replaced by each of the run's seeds (the shot draw)")


def gan_adapt_settings(gc, seed: int) -> AdaptSettings:
    """Adaptation settings of a ``GANConfig`` for one shot draw (``seed``): its section ``gan.adapt``."""
    return replace(gc.adapt, seed=seed)


def method_options(name: str) -> dict[str, str]:
    """The ``GANConfig`` field behind each constructor option of adaptation method ``name`` (each
    method declares them beside its definition, ``AdaptMethod.options``)."""
    return dict(GAN_METHODS.get(name).options)


def method_kwargs(gc, name: str) -> dict[str, Any]:
    """The constructor options of adaptation method ``name`` from a ``GANConfig``."""
    return {kw: getattr(gc, f) for kw, f in method_options(name).items()}


def adapted_gan_key(gc, *, source: str, shots: str, target: str, method: str, seed: int, feature_net: str,
                    lpips: str | None) -> dict[str, Any]:
    """Cache-key parts of one adapted GAN: the source GAN's key, the content of the shots and of the
    held-out target images (tracking), the method and its options, the adaptation settings and the
    tracking network (content digests)."""
    return {"kind": "gan-adapt", "source": source, "shots": shots, "method": method,
            "method_config": create_adapter(method, **method_kwargs(gc, method)).config(),
            "settings": asdict(gan_adapt_settings(gc, seed)),
            "tracking": {"net": feature_net, "samples": gc.track_samples, "target": target, "lpips": lpips}}


@dataclass
class AdaptStep:
    """What a method's losses see at one iteration.

    ``z``: latents (B, z_dim); ``real``: a batch of the training shots in [-1, 1];
    ``rng``: a seeded generator for the method's own random choices (layers, anchors).
    """

    G: Generator
    D: Discriminator
    G_src: Generator
    z: torch.Tensor
    real: torch.Tensor
    step: int
    rng: torch.Generator
    shots: torch.Tensor  # all training shots in [-1, 1]


class AdaptMethod:
    """An adaptation method: which D parameters train, and the D / G losses of one step.

    ``d_losses`` / ``g_losses`` return named terms (each a scalar tensor) that are summed.
    """

    name = "base"
    #: constructor option -> the ``gan.*`` config field it comes from (declared beside each method)
    options: dict[str, str] = {}

    def trainable_d_parameters(self, D: Discriminator) -> list[nn.Parameter]:
        return [p for n, p in D.named_parameters() if not n.startswith("patch_head")]

    def d_losses(self, s: AdaptStep) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            fake = s.G(s.z)
        return {"adv": ns_d_loss(s.D(s.real), s.D(fake))}

    def g_losses(self, s: AdaptStep) -> dict[str, torch.Tensor]:
        return {"adv": ns_g_loss(s.D(s.G(s.z)))}

    def config(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items() if not k.startswith("_")}


@dataclass
class AdaptResult:
    generator: Generator
    discriminator: Discriminator
    history: list[dict]  # per checkpoint interval, each loss term's mean over the iterations that had it
    tracking: list[dict]  # metrics every track_every iterations (iteration 0 = the source generator)
    key: str = ""
    path: Path | None = None


def adapt_gan(method: AdaptMethod, source: SourceGAN, shots: torch.Tensor, settings: AdaptSettings,
              entry: Path | None = None, track: Callable[[Generator], dict] | None = None,
              log: Callable[[str], None] = print, device: torch.device | str = "cpu", progress: bool = False,
              log_dir: str | Path | None = None) -> AdaptResult:
    """Adapt a copy of the source GAN to ``shots`` (uint8 (k, C, H, W)) with ``method``.

    Every ``track_every`` iterations (and before the first) ``track(G)`` is called and its
    dict recorded with the iteration. With ``entry``, state is checkpointed and resumed.
    ``progress``: a bar with the ETA; ``log_dir``: TensorBoard events of every loss term
    (``loss/d_<term>``, ``loss/g_<term>``) per iteration and of the tracked metrics.
    """
    # the source generator is usually a frozen EMA copy: the adapted one must train again
    G = copy.deepcopy(source.generator).to(device).train().requires_grad_(True)
    D = copy.deepcopy(source.discriminator).to(device).train()
    G_src = copy.deepcopy(source.generator).to(device).eval().requires_grad_(False)
    d_params = method.trainable_d_parameters(D)
    trainable = {id(p) for p in d_params}
    for p in D.parameters():
        p.requires_grad_(id(p) in trainable)
    opt_g = torch.optim.Adam(G.parameters(), lr=settings.lr, betas=(settings.beta1, settings.beta2))
    opt_d = torch.optim.Adam(d_params, lr=settings.lr, betas=(settings.beta1, settings.beta2))
    modules, optims = {"G": G, "D": D}, {"G": opt_g, "D": opt_d}
    state_path = entry / "state.safetensors" if entry is not None else None
    start, history, tracking = 0, [], []
    if state_path is not None and state_path.exists():
        extra = load_training_state(state_path, modules, optimizers=optims)
        start, history, tracking = extra["step"], extra["history"], extra["tracking"]
        log(f"resuming {method.name} adaptation at iteration {start}")
    shots_f = to_gan_range(shots).to(device)
    if track is not None and start == 0:
        tracking.append({"iter": 0, **track(G)})
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}  # per term: some terms exist only on some iterations (CDC's anchors)
    t0 = time.time()
    monitor = TrainingMonitor(f"{method.name} adaptation", settings.iters, start=start, log=log, progress=progress,
                              log_dir=log_dir, unit="iteration")
    d_terms: dict[str, torch.Tensor] = {}

    def step_loss(step: int) -> dict[str, torch.Tensor]:
        """The discriminator's update, then the generator's loss terms (the core's optimiser step)."""
        nonlocal d_terms
        rng = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
        idx = torch.randint(0, len(shots_f), (min(settings.batch_size, len(shots_f)),), generator=rng)
        real = shots_f[idx]
        z = torch.randn(settings.batch_size, G.arch.z_dim, generator=rng).to(device)
        s = AdaptStep(G, D, G_src, z, real, step, rng, shots_f)
        d_terms = method.d_losses(s)
        _d_step(D, opt_d, sum(d_terms.values()), real, step, settings)
        s.z = torch.randn(settings.batch_size, G.arch.z_dim, generator=rng).to(device)
        return method.g_losses(s)

    def after_step(step: int, g_values: dict[str, float]) -> None:
        nonlocal sums, counts
        values = {**{f"d_{k}": float(v.detach()) for k, v in d_terms.items()},
                  **{f"g_{k[5:]}": v for k, v in g_values.items() if k.startswith("loss/")}}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
            counts[k] = counts.get(k, 0) + 1
        monitor.step({f"loss/{k}": v for k, v in values.items()})
        done = step + 1
        if track is not None and (done % settings.track_every == 0 or done == settings.iters):
            G.eval()
            tracking.append({"iter": done, **track(G)})
            G.train()
            monitor.scalars({f"track/{k}": v for k, v in tracking[-1].items()
                             if k != "iter" and isinstance(v, int | float)}, done)
        if done % settings.checkpoint_every == 0 or done == settings.iters:
            history.append({"iter": done, **{k: v / counts[k] for k, v in sums.items()},
                            "seconds": round(time.time() - t0, 1)})
            sums, counts = {}, {}
            last = tracking[-1] if tracking else {}
            shown = " ".join(f"{k} {v:.3f}" for k, v in last.items() if k != "iter" and isinstance(v, float))
            log(f"{method.name} iter {done}/{settings.iters}: {shown}")
            if state_path is not None:
                save_training_state(state_path, modules, optimizers=optims,
                                    extra={"step": done, "history": history, "tracking": tracking})

    run_steps(step_loss, opt_g, None, settings.iters, start=start, after_step=after_step,
              name=f"{method.name} adaptation", hint="lower gan.adapt.lr")
    monitor.close()
    return AdaptResult(G.eval(), D.eval(), history, tracking)


def create_adapter(name: str, **kwargs: Any) -> AdaptMethod:
    """An adaptation method by registered name (tgan, freezed, cdc, dcl)."""

    return GAN_METHODS.get(name)(**kwargs)  # the methods register themselves (fewgen.gan imports them)
