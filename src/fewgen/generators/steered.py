"""Steered redrawings: random affine redrawings of each shot, of which those whose mean feature lies
nearest where the class's other drawings are predicted to lie are kept (issue 27).

A 1-shot cosine prototype depends only on the mean support feature, so images help only if their
features move that mean toward the class centre (docs/results/synthetic.md). Random copies of the
shot average back to the shot. Here a small regressor, trained on pairs of base-class drawings,
predicts E[f(x2) | f(x1)]: where another drawing of the shot's class lies in the frozen backbone's
feature space. With ``target=pixel+regressor`` that prediction is averaged with a second one, from
a copy of the backbone fine-tuned on the base images to map each drawing to its class's mean
feature: a predictor that reads the pixels (:func:`train_pixel_predictor`). Of ``pool`` random affine redrawings of each shot, ``keep`` are chosen greedily so
that their normalised mean feature is nearest (cosine) that prediction. The kept images are real
pixels of the shot, moved, rotated, scaled and sheared: drawings, not adversarial patterns, and
their gain holds through a backbone that never took part in the choice (benchmarks/
bench_centre_shift.py).

    steer = SteeredRedrawings(SteeredOptions(pool=100, keep=10))
    steer.fit(backbone, base)                    # the regressor, on base features (seconds)
    images = steer.generate(backbone, shots)     # (C * keep, C, H, W) uint8, class-major
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.data.images import to_uint8
from fewgen.errors import FewgenError
from fewgen.options import opt
from fewgen.training import run_steps
from fewgen.utils import seed_hash


@dataclass
class SteeredOptions:
    """Options of :class:`SteeredRedrawings`; in a run, the config section ``generator.steered``
    (where the kept count per shot follows from ``synthesis.synthetic_per_class`` and the shots)."""

    pool: int = opt(400, "random affine redrawings made of each shot, of which the steered ones are chosen", min=1)
    keep: int = opt(10, "redrawings kept per shot (in a run: synthesis.synthetic_per_class / shots, rounded up)",
                    min=1)
    degrees: float = opt(25.0, "largest rotation of a redrawing, in degrees", min=0, max=180)
    translate: float = opt(0.12, "largest shift of a redrawing, as a share of the side", min=0, max=1)
    scale: list[float] = opt([0.75, 1.25], "smallest and largest scale of a redrawing", gt=0)
    shear: float = opt(20.0, "largest shear of a redrawing, in degrees", min=0, max=90)
    regressor_steps: int = opt(3000, "training steps of the E[f2 | f1] regressor on pairs of base drawings", min=1)
    regressor_hidden: int = opt(256, "hidden width of the regressor", min=1)
    regressor_lr: float = opt(1e-3, "Adam learning rate of the regressor", gt=0)
    seed: int = opt(0, "seed of the regressor and of the redrawings")
    regressors: int = opt(1, "regressors whose normalised predictions are averaged (seeds seed, seed+1, ...)", min=1)
    target: str = opt("regressor", "where the redrawings are steered: regressor (the E[f2 | f1] regressor's prediction) "
                      "or pixel+regressor (its mean with the pixel predictor's: a copy of the backbone fine-tuned on "
                      "the base images to map each drawing to its class's mean feature)",
                      choices=("regressor", "pixel+regressor"))
    pixel_epochs: int = opt(4, "epochs of the pixel predictor's fine-tuning on the base images (target pixel+regressor)",
                            min=1)
    pixel_lr: float = opt(1e-4, "Adam learning rate of the pixel predictor (target pixel+regressor)", gt=0)

    def fit_arguments(self) -> dict:
        """The arguments of the generator's ``fit`` these options set: none (it reads its own)."""
        return {}

    def check_run(self, per_class: int) -> None:
        """The checks of a run that draws ``per_class`` images per class (0: none), where the kept
        count follows from it: from a single shot they all come from its pool."""
        self._check_ranges()
        if per_class > self.pool:
            raise FewgenError(f"synthesis.synthetic_per_class={per_class} steered redrawings of a single shot need a "
                              f"pool of at least {per_class}; raise generator.steered.pool (now {self.pool}) or lower "
                              "the count")

    def _check_ranges(self) -> None:
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise FewgenError(f"generator.steered.scale {list(self.scale)} must be two numbers, 0 < smallest <= "
                              "largest, e.g. [0.75, 1.25]")
        if self.regressor_steps < 1 or self.regressor_hidden < 1 or self.regressor_lr <= 0:
            raise FewgenError("the steered redrawings' regressor needs steps >= 1, hidden >= 1 and lr > 0")

    def check(self) -> None:
        self._check_ranges()
        if not 1 <= self.keep <= self.pool:
            raise FewgenError(f"steered redrawings keep {self.keep} of a pool of {self.pool} per shot; keep must be "
                              "between 1 and the pool size")


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


