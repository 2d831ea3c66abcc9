"""Steered redrawings: random affine redrawings of each shot, of which those whose mean feature lies
nearest where the class's other drawings are predicted to lie are kept (issue 27).

A 1-shot cosine prototype depends only on the mean support feature, so images help only if their
features move that mean toward the class centre (docs/results/synthetic.md). Random copies of the
shot average back to the shot. Here a small regressor, trained on pairs of base-class drawings,
predicts E[f(x2) | f(x1)]: where another drawing of the shot's class lies in the frozen backbone's
feature space. Of ``pool`` random affine redrawings of each shot, ``keep`` are chosen greedily so
that their normalised mean feature is nearest (cosine) that prediction. The kept images are real
pixels of the shot, moved, rotated, scaled and sheared: drawings, not adversarial patterns, and
their gain holds through a backbone that never took part in the choice (benchmarks/
bench_centre_shift.py).

    steer = SteeredRedrawings(SteeredOptions(pool=100, keep=10))
    steer.fit(backbone, base)                    # the regressor, on base features (seconds)
    images = steer.generate(backbone, shots)     # (C * keep, C, H, W) uint8, class-major
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.training import run_steps
from fewgen.utils import seed_hash


@dataclass
class SteeredOptions:
    """Options of :class:`SteeredRedrawings`.

    Attributes:
        pool: random affine redrawings made of each shot.
        keep: of those, how many are kept per shot.
        degrees, translate, scale, shear: the affine distortion's ranges (kornia ``RandomAffine``).
        regressor_steps, regressor_hidden, regressor_lr: the E[f2 | f1] regressor's training.
        seed: the redrawings' and the regressor's seed.
    """

    pool: int = 100
    keep: int = 10
    degrees: float = 25.0
    translate: float = 0.12
    scale: tuple[float, float] = (0.75, 1.25)
    shear: float = 20.0
    regressor_steps: int = 3000
    regressor_hidden: int = 256
    regressor_lr: float = 1e-3
    seed: int = 0

    def check(self) -> None:
        if not 1 <= self.keep <= self.pool:
            raise FewgenError(f"steered redrawings keep {self.keep} of a pool of {self.pool} per shot; keep must be "
                              "between 1 and the pool size")
        if self.regressor_steps < 1 or self.regressor_hidden < 1 or self.regressor_lr <= 0:
            raise FewgenError("the steered redrawings' regressor needs steps >= 1, hidden >= 1 and lr > 0")


class CentreRegressor(nn.Module):
    """E[f(x2) | f(x1)] on L2-normalised features: ``f + mlp(f)``."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        f = F.normalize(feats, dim=-1)
        return f + self.mlp(f)


def train_centre_regressor(feats: torch.Tensor, labels: torch.Tensor, o: SteeredOptions) -> tuple[CentreRegressor, list[float]]:
    """The regressor trained by MSE on random pairs of distinct same-class features (base classes
    only, each with at least two images), and its loss per step."""
    by_class = [ix for ix in (torch.nonzero(labels == c).squeeze(1) for c in labels.unique()) if len(ix) > 1]
    if not by_class:
        raise FewgenError("the steered redrawings' regressor needs base classes with at least two images each")
    g = torch.Generator().manual_seed(seed_hash("centre-regressor", o.seed))
    torch.manual_seed(seed_hash("centre-regressor-init", o.seed))
    f = F.normalize(feats.float(), dim=-1)
    reg = CentreRegressor(f.shape[1], o.regressor_hidden)
    opt = torch.optim.Adam(reg.parameters(), o.regressor_lr, weight_decay=1e-5)
    counts = torch.tensor([len(ix) for ix in by_class])
    table = nn.utils.rnn.pad_sequence(by_class, batch_first=True)

    def step_loss(step: int) -> torch.Tensor:  # one stream of pairs, drawn in step order
        c = torch.randint(len(by_class), (512,), generator=g)
        i = (torch.rand(512, generator=g) * counts[c]).long()
        j = (i + 1 + (torch.rand(512, generator=g) * (counts[c] - 1)).long()) % counts[c]
        return F.mse_loss(reg(f[table[c, i]]), f[table[c, j]])

    history = run_steps(step_loss, opt, None, o.regressor_steps, name="centre regressor", hint="lower regressor_lr")
    return reg.eval(), history


