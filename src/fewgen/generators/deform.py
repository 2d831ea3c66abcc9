"""A deformation generator trained through the few-shot classifier.

Family (a) of issue 27, in the spirit of IDeMe-Net (Chen et al., "Image Deformation Meta-Networks
for One-Shot Learning", CVPR 2019) and of hallucination trained through the meta-learner (Wang et
al., "Low-Shot Learning from Imaginary Data", CVPR 2018), with the deformation of a drawing as the
only freedom the generator has.

A small CNN reads the shot ``x`` (C, H, W) in [0, 1] and a noise vector ``z`` and predicts

* a coarse displacement field ``d`` on a ``grid x grid`` lattice, ``d = max_shift * tanh(.)`` in
  ``grid_sample``'s normalised coordinates, upsampled bicubically to (H, W), and
* optionally a stroke-width change, a softmax mix ``a`` of the image, its 3x3 dilation and its
  3x3 erosion.

The image is ``G(x, z) = mix_a(grid_sample(x, identity + d))``.

It is trained on base-class episodes (N-way 1-shot, Q queries a class) through a frozen backbone
``f``. Each class's prototype mixes its shot with the mean of M generated images (all features
L2-normalised, as the cosine prototype classifier builds them)::

    p_c = normalize((1 - s) * f(x_c) + s * mean_m f(G(x_c, z_m)))            (s = proto_share)
    L = CE(scale * cos(f(q), p), y_q) + w_smooth * |grad d / max_shift|^2 + w_magnitude * |d / max_shift|^2

so the only way to lower the loss is to make the generated images' mean feature a better class
centre than the shot; the backbone's weights get no gradient. Every step draws its episode and
noise from a generator seeded by (seed, step), so training is deterministic and a run resumed from
a checkpoint equals an uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.data.images import to_uint8
from fewgen.errors import FewgenError
from fewgen.options import opt


@dataclass
class DeformOptions:
    """How the deformation generator is built and trained (``fewgen.generators.deform``)."""

    steps: int = opt(1500, "training steps (one base-class episode each)", min=1)
    lr: float = opt(1e-3, "Adam learning rate (cosine schedule, 5% warmup)", gt=0)
    n_way: int = opt(20, "classes per training episode", min=2)
    n_query: int = opt(5, "query images per class per training episode", min=1)
    n_generated: int = opt(5, "generated images per shot in each training prototype", min=1)
    proto_share: float = opt(0.5, "share of the generated images' mean in a prototype: (1-s)*shot + s*mean(generated)",
                             gt=0, max=1)
    scale: float = opt(10.0, "temperature of the cosine logits in the training loss", gt=0)
    max_shift: float = opt(0.2, "largest displacement, in grid_sample's [-1, 1] coordinates (0.2 = 10% of the side)",
                           gt=0, max=1)
    grid: int = opt(5, "side of the coarse displacement lattice", min=2)
    stroke: bool = opt(True, "also learn a stroke-width change (mix of the image, its dilation and its erosion)")
    noise_dim: int = opt(16, "size of the noise vector", min=1)
    width: int = opt(32, "channels of the generator's CNN", min=1)
    w_smooth: float = opt(0.1, "weight of the displacement smoothness penalty", min=0)
    w_magnitude: float = opt(0.01, "weight of the displacement magnitude penalty", min=0)
    checkpoint_every: int = opt(100, "steps between resumable checkpoints", min=1)
    seed: int = opt(0, "seed of the initial weights, the episodes and the noise", min=0)


def warp(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Warp ``images`` (B, C, H, W) float by coarse ``offsets`` (B, 2, g, g) (x, y in grid_sample's
    normalised coordinates), upsampled bicubically to (H, W); the border pixels fill the outside."""
    b, _, h, w = images.shape
    flow = F.interpolate(offsets, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    theta = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(b, 2, 3)
    identity = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(images, identity + flow, mode="bilinear", padding_mode="border", align_corners=False)


def stroke_mix(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` (B, 3) mix of ``images`` (B, C, H, W), their 3x3 dilation and their 3x3 erosion."""
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    w = weights[:, :, None, None, None]
    return w[:, 0] * images + w[:, 1] * dilated + w[:, 2] * eroded


def displacement_penalties(offsets: torch.Tensor, max_shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothness, magnitude) of coarse ``offsets`` (B, 2, g, g), both in units of ``max_shift``:
    the mean squared difference of lattice neighbours and the mean squared offset."""
    d = offsets / max_shift
    smooth = (d[:, :, 1:] - d[:, :, :-1]).pow(2).mean() + (d[:, :, :, 1:] - d[:, :, :, :-1]).pow(2).mean()
    return smooth, d.pow(2).mean()


class DeformNet(nn.Module):
    """Shot (B, C, H, W) in [0, 1] and noise (B, noise_dim) -> offsets (B, 2, g, g) and stroke mix (B, 3).

    The last layers start at zero, so an untrained generator returns its shot unchanged (the stroke
    mix starts at 0.9 on the image itself)."""

    def __init__(self, in_chans: int, o: DeformOptions):
        super().__init__()
        w = o.width
        self.max_shift, self.use_stroke = o.max_shift, o.stroke
        self.encoder = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(o.grid),
        )
        self.noise = nn.Linear(o.noise_dim, w)
        self.head = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 2, 3, padding=1))
        self.stroke = nn.Linear(w, 3)
        for layer in (self.head[-1], self.stroke):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.stroke.bias[0] = 3.0  # softmax(3, 0, 0) = 0.91 on the image itself

    def forward(self, shots: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.encoder(shots) + self.noise(noise)[:, :, None, None])
        offsets = self.max_shift * torch.tanh(self.head(h))
        mix = torch.softmax(self.stroke(h.mean((2, 3))), dim=1)
        return offsets, mix

    def deform(self, shots: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, C, H, W) in [0, 1], offsets (B, 2, g, g)) for float shots and noise."""
        offsets, mix = self(shots, noise)
        out = warp(shots, offsets)
        if self.use_stroke:
            out = stroke_mix(out, mix)
        return out.clamp(0, 1), offsets


def base_episode(by_class: list[torch.Tensor], n_way: int, n_query: int,
                 g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(shot indices (N,), query indices (N, Q)) of one N-way 1-shot episode over base classes."""
    classes = torch.randperm(len(by_class), generator=g)[:n_way]
    picks = [by_class[c][torch.randperm(len(by_class[c]), generator=g)[: 1 + n_query]] for c in classes.tolist()]
    rows = torch.stack(picks)
    return rows[:, 0], rows[:, 1:]


def prototype_loss(shot_feats: torch.Tensor, gen_feats: torch.Tensor, query_feats: torch.Tensor,
                   proto_share: float, scale: float) -> torch.Tensor:
    """Query cross-entropy of cosine prototypes mixing each shot with its generated images.

    shot_feats: (N, D); gen_feats: (N, M, D); query_feats: (N, Q, D), class i's queries in row i."""
    n, q = query_feats.shape[:2]
    proto = (1 - proto_share) * F.normalize(shot_feats, dim=-1) + proto_share * F.normalize(gen_feats, dim=-1).mean(1)
    logits = scale * F.normalize(query_feats.reshape(n * q, -1), dim=-1) @ F.normalize(proto, dim=-1).T
    return F.cross_entropy(logits, torch.arange(n).repeat_interleave(q))


class DeformGenerator:
    """The trained deformation generator: :meth:`fit` on base classes through a frozen backbone,
    then :meth:`generate` images of any shots."""

    def __init__(self, in_chans: int, options: DeformOptions | None = None):
        self.options = options or DeformOptions()
        with torch.random.fork_rng(devices=[]):  # the initial weights from the seed, global state untouched
            torch.manual_seed(self.options.seed)
            self.net = DeformNet(in_chans, self.options)
        self.in_chans = in_chans
        self.history: list[float] = []

    def _check(self, base: ArrayDataset) -> list[torch.Tensor]:
        o = self.options
        by_class = base.indices_by_class()
        if o.n_way > len(by_class):
            raise FewgenError(f"n_way={o.n_way} is larger than the number of base classes ({len(by_class)}); "
                              f"use n_way <= {len(by_class)}")
        small = min(len(ix) for ix in by_class)
        if small < 1 + o.n_query:
            raise FewgenError(f"a base class has {small} images, fewer than 1 shot + n_query={o.n_query}; "
                              f"use n_query <= {small - 1}")
        return by_class

    def fit(self, backbone: nn.Module, base: ArrayDataset, checkpoint: str | Path | None = None,
            stop_at: int | None = None, log: Callable[[str], None] | None = None) -> DeformGenerator:
        """Train on episodes of ``base`` through the frozen ``backbone`` (its weights untouched).

        checkpoint: a file the training state is saved to every ``checkpoint_every`` steps and at
            the end, and resumed from when it exists.
        stop_at: stop (after saving) at this step, as an interruption would; ``None``: train to ``steps``.
        """
        from fewgen.checkpoint import load_training_state, save_training_state
        from fewgen.training import cosine_schedule, run_steps
        from fewgen.utils import make_generator

        o = self.options
        by_class = self._check(base)
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=o.lr)
        schedule = cosine_schedule(optimizer, o.steps, warmup=max(1, o.steps // 20))
        start = 0
        if checkpoint is not None and Path(checkpoint).exists():
            extra = load_training_state(checkpoint, {"net": self.net}, optimizer, schedule)
            start, self.history = int(extra["step"]), list(extra["history"])
            if log:
                log(f"deform generator: resumed at step {start} from {checkpoint}")
        end = o.steps if stop_at is None else min(stop_at, o.steps)
        self.net.train()

        def step_loss(step: int) -> dict[str, torch.Tensor]:
            g = make_generator("deform-train", o.seed, step)
            shot_idx, query_idx = base_episode(by_class, o.n_way, o.n_query, g)
            noise = torch.randn(o.n_way * o.n_generated, o.noise_dim, generator=g)
            shots = base.float_images(shot_idx)
            with torch.no_grad():
                shot_feats = backbone.forward_features(shots)
                query_feats = backbone.forward_features(base.float_images(query_idx.reshape(-1)))
            images, offsets = self.net.deform(shots.repeat_interleave(o.n_generated, 0), noise)
            gen_feats = backbone.forward_features(images).view(o.n_way, o.n_generated, -1)
            ce = prototype_loss(shot_feats, gen_feats, query_feats.view(o.n_way, o.n_query, -1), o.proto_share, o.scale)
            smooth, magnitude = displacement_penalties(offsets, o.max_shift)
            return {"ce": ce, "smooth": o.w_smooth * smooth, "magnitude": o.w_magnitude * magnitude}

        def after_step(step: int, values: dict[str, float]) -> None:
            self.history.append(round(values["loss/ce"], 6))
            done = step + 1
            if checkpoint is not None and (done % o.checkpoint_every == 0 or done == end):
                save_training_state(checkpoint, {"net": self.net}, optimizer, schedule,
                                    extra={"step": done, "history": self.history})
            if log and (done % max(1, o.steps // 10) == 0 or done == end):
                recent = self.history[-max(1, o.steps // 10):]
                log(f"deform generator: step {done}/{o.steps}, prototype loss {sum(recent) / len(recent):.4f}")

        run_steps(step_loss, optimizer, schedule, end, start=start, params=list(self.net.parameters()), max_norm=1.0,
                  after_step=after_step, name="deform generator", hint="lower its lr")
        self.net.eval()
        return self

    @torch.no_grad()
    def episode_loss(self, backbone: nn.Module, data: ArrayDataset, n_episodes: int, seed: int) -> float:
        """Mean prototype cross-entropy (no penalties) on ``n_episodes`` fixed episodes of ``data``
        drawn from ``seed``: the training objective measured on episodes training never saw."""
        from fewgen.utils import make_generator

        o = self.options
        by_class = self._check(data)
        was_training = self.net.training
        self.net.eval()
        backbone.eval()
        total = 0.0
        for e in range(n_episodes):
            g = make_generator("deform-eval", seed, e)
            shot_idx, query_idx = base_episode(by_class, o.n_way, o.n_query, g)
            noise = torch.randn(o.n_way * o.n_generated, o.noise_dim, generator=g)
            shots = data.float_images(shot_idx)
            images, _ = self.net.deform(shots.repeat_interleave(o.n_generated, 0), noise)
            total += prototype_loss(backbone.forward_features(shots),
                                    backbone.forward_features(images).view(o.n_way, o.n_generated, -1),
                                    backbone.forward_features(data.float_images(query_idx.reshape(-1)))
                                    .view(o.n_way, o.n_query, -1), o.proto_share, o.scale).item()
        self.net.train(was_training)
        return total / n_episodes

    @torch.no_grad()
    def generate(self, shots: torch.Tensor, per_shot: int, seed: int, batch_size: int = 512) -> torch.Tensor:
        """``per_shot`` deformations of each shot: uint8 (n * per_shot, C, H, W), shot i's images at
        rows ``i * per_shot ... (i + 1) * per_shot - 1``, from uint8 shots (n, C, H, W)."""
        from fewgen.utils import make_generator

        if shots.dtype != torch.uint8 or shots.dim() != 4 or shots.shape[1] != self.in_chans:
            raise FewgenError(f"shots must be uint8 (n, {self.in_chans}, H, W), got {shots.dtype} "
                              f"{tuple(shots.shape)}")
        was_training = self.net.training
        self.net.eval()
        g = make_generator("deform-sample", seed)
        noise = torch.randn(len(shots) * per_shot, self.options.noise_dim, generator=g)
        source = shots.repeat_interleave(per_shot, 0)
        out = []
        for start in range(0, len(source), batch_size):
            x = source[start:start + batch_size].float().div(255)
            images, _ = self.net.deform(x, noise[start:start + batch_size])
            out.append(to_uint8(images))
        self.net.train(was_training)
        return torch.cat(out) if out else source.clone()

    def save(self, path: str | Path) -> None:
        from fewgen.checkpoint import save_model

        save_model(path, self.net, {"options": asdict(self.options), "in_chans": self.in_chans,
                                    "history": self.history})

    @classmethod
    def load(cls, path: str | Path) -> DeformGenerator:
        from fewgen.checkpoint import load_tensors

        tensors, meta = load_tensors(path)
        gen = cls(int(meta["in_chans"]), DeformOptions(**meta["options"]))
        gen.net.load_state_dict(tensors)
        gen.history = list(meta.get("history", []))
        gen.net.eval()
        return gen


__all__ = ["DeformGenerator", "DeformNet", "DeformOptions", "base_episode", "displacement_penalties",
           "prototype_loss", "stroke_mix", "warp"]
