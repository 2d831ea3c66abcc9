"""Generators trained through the few-shot classifier: the episodes, the loss and the loop they share.

Issue 27's generator families (``fewgen.generators.deform``: a learned deformation of the shot;
``fewgen.generators.fusion``: the shot fused patch-wise with base-class drawings) are trained the same
way. On base-class episodes (N-way 1-shot, Q queries a class), each class's prototype mixes its shot
with the mean of M generated images, all features L2-normalised as the cosine prototype classifier
builds them::

    p_c = normalize((1 - s) * f(x_c) + s * mean_m f(G(x_c, .)))            (s = proto_share)
    L = CE(scale * cos(f(q), p), y_q) + the family's own penalties

through a frozen backbone ``f`` (its weights get no gradient), so the only way to lower the loss is to
make the generated images' mean feature a better class centre than the shot. Every step draws its
episode and randomness from a generator seeded by (family, seed, step), so training is deterministic
and a run resumed from its checkpoint equals an uninterrupted one.

A family subclasses :class:`EpisodicGenerator` with its network (built by the ``build`` it passes
to ``__init__``), its options (a subclass of :class:`EpisodicOptions`, named by ``options_class``),
:meth:`~EpisodicGenerator.noise` (its randomness per image) and :meth:`~EpisodicGenerator.make_images`;
optionally :meth:`~EpisodicGenerator.prepare` (what it reads from the base classes).
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
class EpisodicOptions:
    """How a generator is trained through the prototype classifier (shared by every family)."""

    steps: int = opt(1500, "training steps (one base-class episode each)", min=1)
    lr: float = opt(1e-3, "Adam learning rate (cosine schedule, 5% warmup)", gt=0)
    n_way: int = opt(20, "classes per training episode", min=2)
    n_query: int = opt(5, "query images per class per training episode", min=1)
    n_generated: int = opt(5, "generated images per shot in each training prototype", min=1)
    proto_share: float = opt(0.5, "share of the generated images' mean in a prototype: (1-s)*shot + s*mean(generated)",
                             gt=0, max=1)
    scale: float = opt(10.0, "temperature of the cosine logits in the training loss", gt=0)
    checkpoint_every: int = opt(100, "steps between resumable checkpoints", min=1)
    seed: int = opt(0, "seed of the initial weights, the episodes and the generators' randomness", min=0)


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


class EpisodicGenerator:
    """A generator of images of each shot, trained through a frozen backbone's prototype loss
    (module docstring)."""

    family = "episodic"  # names the random streams ("<family>-train", "-eval", "-sample") and the log
    options_class: type = EpisodicOptions  # what :meth:`load` rebuilds the options with

    def __init__(self, in_chans: int, options: EpisodicOptions, build: Callable[[], nn.Module]):
        self.options = options
        with torch.random.fork_rng(devices=[]):  # the initial weights from the seed, global state untouched
            torch.manual_seed(options.seed)
            self.net = build()
        self.in_chans = in_chans
        self.history: list[float] = []

    # -- what a family defines -------------------------------------------------------------------
    def noise(self, n_images: int, g: torch.Generator) -> torch.Tensor:
        """The randomness of ``n_images`` images (one row each), drawn from ``g`` in one call."""
        raise NotImplementedError

    def make_images(self, sources: torch.Tensor, source_feats: torch.Tensor | None, exclude: torch.Tensor | None,
                    noise: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One image (B, C, H, W) in [0, 1] per row: of float shot ``sources[i]`` with randomness
        ``noise[i]``, and the family's penalties (weighted, by name). ``source_feats`` (B, D): the
        shots' frozen features; ``exclude``: the episode's classes (N,) when the shots are base
        images (None otherwise), which a family drawing from the base classes must not use."""
        raise NotImplementedError

    def prepare(self, backbone: nn.Module, base: ArrayDataset) -> None:
        """Anything the family reads from the base classes before training (nothing by default)."""

    # -- shared ------------------------------------------------------------------------------------
    def _check(self, data: ArrayDataset) -> list[torch.Tensor]:
        o = self.options
        by_class = data.indices_by_class()
        if o.n_way > len(by_class):
            raise FewgenError(f"n_way={o.n_way} is larger than the number of classes ({len(by_class)}); "
                              f"use n_way <= {len(by_class)}")
        small = min(len(ix) for ix in by_class)
        if small < 1 + o.n_query:
            raise FewgenError(f"a class has {small} images, fewer than 1 shot + n_query={o.n_query}; "
                              f"use n_query <= {small - 1}")
        return by_class

    def _episode_loss(self, backbone: nn.Module, data: ArrayDataset, by_class, g: torch.Generator,
                      base_classes: bool) -> dict[str, torch.Tensor]:
        o = self.options
        shot_idx, query_idx = base_episode(by_class, o.n_way, o.n_query, g)
        shots = data.float_images(shot_idx)
        with torch.no_grad():
            shot_feats = backbone.forward_features(shots)
            query_feats = backbone.forward_features(data.float_images(query_idx.reshape(-1)))
        m = o.n_generated
        noise = self.noise(o.n_way * m, g)
        exclude = data.labels[shot_idx] if base_classes else None
        images, penalties = self.make_images(shots.repeat_interleave(m, 0), shot_feats.repeat_interleave(m, 0),
                                             exclude, noise)
        gen_feats = backbone.forward_features(images).view(o.n_way, o.n_generated, -1)
        ce = prototype_loss(shot_feats, gen_feats, query_feats.view(o.n_way, o.n_query, -1), o.proto_share, o.scale)
        return {"ce": ce, **penalties}

    def fit(self, backbone: nn.Module, base: ArrayDataset, checkpoint: str | Path | None = None,
            stop_at: int | None = None, log: Callable[[str], None] | None = None):
        """Train on episodes of ``base`` through the frozen ``backbone`` (its weights untouched).

        checkpoint: a file the training state is saved to every ``checkpoint_every`` steps and at
            the end, and resumed from when it exists.
        stop_at: stop (after saving) at this step, as an interruption would; ``None``: train to ``steps``.
        """
        from fewgen.checkpoint import load_training_state, save_training_state
        from fewgen.training import cosine_schedule, run_steps
        from fewgen.utils import make_generator

        o, name = self.options, f"{self.family} generator"
        by_class = self._check(base)
        backbone.eval()
        for p in backbone.parameters():
            p.requires_grad_(False)
        self.prepare(backbone, base)
        optimizer = torch.optim.Adam(self.net.parameters(), lr=o.lr)
        schedule = cosine_schedule(optimizer, o.steps, warmup=max(1, o.steps // 20))
        start = 0
        if checkpoint is not None and Path(checkpoint).exists():
            extra = load_training_state(checkpoint, {"net": self.net}, optimizer, schedule)
            start, self.history = int(extra["step"]), list(extra["history"])
            if log:
                log(f"{name}: resumed at step {start} from {checkpoint}")
        end = o.steps if stop_at is None else min(stop_at, o.steps)
        self.net.train()

        def step_loss(step: int) -> dict[str, torch.Tensor]:
            return self._episode_loss(backbone, base, by_class, make_generator(f"{self.family}-train", o.seed, step),
                                      base_classes=True)

        def after_step(step: int, values: dict[str, float]) -> None:
            self.history.append(round(values["loss/ce"], 6))
            done = step + 1
            if checkpoint is not None and (done % o.checkpoint_every == 0 or done == end):
                save_training_state(checkpoint, {"net": self.net}, optimizer, schedule,
                                    extra={"step": done, "history": self.history})
            if log and (done % max(1, o.steps // 10) == 0 or done == end):
                recent = self.history[-max(1, o.steps // 10):]
                log(f"{name}: step {done}/{o.steps}, prototype loss {sum(recent) / len(recent):.4f}")

        run_steps(step_loss, optimizer, schedule, end, start=start, params=list(self.net.parameters()), max_norm=1.0,
                  after_step=after_step, name=name, hint="lower its lr")
        self.net.eval()
        return self

    @torch.no_grad()
    def episode_loss(self, backbone: nn.Module, data: ArrayDataset, n_episodes: int, seed: int,
                     base_classes: bool = False) -> float:
        """Mean prototype cross-entropy (no penalties) on ``n_episodes`` fixed episodes of ``data``
        drawn from ``seed``: the training objective measured on episodes training never saw.
        ``base_classes``: ``data`` is the base set (a family that draws from it excludes the
        episode's classes, as in training)."""
        from fewgen.utils import make_generator

        by_class = self._check(data)
        was_training = self.net.training
        self.net.eval()
        backbone.eval()
        total = sum(self._episode_loss(backbone, data, by_class, make_generator(f"{self.family}-eval", seed, e),
                                       base_classes)["ce"].item() for e in range(n_episodes))
        self.net.train(was_training)
        return total / n_episodes

    @torch.no_grad()
    def generate(self, shots: torch.Tensor, per_shot: int, seed: int, batch_size: int = 512,
                 backbone: nn.Module | None = None) -> torch.Tensor:
        """``per_shot`` images of each shot: uint8 (n * per_shot, C, H, W), shot i's images at rows
        ``i * per_shot ... (i + 1) * per_shot - 1``, from uint8 shots (n, C, H, W). ``backbone``: the
        frozen one, for a family that reads the shots' features."""
        from fewgen.utils import make_generator

        if shots.dtype != torch.uint8 or shots.dim() != 4 or shots.shape[1] != self.in_chans:
            raise FewgenError(f"shots must be uint8 (n, {self.in_chans}, H, W), got {shots.dtype} "
                              f"{tuple(shots.shape)}")
        was_training = self.net.training
        self.net.eval()
        g = make_generator(f"{self.family}-sample", seed)
        noise = self.noise(len(shots) * per_shot, g)
        feats = None
        if backbone is not None:
            backbone.eval()
            feats = torch.cat([backbone.forward_features(shots[i:i + batch_size].float().div(255))
                               for i in range(0, len(shots), batch_size)]).repeat_interleave(per_shot, 0)
        source = shots.repeat_interleave(per_shot, 0)
        out = []
        for start in range(0, len(source), batch_size):
            rows = slice(start, start + batch_size)
            images, _ = self.make_images(source[rows].float().div(255), None if feats is None else feats[rows], None,
                                         noise[rows])
            out.append(to_uint8(images))
        self.net.train(was_training)
        return torch.cat(out) if out else source.clone()

    def save(self, path: str | Path) -> None:
        from fewgen.checkpoint import save_model

        save_model(path, self.net, {"options": asdict(self.options), "in_chans": self.in_chans,
                                    "history": self.history})

    @classmethod
    def load(cls, path: str | Path):
        from fewgen.checkpoint import load_tensors

        tensors, meta = load_tensors(path)
        gen = cls(int(meta["in_chans"]), cls.options_class(**meta["options"]))
        gen.net.load_state_dict(tensors)
        gen.history = list(meta.get("history", []))
        gen.net.eval()
        return gen


__all__ = ["EpisodicGenerator", "EpisodicOptions", "base_episode", "prototype_loss"]
