"""Frozen-feature few-shot classifiers, batched over all episodes at once.

Both follow easyfsl's contract in batched form: ``fit(support, labels)`` then
``predict(query)``, with a leading episode dimension E.

* :class:`PrototypeClassifier` - nearest class centroid under cosine similarity
  (Snell et al. 2017 with cosine, as in Chen et al. 2019's Baseline++ evaluation).
* :class:`LogisticRegression` - multinomial logistic regression with an L2 penalty on
  L2-normalised features, the RFS / IER evaluation (Tian et al. 2020; Rizve et al. 2021),
  which fit scikit-learn's ``LogisticRegression`` per episode. Here every episode's
  convex problem is solved at once by batched accelerated gradient descent.
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
    """Batched multinomial logistic regression with scikit-learn's objective:

    ``min_{W,b} sum_i CE(W x_i + b, y_i) + ||W||^2 / (2C)`` per episode (bias unpenalised),
    on L2-normalised features when ``normalize`` is true.

    Solved by accelerated gradient descent (FISTA with adaptive restart, O'Donoghue & Candes
    2015) on explicit gradients. Features are centred on each episode's (weighted) support
    mean first: with an unpenalised bias this is an exact reparameterisation (same W, shifted
    b), and it makes the Hessian bound block-diagonal, ``H <= diag(Xc^T Xc, sum w) / 2`` (the
    softmax Hessian is at most I/2), so W and b get their own step sizes 1/L and the
    problem is far better conditioned. Every step is a couple of batched matmuls, so hundreds
    of episodes cost about as much as one. It stops when every episode's largest gradient
    entry of the mean objective is below ``tol`` (1e-4, scikit-learn's default for lbfgs).
    """

    def __init__(self, c: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, normalize: bool = True,
                 dtype: torch.dtype = torch.float32, **_: object):
        self.dtype = dtype
        self.c = c
        self.max_iter = max_iter
        self.tol = tol
        self.normalize = normalize
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.n_iter = 0

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return F.normalize(x, dim=-1) if self.normalize else x

    @staticmethod
    def _lambda_max(xa: torch.Tensor, iters: int = 30) -> torch.Tensor:
        """Largest eigenvalue of xa^T xa per episode, by power iteration on the smaller Gram."""
        gram = xa @ xa.transpose(1, 2) if xa.shape[1] <= xa.shape[2] else xa.transpose(1, 2) @ xa
        v = torch.ones(gram.shape[0], gram.shape[1], 1, dtype=xa.dtype)
        for _ in range(iters):
            v = gram @ v
            v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
        return (v.transpose(1, 2) @ gram @ v).reshape(-1) * 1.05 + 1e-12

    def fit(self, support: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None,
            sample_weight: torch.Tensor | None = None) -> LogisticRegression:
        """support: (E, S, D); labels: (E, S) in [0, N); sample_weight: (E, S) or None."""
        x = self._prep(support)
        e, s, d = x.shape
        n = int(n_classes or labels.max() + 1)
        sw = torch.ones(e, s, 1, dtype=x.dtype) if sample_weight is None else sample_weight.to(x.dtype).unsqueeze(-1)
        y = F.one_hot(labels, n).to(x.dtype)
        self.mean = (x * sw).sum(1, keepdim=True) / sw.sum(1, keepdim=True)
        xc = x - self.mean
        lip_w = 0.5 * self._lambda_max(xc * sw.sqrt()) + 1.0 / self.c  # (E,)
        lip_b = 0.5 * sw.sum((1, 2))
        # parameters as one (E, D+1, N) block: rows 0..D-1 = W, row D = bias
        step = torch.cat([(1.0 / lip_w).view(e, 1, 1).expand(e, d, 1), (1.0 / lip_b).view(e, 1, 1)], 1)
        reg = torch.ones(1, d + 1, 1, dtype=x.dtype)
        reg[:, d] = 0.0  # bias unpenalised
        x1 = torch.cat([xc, torch.ones(e, s, 1, dtype=x.dtype)], 2)
        x1t = x1.transpose(1, 2)

        def grad(t: torch.Tensor) -> torch.Tensor:
            p = (x1 @ t).softmax(-1)
            return x1t @ ((p - y) * sw) + reg * t / self.c

        theta = torch.zeros(e, d + 1, n, dtype=x.dtype)
        z, t_k = theta.clone(), torch.ones(e, 1, 1, dtype=x.dtype)
        it = 0
        for it in range(1, self.max_iter + 1):
            g = grad(z)
            if it % 10 == 0 and (g.abs().amax((1, 2)) / sw.sum((1, 2))).max() < self.tol:
                theta = z
                break
            new = z - step * g
            # adaptive restart: drop momentum where the step went uphill along the momentum
            restart = (g * (new - theta)).sum((1, 2), keepdim=True) > 0
            t_next = (1 + torch.sqrt(1 + 4 * t_k * t_k)) / 2
            mom = torch.where(restart, torch.zeros_like(t_k), (t_k - 1) / t_next)
            z = new + mom * (new - theta)
            theta, t_k = new, torch.where(restart, torch.ones_like(t_next), t_next)
        self.n_iter = it
        self.weight, self.bias = theta[:, :d].contiguous(), theta[:, d:].contiguous()
        return self

    def decision_function(self, query: torch.Tensor) -> torch.Tensor:
        """query: (E, Q, D) -> logits (E, Q, N)."""
        return (self._prep(query) - self.mean) @ self.weight + self.bias

    def predict_proba(self, query: torch.Tensor) -> torch.Tensor:
        return self.decision_function(query).softmax(-1)

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        return self.decision_function(query).argmax(-1)


def create_classifier(name: str, **kwargs):
    return CLASSIFIERS.get(name)(**kwargs)