def leave_one_out_means(feats: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """For every drawing, the normalised mean feature of the other drawings of its class (N, D)."""
    f = F.normalize(feats.float(), dim=-1)
    n_classes = int(labels.max()) + 1
    sums = torch.zeros(n_classes, f.shape[1]).index_add_(0, labels, f)
    count = torch.bincount(labels, minlength=n_classes).float()
    return F.normalize((sums[labels] - f) / (count[labels] - 1).clamp(min=1)[:, None], dim=-1)


def train_pixel_predictor(backbone: nn.Module, base: ArrayDataset, base_feats: torch.Tensor, epochs: int,
                          seed: int, lr: float = 1e-4, batch: int = 128) -> nn.Module:
    """A copy of ``backbone`` fine-tuned on the base images so that each drawing's feature points at
    its class's mean feature (the frozen backbone's ``base_feats``) without it, by the cosine loss:
    a centre predictor that reads the pixels, not the backbone's features. Its normalisation layers
    keep the backbone's statistics (eval mode throughout), so it starts as the backbone exactly."""
    import copy

    target = leave_one_out_means(base_feats, base.labels)
    g = copy.deepcopy(backbone).eval()  # normalisation statistics frozen: it starts as the backbone exactly
    for p in g.parameters():
        p.requires_grad_(True)
    opt = torch.optim.Adam(g.parameters(), lr)
    order_g = torch.Generator().manual_seed(seed_hash("pixel-predictor", seed))
    steps_per_epoch = -(-len(base) // batch)
    orders: list[torch.Tensor] = []

    def step_loss(step: int) -> torch.Tensor:
        epoch, i = divmod(step, steps_per_epoch)
        while len(orders) <= epoch:
            orders.append(torch.randperm(len(base), generator=order_g))
        ix = orders[epoch][i * batch:(i + 1) * batch]
        device = next(g.parameters()).device
        return (1 - F.cosine_similarity(g.forward_features(base.float_images(ix).to(device)),
                                        target[ix].to(device))).mean()

    run_steps(step_loss, opt, None, epochs * steps_per_epoch, name="pixel predictor", hint="lower pixel_lr")
    for p in g.parameters():
        p.requires_grad_(False)
    return g.eval()


def affine_pool(shots: torch.Tensor, o: SteeredOptions, stream: tuple = ()) -> torch.Tensor:
    """``o.pool`` random affine redrawings (N, pool, C, H, W) uint8 of each shot (N, C, H, W) uint8;
    shot n's redrawings depend only on its index, the seed and ``stream`` (e.g. a class)."""
    import kornia.augmentation as K

    aug = K.RandomAffine(degrees=o.degrees, translate=(o.translate, o.translate), scale=tuple(o.scale),
                         shear=o.shear, p=1.0)
    out = []
    for n in range(len(shots)):
        torch.manual_seed(seed_hash("steered-pool", o.seed, *stream, n))
        x = aug(shots[n:n + 1].float().div(255).expand(o.pool, *shots.shape[1:]))
        out.append(to_uint8(x))
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
        self.regressors: list[CentreRegressor] = []
        self.pixel: nn.Module | None = None  # the pixel predictor (target pixel+regressor)
        self.history: list[float] = []

    @staticmethod
    def _features(backbone: nn.Module, images: torch.Tensor) -> torch.Tensor:
        from fewgen.evaluation.features import extract_features

        return extract_features(backbone, images, device=next(backbone.parameters()).device)

    def fit(self, backbone: nn.Module, base: ArrayDataset) -> SteeredRedrawings:
        """Train the regressor(s) on the frozen backbone's features of the base classes."""
        backbone.eval()
        feats = self._features(backbone, base.images)
        o = self.options
        fitted = [train_centre_regressor(feats, base.labels, replace(o, seed=o.seed + i)) for i in range(o.regressors)]
        self.regressors = [reg for reg, _ in fitted]
        if o.target == "pixel+regressor":
            self.pixel = train_pixel_predictor(backbone, base, feats, o.pixel_epochs, o.seed, o.pixel_lr)
        self.history = fitted[0][1]
        return self

    def predicted_centres(self, backbone: nn.Module, shots: torch.Tensor) -> torch.Tensor:
        """Where other drawings of each shot's class are predicted to lie (N, D), normalised."""
        if not self.regressors:
            raise FewgenError("fit the steered redrawings on the base classes first")
        with torch.no_grad():
            f = self._features(backbone, shots)
            if len(self.regressors) == 1:
                pred = F.normalize(self.regressors[0](f), dim=-1)
            else:
                pred = F.normalize(torch.stack([F.normalize(r(f), dim=-1) for r in self.regressors]).mean(0), dim=-1)
            if self.options.target == "pixel+regressor":
                if self.pixel is None:
                    raise FewgenError("the steered redrawings' pixel predictor is missing: fit them first")
                pred = F.normalize(pred + F.normalize(self._features(self.pixel, shots), dim=-1), dim=-1)
            return pred

    def generate(self, backbone: nn.Module, shots: torch.Tensor, keep: int | None = None,
                 stream: tuple = ()) -> torch.Tensor:
        """``keep`` (default ``options.keep``) steered redrawings of each shot (N, C, H, W) uint8:
        (N * keep, C, H, W), the redrawings of shot n at rows n * keep ... (n + 1) * keep - 1; the
        pool drawn from ``stream`` (:func:`affine_pool`)."""
        o = self.options
        keep = o.keep if keep is None else keep
        if not 1 <= keep <= o.pool:
            raise FewgenError(f"steered redrawings: {keep} kept per shot from a pool of {o.pool}; raise "
                              "generator.steered.pool to at least the images per shot")
        target = self.predicted_centres(backbone, shots)
        pool = affine_pool(shots, o, stream)
        feats = self._features(backbone, pool.flatten(0, 1)).view(len(shots), o.pool, -1)
        pick = steer(feats, target, keep)
        return torch.stack([pool[n, pick[n]] for n in range(len(shots))]).flatten(0, 1)

    def state(self) -> dict:
        """The options and the regressors' tensors (for a cache entry): the first's unprefixed, the
        i-th's under ``r<i>.``; the pixel predictor's (if any) under ``pixel.``."""
        tensors = {(k if i == 0 else f"r{i}.{k}"): v.detach().clone()
                   for i, reg in enumerate(self.regressors) for k, v in reg.state_dict().items()}
        if self.pixel is not None:
            tensors.update({f"pixel.{k}": v.detach().clone() for k, v in self.pixel.state_dict().items()})
        return {"options": asdict(self.options), "tensors": tensors}

    def load_pixel(self, backbone: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
        """The pixel predictor from ``pixel.``-prefixed tensors: a copy of ``backbone`` with them."""
        import copy

        pixel = copy.deepcopy(backbone)
        pixel.load_state_dict({k[len("pixel."):]: v for k, v in tensors.items() if k.startswith("pixel.")})
        for p in pixel.parameters():
            p.requires_grad_(False)
        self.pixel = pixel.eval()


class SteeredGenerator:
    """Steered redrawings as a pipeline generator (``generator.kind=steered``, options
    ``generator.steered``): "trained" is the regressor, fitted on the base classes through the run's
    pretrained backbone; each novel class's images are steered redrawings of its shots, image i from
    shot i mod K, ``ceil(synthesis.synthetic_per_class / K)`` kept per shot. The
    :class:`~fewgen.generators.protocol.Generator` interface; nothing is adapted."""

    kind = "steered"
    parallel_sampling = False  # one backbone pass per class; the choice needs the whole pool

    def __init__(self, options: SteeredOptions, backbone: nn.Module, device: torch.device | str = "cpu"):
        if backbone is None:
            raise FewgenError("steered redrawings read the shots through the run's pretrained backbone: put "
                              "'pretrain' before 'generator' in pipeline")
        options.check_run(0)
        # in a run the kept count follows from synthesis.synthetic_per_class (synthesis_sample_fn)
        self.steerer = SteeredRedrawings(replace(options, keep=min(options.keep, options.pool)))
        self.backbone = backbone.eval()
        self.device = torch.device(device)
        self.trained_key: str | None = None

    @property
    def options(self) -> SteeredOptions:
        return self.steerer.options

    @classmethod
    def from_options(cls, g: SteeredOptions, base: ArrayDataset, encoder: nn.Module,
                     device: torch.device | str = "cpu"):
        """Untrained, from options ``g`` (the section ``generator.steered``) and the backbone."""
        return cls(replace(g), encoder, device)

    def num_parameters(self) -> int:
        dim, h = self.backbone.num_features, self.options.regressor_hidden
        pixel = sum(p.numel() for p in self.backbone.parameters()) if self.options.target == "pixel+regressor" else 0
        return (2 * dim * h + h + dim) * self.options.regressors + pixel

    def fit(self, dataset: ArrayDataset, log=None, **_ignored):
        """Fit the regressor (and, with ``target=pixel+regressor``, the pixel predictor) on the base
        classes (``generator.steered.regressor_*``, ``pixel_*``; the base generator's steps, batch and
        learning rate do not apply). A :class:`FitResult`."""
        import time

        from fewgen.generators.pixels import FitResult

        t0 = time.time()
        self.steerer.fit(self.backbone, dataset)
        seconds = time.time() - t0
        if log:
            pixel = (f", pixel predictor {self.options.pixel_epochs} epochs" if self.options.target == "pixel+regressor"
                     else "")
            log(f"[steered] regressor: {self.options.regressor_steps} steps, loss {self.steerer.history[0]:.4f} -> "
                f"{sum(self.steerer.history[-50:]) / len(self.steerer.history[-50:]):.4f}{pixel} ({seconds:.0f}s)")
        return FitResult(self.options.regressor_steps, self.steerer.history, seconds,
                         512 * self.options.regressor_steps / max(seconds, 1e-9))

    def save(self, folder, meta: dict | None = None) -> None:
        from pathlib import Path

        from fewgen.checkpoint import save_tensors
        from fewgen.utils import write_json

        folder = Path(folder)
        save_tensors(folder / "generator.safetensors", self.steerer.state()["tensors"], meta)
        write_json(folder / "generator.json", {"kind": self.kind, "options": asdict(self.options),
                                               "dim": int(self.backbone.num_features)})

    @classmethod
    def load_trained(cls, folder, encoder: nn.Module, device: torch.device | str = "cpu") -> SteeredGenerator:
        from pathlib import Path

        from fewgen.checkpoint import load_tensors
        from fewgen.utils import read_json

        folder = Path(folder)
        info = read_json(folder / "generator.json")
        if info.get("kind") != cls.kind:
            raise FewgenError(f"{folder} holds a {info.get('kind')!r} generator, not steered redrawings")
        gen = cls(SteeredOptions(**info["options"]), encoder, device)
        tensors = load_tensors(folder / "generator.safetensors")[0]
        for i in range(gen.options.regressors):  # regressor 0's tensors unprefixed, regressor i's under "r<i>."
            reg = CentreRegressor(int(info["dim"]), gen.options.regressor_hidden)
            names = reg.state_dict().keys()
            reg.load_state_dict({k: tensors[k if i == 0 else f"r{i}.{k}"] for k in names})
            gen.steerer.regressors.append(reg.eval())
        if gen.options.target == "pixel+regressor":
            gen.steerer.load_pixel(gen.backbone, tensors)
        return gen

    def state_key(self) -> str:
        from fewgen.utils import stable_hash

        return self.trained_key or stable_hash({"kind": self.kind, "options": asdict(self.options)})

    def adapt(self, few_shot, cfg, cache, parts, ctx=None, log=None, progress=False, log_dir=None):
        raise FewgenError("steered redrawings are drawn from the shots, not adapted: leave 'adapt' out of pipeline")

    def synthesis_sample_fn(self, spec, adapter, image_shape, sources: list[torch.Tensor] | None = None):
        """sample_fn(class, seeds, image indices): image i of class c is the (i // K)-th steered
        redrawing of shot i mod K (``sources[c]``, K shots), from a pool drawn from (synthesis seed, c)."""
        import math

        if sources is None:
            raise FewgenError("steered redrawings are drawn from the shots: give each class's shots")
        made: dict[int, torch.Tensor] = {}

        def fn(c, seeds, indices):
            if c not in made:
                shots = sources[c]
                per_shot = math.ceil(spec.per_class / len(shots))
                images = self.steerer.generate(self.backbone, shots, keep=per_shot, stream=(spec.seed, c))
                made[c] = images.view(len(shots), per_shot, *images.shape[1:])
            k = len(sources[c])
            return torch.stack([made[c][i % k, i // k] for i in indices])
        return fn
