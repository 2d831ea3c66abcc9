"""The evaluation protocol: episodes -> per-episode accuracy -> mean and 95% CI rows.

Accuracy and its 95% confidence interval (t-distribution) are in percent, pooled over
all episodes of all seeds of one (N, K) setting.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from fewgen.data.fewshot import Episodes
from fewgen.evaluation.classifiers import create_classifier
from fewgen.options import opt


def mean_ci95(values: np.ndarray | list[float]) -> tuple[float, float]:
    """Mean and half-width of the 95% t-interval of ``values`` (same units)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    if len(v) < 2:
        return float(v.mean()) if len(v) else float("nan"), float("nan")
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean()), float(half)


@dataclass
class ExtraSupportOptions:
    """How extra support images (generated, or augmented copies of the shots) join the frozen
    classifiers' supports: the ``eval.*`` keys the evaluation and the export read
    (:class:`ExtraSupport`)."""

    synthetic_weight: float = opt(1.0, "weight of each synthetic support image in the frozen-feature classifiers, "
                                  "relative to a real shot's 1 (prototype: weighted mean; logreg: weighted loss)", gt=0)
    augmented_weight: float = opt(1.0, "weight of each augmented copy in the frozen classifiers of the control "
                                  "(learner.augmented_control) and of export.extra=copies", gt=0)
    proto_share: float | None = opt(None, "proto only: the share of a class's synthetic and augmented support images "
                                    "in its prototype, (1 - share) mean(shots) + share mean(extra), instead of the "
                                    "per-image weights (null: per-image weights)", gt=0, max=0.95)


@dataclass
class EvalConfig(ExtraSupportOptions):
    """Episodes, classifiers and the extra supports of the frozen classifiers (``eval.synthetic_weight``, ...)."""

    n_ways: list[int] = opt([5], "episode ways", min=2, nonempty=True, unique=True)
    n_shots: list[int] = opt([1, 5], "shots per class (the few-shot set size K); 0 = every image of a class "
                             "(no queries left: only without evaluate and learn, as fewgen fit)", min=0, nonempty=True,
                             unique=True)
    n_query: int = opt(15, "queries per class per episode", min=1)
    episodes: int = opt(600, "episodes per (seed, N, K)", min=1)
    classifiers: list[str] = opt(["logreg", "proto"], "frozen-feature classifiers: logreg, proto", choices="classifier", nonempty=True,
                                  unique=True)
    all_way: bool = opt(True, "also classify all remaining novel images among all novel classes")
    logreg_c: float = opt(1.0, "inverse L2 strength of the logistic regression (scikit-learn's C)", gt=0)
    logreg_iters: int = opt(1000, "maximum iterations of the batched logistic regression", min=1)
    zero_shot: bool = opt(True, "with backbone.name=clip (a CLIPModel with its text tower): also a zero-shot row per "
                          "setting, each query classified by its nearest class prompt (eval.prompt), no shots used")
    prompt: str = opt("a photo of a {}.", "the class prompt of the zero-shot row ({} = the class name, underscores "
                      "read as spaces)")