def affine_pool(shots: torch.Tensor, o: SteeredOptions) -> torch.Tensor:
    """``o.pool`` random affine redrawings (N, pool, C, H, W) uint8 of each shot (N, C, H, W) uint8;
    shot n's redrawings depend only on its index and the seed."""
    import kornia.augmentation as K

    aug = K.RandomAffine(degrees=o.degrees, translate=(o.translate, o.translate), scale=tuple(o.scale),
                         shear=o.shear, p=1.0)
    out = []
    for n in range(len(shots)):
        torch.manual_seed(seed_hash("steered-pool", o.seed, n))
        x = aug(shots[n:n + 1].float().div(255).expand(o.pool, *shots.shape[1:]))
        out.append(x.mul(255).round().clamp(0, 255).to(torch.uint8))
    return torch.stack(out)


def steer(pool: torch.Tensor, target: torch.Tensor, keep: int) -> torch.Tensor:
    """Greedy choice, per row, of ``keep`` of its pool features (N, P, D) whose normalised mean is
    nearest (cosine) the row's target (N, D): indices (N, keep), each pool item at most once."""
    pool = F.normalize(pool.float(), dim=-1)
    target = F.normalize(target.float(), dim=-1)
    n, p, _ = pool.shape
    rows = torch.arange(n)
    total = torch.zeros_like(target)
    taken = torch.zeros(n, p, dtype=torch.bool)
    chosen = []
    for _ in range(keep):
        score = (F.normalize(total[:, None] + pool, dim=-1) * target[:, None]).sum(-1).masked_fill(taken, -2.0)
        j = score.argmax(1)
        chosen.append(j)
        taken[rows, j] = True
        total = total + pool[rows, j]
    return torch.stack(chosen, 1)


class SteeredRedrawings:
    """Redrawings of the shots steered toward their classes' predicted centres (module docstring)."""

    def __init__(self, options: SteeredOptions | None = None):
        self.options = options or SteeredOptions()
        self.options.check()
        self.regressor: CentreRegressor | None = None
        self.history: list[float] = []

    @staticmethod
    def _features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        from fewgen.evaluation.features import extract_features

        return extract_features(backbone, images, device=next(backbone.parameters()).device)

    def fit(self, backbone: nn.Module, base: ArrayDataset) -> SteeredRedrawings:
        """Train the regressor on the frozen backbone's features of the base classes."""
        backbone.eval()
        feats = self._features(backbone, base.images)
        self.regressor, self.history = train_centre_regressor(feats, base.labels, self.options)
        return self

    def predicted_centres(self, backbone: nn.Module, shots: torch.Tensor) -> torch.Tensor:
        """Where other drawings of each shot's class are predicted to lie (N, D), normalised."""
        if self.regressor is None:
            raise FewgenError("fit the steered redrawings on the base classes first")
        with torch.no_grad():
            return F.normalize(self.regressor(self._features(backbone, shots)), dim=-1)

    def generate(self, backbone: nn.Module, shots: torch.Tensor) -> torch.Tensor:
        """``keep`` steered redrawings of each shot (N, C, H, W) uint8: (N * keep, C, H, W), the
        redrawings of shot n at rows n * keep ... (n + 1) * keep - 1."""
        o = self.options
        target = self.predicted_centres(backbone, shots)
        pool = affine_pool(shots, o)
        feats = self._features(backbone, pool.flatten(0, 1)).view(len(shots), o.pool, -1)
        pick = steer(feats, target, o.keep)
        return torch.stack([pool[n, pick[n]] for n in range(len(shots))]).flatten(0, 1)

    def state(self) -> dict:
        """The options and the regressor's tensors (for a cache entry)."""
        return {"options": asdict(self.options),
                "tensors": {k: v.detach().clone() for k, v in (self.regressor.state_dict() if self.regressor else {}).items()}}
