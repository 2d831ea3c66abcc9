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
        return argmax_last(self.decision_function(query))


@CLASSIFIERS.register("logreg")
class LogisticRegression:
    """Batched multinomial logistic regression with scikit-learn's objective:

    ``min_{W,b} sum_i w_i CE(W x_i + b, y_i) + ||W||^2 / (2C)`` per episode (bias unpenalised),
    on L2-normalised features when ``normalize`` is true.

    Solved by accelerated gradient descent (FISTA with adaptive restart, O'Donoghue & Candes
    2015), every episode at once:

    * Features are centred on each episode's (weighted) support mean. With an unpenalised bias
      this is an exact reparameterisation (same W, shifted b), and it makes the Hessian bound
      block-diagonal, ``H <= diag(Xc^T Xc, sum w) / 2`` (the softmax Hessian is at most I/2),
      so W and b get their own step sizes 1/L.
    * Few-shot supports are smaller than the feature size, so the iterations run in the
      *kernel form* there: started from zero, every gradient step keeps ``W = A Xc`` in the
      span of the support, so gradient descent on W is exactly gradient descent on the (N, S)
      coefficients A, with logits ``A K + b``, ``K = Xc Xc^T``. A step is one (N, S) x (S, S)
      matmul per episode instead of two (N, D) x (D, S) ones, with the same iterates. When the
      support is larger than the feature size the primal form is cheaper and is used instead
      (``form="auto"``).
    * Tensors are laid out class-major, (E, N, S), which suits CPU batched matmuls and the
      softmax over few classes far better than (E, S, N).
    * An episode stops when its largest gradient entry of the mean objective is below ``tol``
      (1e-4, scikit-learn's default for lbfgs); finished episodes leave the batch, so the rest
      iterate on a smaller one. The answer of an episode does not depend on the others.
    """

    def __init__(self, c: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, normalize: bool = True,
                 dtype: torch.dtype = torch.float32, form: str = "auto", check_every: int = 2, **_: object):
        if form not in ("auto", "kernel", "primal"):
            raise ValueError(f"form must be auto, kernel or primal, got {form!r}")
        self.dtype = dtype
        self.c = c
        self.max_iter = max_iter
        self.tol = tol
        self.normalize = normalize
        self.form = form
        self.check_every = max(1, int(check_every))
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None
        self.mean: torch.Tensor | None = None
        self.n_iter = 0

    def _prep(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        return F.normalize(x, dim=-1) if self.normalize else x

    @staticmethod
    def _lambda_max(gram: torch.Tensor, iters: int = 20) -> torch.Tensor:
        """Largest eigenvalue of a batch of PSD matrices (E, M, M), by power iteration, with margin."""
        v = torch.ones(gram.shape[0], gram.shape[1], 1, dtype=gram.dtype)
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
        sw = torch.ones(e, 1, s, dtype=x.dtype) if sample_weight is None else sample_weight.to(x.dtype).view(e, 1, s)
        y = F.one_hot(labels, n).to(x.dtype).transpose(1, 2).contiguous()  # (E, N, S)
        self.mean = (sw @ x) / sw.sum(2, keepdim=True)  # (E, 1, D)
        xc = x - self.mean
        kernel = self.form == "kernel" or (self.form == "auto" and s <= d)
        if kernel:
            gram = xc @ xc.transpose(1, 2)  # K, (E, S, S)
            w_sqrt = sw.sqrt()
            lip_w = 0.5 * self._lambda_max(gram * w_sqrt * w_sqrt.transpose(1, 2)) + 1.0 / self.c
        else:
            gram = xc.transpose(1, 2) @ (xc * sw.transpose(1, 2))  # Xc^T diag(w) Xc, (E, D, D)
            lip_w = 0.5 * self._lambda_max(gram) + 1.0 / self.c
        coef, bias = self._fista(kernel, gram, xc, y, sw, lip_w)
        weight = coef @ xc if kernel else coef  # (E, N, D)
        self.weight, self.bias = weight.transpose(1, 2).contiguous(), bias.transpose(1, 2).contiguous()
        return self

    def _fista(self, kernel, gram, xc, y, sw, lip_w):
        """Runs FISTA on every episode; returns (coefficients (E, N, S or D), bias (E, N, 1))."""
        e, n, s = y.shape
        total_w = sw.sum((1, 2))
        inv_c = 1.0 / self.c
        # per-episode constants; rows leave together when their episode finishes
        const = {"gram": gram, "xc": xc, "y": y, "sw": sw, "total": total_w,
                 "eta_w": (1.0 / lip_w).view(e, 1, 1), "eta_b": (1.0 / (0.5 * total_w)).view(e, 1, 1)}
        if not kernel:
            const["xct"] = xc.transpose(1, 2).contiguous()
        m = s if kernel else xc.shape[2]
        zeros = y.new_zeros(e, n, m)
        # theta = (p, b) and the extrapolated point z = (zp, zb); in the kernel form the logits
        # p @ K are carried along (lg, zlg) so a step needs a single matmul
        state = {"p": zeros, "b": y.new_zeros(e, n, 1), "t": y.new_ones(e, 1, 1)}
        state.update(zp=state["p"], zb=state["b"])
        if kernel:
            state.update(lg=zeros, zlg=zeros)
        out_p, out_b = zeros.clone(), y.new_zeros(e, n, 1)
        active = torch.arange(e)  # episode of each batch row
        finished = torch.zeros(e, dtype=torch.bool)  # per batch row: answer already recorded
        it = 0
        for it in range(1, self.max_iter + 1):
            c, st = const, state
            logits = (st["zlg"] if kernel else st["zp"] @ c["xct"]) + st["zb"]
            prob = (logits - logits.amax(1, keepdim=True)).exp_()
            r = (prob.div_(prob.sum(1, keepdim=True)) - c["y"]).mul_(c["sw"])  # weighted residual (E, N, S)
            g = r + st["zp"] * inv_c if kernel else torch.baddbmm(st["zp"], r, c["xc"], beta=inv_c)
            g_b = r.sum(2, keepdim=True)
            if it % self.check_every == 0 or it == self.max_iter:
                g_w = g @ c["xc"] if kernel else g
                worst = torch.maximum(g_w.abs().amax((1, 2)), g_b.abs().amax((1, 2))) / c["total"]
                new = ((worst < self.tol) | (it == self.max_iter)) & ~finished
                if new.any():  # record each episode's answer at its own first converged step
                    out_p[active[new]], out_b[active[new]] = st["zp"][new], st["zb"][new]
                    finished |= new
                    if finished.all():
                        break
                    if finished.sum() * 4 >= len(finished):  # drop finished rows once they are many
                        keep = ~finished
                        active, finished = active[keep], finished[keep]
                        const = c = {k: v[keep] for k, v in c.items()}
                        state = st = {k: v[keep] for k, v in st.items()}
                        g, g_b = g[keep], g_b[keep]
            new_p = st["zp"] - c["eta_w"] * g
            new_b = st["zb"] - c["eta_b"] * g_b
            # adaptive restart where the step went uphill along the momentum: <grad, new - theta>,
            # in the kernel form <g, (new - p) K> = <g, new_lg - lg>
            if kernel:
                new_lg = st["zlg"] - c["eta_w"] * (g @ c["gram"])
                uphill = (g * (new_lg - st["lg"])).sum((1, 2))
            else:
                uphill = (g * (new_p - st["p"])).sum((1, 2))
            uphill = uphill + (g_b * (new_b - st["b"])).sum((1, 2))
            restart = (uphill > 0).view(-1, 1, 1)
            t = st["t"]
            t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
            mom = torch.where(restart, torch.zeros_like(t), (t - 1) / t_next)
            nxt = {"p": new_p, "b": new_b, "t": torch.where(restart, torch.ones_like(t_next), t_next),
                   "zp": new_p + mom * (new_p - st["p"]), "zb": new_b + mom * (new_b - st["b"])}
            if kernel:
                nxt.update(lg=new_lg, zlg=new_lg + mom * (new_lg - st["lg"]))
            state = nxt
        self.n_iter = it
        return out_p, out_b

    def decision_function(self, query: torch.Tensor) -> torch.Tensor:
        """query: (E, Q, D) -> logits (E, Q, N).

        Computed as ``(q @ W) / ||q|| + (b - mean @ W)``: the same numbers as normalising and
        centring the queries first, without two passes over the (E, Q, D) query tensor."""
        q = query.to(self.dtype)
        logits = q @ self.weight
        if self.normalize:
            logits = logits.mul_(q.norm(dim=-1, keepdim=True).clamp_min_(1e-12).reciprocal_())
        return logits.add_(self.bias - self.mean @ self.weight)

    def predict_proba(self, query: torch.Tensor) -> torch.Tensor:
        return self.decision_function(query).softmax(-1)

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        return argmax_last(self.decision_function(query))


def argmax_last(scores: torch.Tensor) -> torch.Tensor:
    """``scores.argmax(-1)`` for a short last dimension (classes), as a running maximum over it.

    PyTorch's CPU argmax over a last dimension of 5-20 entries is several times slower than
    N elementwise passes over the other dimensions; ties go to the first index, as argmax."""
    n = scores.shape[-1]
    if n > 64 or scores.device.type != "cpu":
        return scores.argmax(-1)
    best = scores[..., 0].clone()
    index = torch.zeros(best.shape, dtype=torch.long, device=scores.device)
    for j in range(1, n):
        col = scores[..., j]
        better = col > best
        best = torch.where(better, col, best)
        index.masked_fill_(better, j)
    return index


def create_classifier(name: str, **kwargs):
    return CLASSIFIERS.get(name)(**kwargs)