@dataclass
class ExtraSupport:
    """Extra support images (synthetic ones) for frozen-feature classifiers, per (seed, K).

    Attributes:
        features: per (seed, K), features of the extra images, shape (M, D).
        labels: per (seed, K), their novel-class labels, shape (M,).
        weight: each extra image's weight in the fit, relative to a real shot's 1 (the prototype is
            a weighted mean; logistic regression weights its loss terms).
        per_class: use the first ``per_class`` extra images of each class (default: as many as the
            smallest class has), so every class gets the same number.
        weights: per (seed, K), a weight per extra image (M,), instead of ``weight`` for all.
        proto_share: for ``proto`` only: the share of a class's extra images in its prototype,
            ``(1 - share) * mean(shots) + share * mean(extra)`` (their relative weights kept), instead
            of per-image weights; logistic regression keeps the per-image weights.
    """

    features: dict[tuple[int, int], torch.Tensor]
    labels: dict[tuple[int, int], torch.Tensor]
    weight: float = 1.0
    per_class: int | None = None
    weights: dict[tuple[int, int], torch.Tensor] | None = None
    proto_share: float | None = None
    _tables: dict = field(default_factory=dict, repr=False)

    def _weights(self, key: tuple[int, int], idx: torch.Tensor) -> torch.Tensor:
        if self.weights is None:
            return torch.full(idx.shape, float(self.weight))
        return self.weights[key][idx].float()

    def table(self, seed: int, n_shot: int, n_classes: int) -> torch.Tensor:
        """Indices (n_classes, m) of each class's extra images."""
        key = (seed, n_shot)
        if key not in self._tables:
            y = self.labels[key]
            by_class = [(y == c).nonzero().squeeze(1) for c in range(n_classes)]
            m = min(len(ix) for ix in by_class)
            m = m if self.per_class is None else min(m, self.per_class)
            self._tables[key] = torch.stack([ix[:m] for ix in by_class])
        return self._tables[key]

    def _for(self, classifier: str | None, w: torch.Tensor, n_shot: int) -> torch.Tensor:
        """Weights (..., n_classes, m) as ``classifier`` reads them: for proto with ``proto_share``,
        each class's extra weights rescaled to sum to share / (1 - share) * K (the shots' total)."""
        if classifier != "proto" or self.proto_share is None:
            return w
        total = w.sum(-1, keepdim=True).clamp_min(1e-12)
        return w / total * (self.proto_share / (1.0 - self.proto_share) * n_shot)

    def for_episodes(self, classes: torch.Tensor, seed: int, n_shot: int, n_classes: int,
                     classifier: str | None = None):
        """(features (e, N*m, D), episode labels (e, N*m), weights (e, N*m)) for episode classes (e, N)."""
        idx = self.table(seed, n_shot, n_classes)[classes]  # (e, N, m)
        e, n, m = idx.shape
        xs = self.features[(seed, n_shot)][idx.reshape(e, -1)]
        ys = torch.arange(n).repeat_interleave(m).expand(e, -1)
        w = self._weights((seed, n_shot), idx.reshape(e, -1)).view(e, n, m)
        return xs, ys, self._for(classifier, w, n_shot).reshape(e, -1)

    def for_all_way(self, seed: int, n_shot: int, n_classes: int, classifier: str | None = None):
        """(features (M, D), novel labels (M,), weights (M,)) of every class's extra images."""
        table = self.table(seed, n_shot, n_classes)
        idx = table.reshape(-1)
        w = self._weights((seed, n_shot), idx).view(table.shape)
        return self.features[(seed, n_shot)][idx], self.labels[(seed, n_shot)][idx], \
            self._for(classifier, w, n_shot).reshape(-1)

    def images_per_class(self, seed: int, n_shot: int, n_classes: int) -> int:
        return int(self.table(seed, n_shot, n_classes).shape[1])


