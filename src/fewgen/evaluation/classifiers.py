"""Frozen-feature few-shot classifiers, batched over all episodes at once.

Both follow easyfsl's contract in batched form: ``fit(support, labels)`` then
``predict(query)``, with a leading episode dimension E.

* :class:`PrototypeClassifier` - nearest class centroid under cosine similarity
  (Snell et al. 2017 with cosine, as in Chen et al. 2019's Baseline++ evaluation).
* :class:`LogisticRegression` - multinomial logistic regression with an L2 penalty on
  L2-normalised features, the RFS / IER evaluation (Tian et al. 2020; Rizve et al. 2021),
  which fit scikit-learn's ``LogisticRegression`` per episode. Here every episode's
  convex problem is solved together by L-BFGS on the sum of their objectives; the sum is
  separable, so its minimiser is each episode's minimiser.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewgen.registry import Registry

CLASSIFIERS: Registry = Registry("classifier")


def _one_hot_means(x: torch.Tensor, y: torch.Tensor, n_classes: int) -> torch.Tensor:
    """x (E, S, D), y (E, S) -> class means (E, n_classes, D)."""
    onehot = F.one_hot(y, n_classes).to(x.dtype)  # (E, S, N)
    return onehot.transpose(1, 2) @ x / onehot.sum(1).clamp_min(1).unsqueeze(-1)


@CLASSIFIERS.register("proto")
class PrototypeClassifier:
    """Cosine nearest-centroid."""

    def __init__(self, **_: object):
        self.prototypes: torch.Tensor | None = None

    def fit(self, support: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None) -> PrototypeClassifier:
        """support: (E, S, D) features; labels: (E, S) in [0, N)."""
        n = int(n_classes or labels.max() + 1)
        self.prototypes = F.normalize(_one_hot_means(F.normalize(support, dim=-1), labels, n), dim=-1)
        return self

    def decision_function(self, query: torch.Tensor) -> torch.Tensor:
        """query: (E, Q, D) -> cosine scores (E, Q, N)."""
        return F.normalize(query, dim=-1) @ self.prototypes.transpose(1, 2)

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        return self.decision_function(query).argmax(-1)


@CLASSIFIERS.register("logreg")
class LogisticRegression:
    """Batched multinomial logistic regression, scikit-learn's objective:

    ``min_{W,b} sum_i CE(W x_i + b, y_i) + ||W||^2 / (2C)`` per episode (bias unpenalised),
    on L2-normalised features when ``normalize`` is true.
    """

    def __init__(self, c: float = 1.0, max_iter: int = 100, normalize: bool = True, **_: object):
        self.c = c
        self.max_iter = max_iter
        self.normalize = normalize
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.double()
        return F.normalize(x, dim=-1) if self.normalize else x

    def fit(self, support: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None,
            sample_weight: torch.Tensor | None = None) -> LogisticRegression:
        """support: (E, S, D); labels: (E, S) in [0, N); sample_weight: (E, S) or None."""
        x = self._prep(support)
        e, s, d = x.shape
        n = int(n_classes or labels.max() + 1)
        w = torch.zeros(e, d, n, dtype=x.dtype, requires_grad=True)
        b = torch.zeros(e, 1, n, dtype=x.dtype, requires_grad=True)
        sw = torch.ones(e, s, dtype=x.dtype) if sample_weight is None else sample_weight.to(x.dtype)
        opt = torch.optim.LBFGS([w, b], lr=1, max_iter=self.max_iter, history_size=20,
                                tolerance_grad=1e-9, tolerance_change=1e-12, line_search_fn="strong_wolfe")
        target = labels.reshape(-1)

        def closure() -> torch.Tensor:
            opt.zero_grad()
            logits = x @ w + b
            ce = F.cross_entropy(logits.reshape(-1, n), target, reduction="none").reshape(e, s)
            loss = (ce * sw).sum() + (w * w).sum() / (2 * self.c)
            loss.backward()
            return loss

        with torch.enable_grad():
            opt.step(closure)
        self.weight, self.bias = w.detach(), b.detach()
        return self

    def decision_function(self, query: torch.Tensor) -> torch.Tensor:
        """query: (E, Q, D) -> logits (E, Q, N)."""
        return self._prep(query) @ self.weight + self.bias

    def predict_proba(self, query: torch.Tensor) -> torch.Tensor:
        return self.decision_function(query).softmax(-1)

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        return self.decision_function(query).argmax(-1)


def create_classifier(name: str, **kwargs):
    return CLASSIFIERS.get(name)(**kwargs)