def episode_accuracies(
    features: torch.Tensor,
    episodes: Episodes,
    classifier: str,
    chunk: int = 200,
    classifier_kwargs: dict | None = None,
    extra_support: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> torch.Tensor:
    """Per-episode accuracy (E,) of a frozen-feature classifier.

    Args:
        features: features of the whole novel dataset, shape (n, D).
        episodes: indices into that dataset.
        classifier: ``logreg`` or ``proto``.
        extra_support: optional function of the episode classes (e, N) returning extra support
            features (e, S', D), their episode labels (e, S') and optionally their weights (e, S')
            relative to the real supports' 1 - e.g. synthetic images.
    """
    accs = []
    n_way, n_shot = episodes.n_way, episodes.n_shot
    # gathered into buffers reused across chunks: a fresh (chunk, N*Q, D) tensor per chunk is tens
    # of MB that the allocator maps and faults in anew every time
    d, rows = features.shape[1], min(chunk, episodes.n_episodes)
    sup_buf = features.new_empty(rows * n_way * n_shot, d)
    q_buf = features.new_empty(rows * n_way * episodes.n_query, d)
    for start in range(0, episodes.n_episodes, chunk):
        sl = slice(start, start + chunk)
        sup_idx, q_idx = episodes.support[sl], episodes.query[sl]
        e = sup_idx.shape[0]
        support = torch.index_select(features, 0, sup_idx.reshape(-1), out=sup_buf[:sup_idx.numel()]).view(e, -1, d)
        query = torch.index_select(features, 0, q_idx.reshape(-1), out=q_buf[:q_idx.numel()]).view(e, -1, d)
        y_sup = torch.arange(n_way).repeat_interleave(n_shot).expand(e, -1)
        y_q = torch.arange(n_way).repeat_interleave(episodes.n_query).expand(e, -1)
        weight = None
        if extra_support is not None:
            xs, ys, *ws = extra_support(episodes.classes[sl])
            if ws and ws[0] is not None:
                weight = torch.cat([torch.ones(y_sup.shape), ws[0].to(torch.float32)], 1)
            support = torch.cat([support, xs], 1)
            y_sup = torch.cat([y_sup, ys], 1)
        clf = create_classifier(classifier, **(classifier_kwargs or {}))
        clf.fit(support, y_sup, n_classes=n_way, sample_weight=weight)
        accs.append((clf.predict(query) == y_q).double().mean(1))
    return torch.cat(accs)


def all_way_accuracy(features: torch.Tensor, labels: torch.Tensor, support_idx: torch.Tensor,
                     query_idx: torch.Tensor, classifier: str, classifier_kwargs: dict | None = None,
                     extra: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Correctness (M,) of each remaining novel image classified among all novel classes.

    ``extra``: optional extra supports (features (M', D), class labels (M',), weights (M',)), e.g.
    synthetic images, fitted beside the real shots (weight 1).

    The logistic regression runs to ``tol=1e-7`` here (a single problem, so the cost is nothing):
    with hundreds of classes the mean objective's gradient starts near the episodes' 1e-4, which
    stops solvers at points up to a point of accuracy apart (Omniglot 200-way 1-shot: 72.3 or 72.8
    at 1e-4, 73.5 for both solvers converged)."""
    n_classes, n_shot = support_idx.shape
    support = features[support_idx.reshape(-1)].unsqueeze(0)
    y_sup = torch.arange(n_classes).repeat_interleave(n_shot).unsqueeze(0)
    weight = None
    if extra is not None:
        xs, ys, ws = extra
        weight = torch.cat([torch.ones(y_sup.shape[1]), ws.float()])[None]
        support = torch.cat([support, xs[None]], 1)
        y_sup = torch.cat([y_sup, ys[None]], 1)
    kwargs = {"tol": 1e-7, **(classifier_kwargs or {})} if classifier == "logreg" else classifier_kwargs or {}
    clf = create_classifier(classifier, **kwargs)
    clf.fit(support, y_sup, n_classes=n_classes, sample_weight=weight)
    pred = clf.predict(features[query_idx].unsqueeze(0))[0]
    return (pred == labels[query_idx]).double()


def zero_shot_accuracies(features: torch.Tensor, weights: torch.Tensor, episodes: Episodes,
                         chunk: int = 200) -> torch.Tensor:
    """Per-episode accuracy (E,) of a classifier that uses no shots: each query goes to the episode
    class whose weight (e.g. CLIP's class-prompt embedding, (n_classes, D)) is nearest in cosine."""
    w = torch.nn.functional.normalize(weights.float(), dim=-1)
    accs = []
    y_q = torch.arange(episodes.n_way).repeat_interleave(episodes.n_query)
    for start in range(0, episodes.n_episodes, chunk):
        sl = slice(start, start + chunk)
        q = torch.nn.functional.normalize(features[episodes.query[sl].reshape(len(episodes.query[sl]), -1)], dim=-1)
        scores = torch.einsum("eqd,end->eqn", q, w[episodes.classes[sl]])
        accs.append((scores.argmax(-1) == y_q).double().mean(1))
    return torch.cat(accs)


def zero_shot_all_way(features: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor,
                      query_idx: torch.Tensor) -> torch.Tensor:
    """Correctness (M,) of each query classified among all classes by its nearest class weight."""
    w = torch.nn.functional.normalize(weights.float(), dim=-1)
    pred = (torch.nn.functional.normalize(features[query_idx], dim=-1) @ w.t()).argmax(-1)
    return (pred == labels[query_idx]).double()


def leave_one_out_accuracy(features: torch.Tensor, labels: torch.Tensor, n_classes: int, classifier: str,
                           classifier_kwargs: dict | None = None, chunk: int = 64) -> torch.Tensor:
    """Correctness (M,) of each shot classified by the head fitted on all the other shots: the
    accuracy estimate of a classifier that has no query images (``fewgen fit``). Only shots whose
    class keeps another shot are left out (M = shots of classes with two or more); the fits are
    batched as episodes. Features (S, D), labels (S,)."""
    counts = torch.bincount(labels, minlength=n_classes)
    left = (counts[labels] >= 2).nonzero().squeeze(1)
    s = len(labels)
    kwargs = {"tol": 1e-7, **(classifier_kwargs or {})} if classifier == "logreg" else classifier_kwargs or {}
    out = []
    for start in range(0, len(left), chunk):
        out_idx = left[start:start + chunk]
        keep = torch.ones(len(out_idx), s, dtype=torch.bool)
        keep[torch.arange(len(out_idx)), out_idx] = False
        rest = torch.arange(s).expand(len(out_idx), -1)[keep].view(len(out_idx), s - 1)
        clf = create_classifier(classifier, **kwargs)
        clf.fit(features[rest], labels[rest], n_classes=n_classes)
        pred = clf.predict(features[out_idx].unsqueeze(1))[:, 0]
        out.append((pred == labels[out_idx]).double())
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


def summary_row(method: str, n_way: int, n_shot: int, per_episode: list[torch.Tensor], seeds: list[int],
                **extra) -> dict:
    """One ``metrics.json`` row from the per-episode accuracies of each seed. The row keeps them, in
    percent, under ``_values`` (rows evaluated on the same episodes are compared pairwise:
    :func:`fewgen.reports.tables.comparisons`); keys starting with ``_`` are not written."""
    values = torch.cat(per_episode).numpy() * 100
    mean, half = mean_ci95(values)
    row = {
        "method": method, "n_way": n_way, "n_shot": n_shot,
        "accuracy": round(mean, 3), "ci95": round(half, 3),
        "episodes": int(len(values)), "seeds": list(seeds),
    }
    row.update(extra)
    row["_values"] = values  # per episode (or per query, all-way), in memory only: paired comparisons
    row["_seed_sizes"] = [len(p) for p in per_episode]  # where each seed's episodes end in _values
    return row
