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


def _one_hot_means(x: torch.Tensor, y: torch.Tensor, n_classes: int,
                   weight: torch.Tensor | None = None) -> torch.Tensor:
    """x (E, S, D), y (E, S), weight (E, S) or None -> (weighted) class means (E, n_classes, D)."""
    onehot = F.one_hot(y, n_classes).to(x.dtype)  # (E, S, N)
    if weight is not None:
        onehot = onehot * weight.to(x.dtype).unsqueeze(-1)
    return onehot.transpose(1, 2) @ x / onehot.sum(1).clamp_min(1e-12).unsqueeze(-1)


@CLASSIFIERS.register("proto")
class PrototypeClassifier:
    """Cosine nearest-centroid."""

    def __init__(self, **_: object):
        self.prototypes: torch.Tensor | None = None

    def fit(self, support: torch.Tensor, labels: torch.Tensor, n_classes: int | None = None,
            sample_weight: torch.Tensor | None = None) -> PrototypeClassifier:
        """support: (E, S, D) features; labels: (E, S) in [0, N); sample_weight: (E, S) or None
        (each prototype is the weighted mean of its normalised supports)."""
        n = int(n_classes or labels.max() + 1)
        self.prototypes = F.normalize(_one_hot_means(F.normalize(support, dim=-1), labels, n, sample_weight), dim=-1)
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

    Solved every episode at once by gradient descent with Barzilai-Borwein steps (``solver="bb"``,
    the default; Barzilai & Borwein 1988), with accelerated gradient descent (FISTA with adaptive
    restart, O'Donoghue & Candes 2015) as the guaranteed fallback for any episode BB does not
    settle within ``bb_iters`` steps, or alone with ``solver="fista"``:

    * Features are centred on each episode's (weighted) support mean. With an unpenalised bias
      this is an exact reparameterisation (same W, shifted b), and it makes the Hessian bound
      block-diagonal, ``H <= diag(Xc^T Xc, sum w) / 2`` (the softmax Hessian is at most I/2),
      so W and b get their own step sizes 1/L.
    * BB's step is the inverse curvature measured along the last step, so it follows the actual
      Hessian, far below the worst-case bound once the softmax is confident: on Omniglot
      episodes it converges in 4-9 steps where FISTA needs 8-26. Its first step is the exact
      minimiser along the gradient of the quadratic model at zero.
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
    * ``weight`` is (E, N, D), as scikit-learn's ``coef_``; logits are computed class-major.
    """

    def __init__(self, c: float = 1.0, max_iter: int = 1000, tol: float = 1e-4, normalize: bool = True,
                 dtype: torch.dtype = torch.float32, form: str = "auto", check_every: int = 2, solver: str = "bb",
                 bb_iters: int = 50, **_: object):
        if form not in ("auto", "kernel", "primal"):
            raise ValueError(f"form must be auto, kernel or primal, got {form!r}")
        if solver not in ("bb", "fista"):
            raise ValueError(f"solver must be bb or fista, got {solver!r}")
        self.solver = solver
        self.bb_iters = max(1, int(bb_iters))
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
        gram = xc @ xc.transpose(1, 2) if kernel else None  # K, (E, S, S)
        if self.solver == "fista":
            coef, bias = self._fista(kernel, *self._gram_and_lipschitz(kernel, gram, xc, sw), xc, y, sw)
        else:
            # BB only needs a scale for its first step and its step bounds: the trace of
            # Xc^T diag(w) Xc bounds its largest eigenvalue and costs one pass over the support
            lip_w = 0.5 * (sw.view(e, s) * torch.linalg.vecdot(xc, xc)).sum(1) + 1.0 / self.c
            coef, bias, converged = self._bb(kernel, gram, xc, y, sw, lip_w)
            if not converged.all():  # the rare episode BB did not settle: FISTA from where it stopped
                left, bb_iter = (~converged).nonzero().view(-1), self.n_iter
                sub_gram, sub_lip = self._gram_and_lipschitz(kernel, gram[left] if kernel else None, xc[left],
                                                             sw[left])
                coef[left], bias[left] = self._fista(kernel, sub_gram, sub_lip, xc[left], y[left], sw[left],
                                                     init=(coef[left], bias[left]))
                self.n_iter += bb_iter
        weight = coef @ xc if kernel else coef  # (E, N, D)
        self.weight, self.bias = weight, bias  # (E, N, D) as scikit-learn's coef_, and (E, N, 1)
        return self

    def _gram_and_lipschitz(self, kernel, gram, xc, sw):
        """FISTA's constants: the Gram matrix it iterates with (K in the kernel form, Xc^T diag(w) Xc
        in the primal one) and the Lipschitz bound of the W-gradient, ``lambda_max / 2 + 1/C``."""
        if kernel:
            w_sqrt = sw.sqrt()
            return gram, 0.5 * self._lambda_max(gram * w_sqrt * w_sqrt.transpose(1, 2)) + 1.0 / self.c
        gram = xc.transpose(1, 2) @ (xc * sw.transpose(1, 2))  # (E, D, D)
        return gram, 0.5 * self._lambda_max(gram) + 1.0 / self.c

    def _bb(self, kernel, gram, xc, y, sw, lip_w):
        """Gradient descent with Barzilai-Borwein step sizes on every episode.

        Returns (coefficients, bias, converged (E,) bool). The step ``<s, s> / <s, dg>`` (BB1) is
        the inverse curvature measured along the last step, so it follows the actual Hessian,
        which is far below the worst-case bound ``L`` once the softmax is confident: episodes
        typically converge in a third of FISTA's iterations. BB has no global guarantee on
        non-quadratic problems, so steps are kept in ``[1/L, 1000/L]`` and an episode that is
        not converged after ``bb_iters`` steps (or went non-finite) is reported unconverged;
        :meth:`fit` finishes it with FISTA."""
        e, n, s = y.shape
        total_w = sw.sum((1, 2))
        weighted = not bool((sw == 1).all())
        inv_c = 1.0 / self.c
        eta_w = (1.0 / lip_w).view(e, 1, 1)
        # the bias moves in its own metric: its step is alpha * L / L_b (FISTA's 1/L_b at alpha = 1/L)
        c = {"xc": xc, "y": y, "sw": sw, "total": total_w, "eta": eta_w,
             "bscale": lip_w.view(e, 1, 1) / (0.5 * total_w).view(e, 1, 1)}
        if kernel:
            c["gram"] = gram
        else:
            c["xct"] = xc.transpose(1, 2).contiguous()
        m = s if kernel else xc.shape[2]
        p, b = y.new_zeros(e, n, m), y.new_zeros(e, n, 1)
        gp, gb = _gradient(kernel, c, p, b, p, inv_c, weighted)
        # first step: the exact minimiser along the gradient of the quadratic model at zero, where
        # the softmax is uniform and the Hessian is known in closed form,
        # H = (I - 11^T/N)/N (x) Xc^T diag(w) Xc + I/C for W and (I - 11^T/N) sum(w)/N for b
        gk = gp @ gram if kernel else gp @ c["xct"]  # gW Xc^T, (E, N, S)
        gw2 = _batch_dot(gk, gp) if kernel else _batch_dot(gp, gp)  # ||gW||^2
        gbc = gb - gb.mean(1, keepdim=True)
        bscale = c["bscale"].view(-1)
        num = gw2 + bscale * _batch_dot(gb, gb)
        den = (_batch_dot(gk * sw, gk) / n + gw2 * inv_c
               + total_w / n * bscale * bscale * _batch_dot(gbc, gbc))
        alpha0 = _bb_bounds(num / den.clamp_min(1e-30), eta_w.view(-1))
        st = {"p": p, "b": b, "lg": p if kernel else None, "alpha": alpha0.view(e, 1, 1), "gp": gp, "gb": gb}
        out_p, out_b = torch.zeros_like(p), torch.zeros_like(b)
        converged = torch.zeros(e, dtype=torch.bool)
        active = torch.arange(e)  # episode of each batch row
        finished = torch.zeros(e, dtype=torch.bool)  # per batch row: converged (answer recorded) or failed
        it = 0
        while it < self.bb_iters:
            it += 1
            a = st["alpha"]
            new_p = torch.addcmul(st["p"], a, st["gp"], value=-1.0)
            new_b = torch.addcmul(st["b"], a * c["bscale"], st["gb"], value=-1.0)
            new_lg = torch.addcmul(st["lg"], a, st["gp"] @ c["gram"], value=-1.0) if kernel else None
            gp, gb = _gradient(kernel, c, new_p, new_b, new_lg, inv_c, weighted)
            g_w = gp @ c["xc"] if kernel else gp
            worst = torch.maximum(g_w.abs().amax((1, 2)), gb.abs().amax((1, 2))) / c["total"]
            ok = (worst < self.tol) & ~finished
            if ok.any():  # record each episode's answer at its own first converged step
                out_p[active[ok]], out_b[active[ok]] = new_p[ok], new_b[ok]
                converged[active[ok]] = True
            finished |= ok | ~torch.isfinite(worst)
            if finished.all():
                break
            # BB1 step from the change of the point and of the gradient; in the kernel form the
            # point's change in W is dA Xc, so <dW, dW> = <dA K, dA> and <dW, dgW> = <dA K, dgA>
            sp, sb = new_p - st["p"], new_b - st["b"]
            dp = new_lg - st["lg"] if kernel else sp
            ss = _batch_dot(dp, sp) + _batch_dot(sb, sb) / c["bscale"].view(-1)
            sy = _batch_dot(dp, gp - st["gp"]) + _batch_dot(sb, gb - st["gb"])
            eta = c["eta"].view(-1)
            alpha = _bb_bounds(torch.where(sy > 0, ss / sy.clamp_min(1e-30), eta), eta).view(-1, 1, 1)
            st = {"p": new_p, "b": new_b, "lg": new_lg, "alpha": alpha, "gp": gp, "gb": gb}
            if finished.sum() * 4 >= len(finished):  # finished episodes leave the batch once they are many
                keep = ~finished
                active, finished, c, st = active[keep], finished[keep], _rows(c, keep), _rows(st, keep)
        if not converged.all():  # the last iterate of the unconverged ones, as a warm start
            rows = ~finished
            out_p[active[rows]], out_b[active[rows]] = st["p"][rows], st["b"][rows]
        self.n_iter = it
        return out_p, out_b, converged

    def _fista(self, kernel, gram, lip_w, xc, y, sw, init=None):
        """Runs FISTA on every episode; returns (coefficients (E, N, S or D), bias (E, N, 1)).

        Written for memory traffic: at few-shot sizes a step costs more in passes over the
        (E, N, S) tensors than in matmuls, so each elementwise stage is one fused op (softmax,
        ``addcmul``, ``baddbmm``) and the per-episode inner products are batched (``_batch_dot``)."""
        e, n, s = y.shape
        total_w = sw.sum((1, 2))
        weighted = not bool((sw == 1).all())
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
        p0, b0 = (zeros, y.new_zeros(e, n, 1)) if init is None else init
        state = {"p": p0, "b": b0, "t": y.new_ones(e, 1, 1)}
        state.update(zp=p0, zb=b0)
        if kernel:
            lg0 = zeros if init is None else p0 @ gram
            state.update(lg=lg0, zlg=lg0)
        out_p, out_b = zeros.clone(), y.new_zeros(e, n, 1)
        active = torch.arange(e)  # episode of each batch row
        finished = torch.zeros(e, dtype=torch.bool)  # per batch row: answer already recorded
        it = 0
        for it in range(1, self.max_iter + 1):
            c, st = const, state
            g, g_b = _gradient(kernel, c, st["zp"], st["zb"], st.get("zlg"), inv_c, weighted)
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
                        const = c = _rows(c, keep)
                        state = st = _rows(st, keep)
                        g, g_b = g[keep], g_b[keep]
            new_p = torch.addcmul(st["zp"], c["eta_w"], g, value=-1.0)
            new_b = torch.addcmul(st["zb"], c["eta_b"], g_b, value=-1.0)
            d_p, d_b = new_p - st["p"], new_b - st["b"]
            # adaptive restart where the step went uphill along the momentum: <grad, new - theta>,
            # in the kernel form <g, (new - p) K> = <g, new_lg - lg>
            if kernel:
                new_lg = torch.addcmul(st["zlg"], c["eta_w"], g @ c["gram"], value=-1.0)
                d_lg = new_lg - st["lg"]
                uphill = _batch_dot(g, d_lg)
            else:
                uphill = _batch_dot(g, d_p)
            restart = (uphill + _batch_dot(g_b, d_b) > 0).view(-1, 1, 1)
            t = st["t"]
            t_next = (1 + torch.sqrt(1 + 4 * t * t)) / 2
            mom = torch.where(restart, torch.zeros_like(t), (t - 1) / t_next)
            nxt = {"p": new_p, "b": new_b, "t": torch.where(restart, torch.ones_like(t_next), t_next),
                   "zp": torch.addcmul(new_p, mom, d_p), "zb": torch.addcmul(new_b, mom, d_b)}
            if kernel:
                nxt.update(lg=new_lg, zlg=torch.addcmul(new_lg, mom, d_lg))
            state = nxt
        self.n_iter = it
        return out_p, out_b

    def _logits_class_major(self, query: torch.Tensor) -> torch.Tensor:
        """query: (E, Q, D) -> logits (E, N, Q), as ``(W @ q^T) / ||q|| + (b - W @ mean)``: the same
        numbers as normalising and centring the queries first, without two passes over the
        (E, Q, D) query tensor. (E, N, D) x (E, D, Q) runs faster on CPU than (E, Q, D) x (E, D, N),
        and the class maximum over dim 1 is a fast reduction."""
        q = query.to(self.dtype)
        logits = self.weight @ q.transpose(1, 2)
        if self.normalize:
            logits = logits.mul_(q.norm(dim=-1).clamp_min_(1e-12).reciprocal_().unsqueeze(1))
        return logits.add_(self.bias - self.weight @ self.mean.transpose(1, 2))

    def decision_function(self, query: torch.Tensor) -> torch.Tensor:
        """query: (E, Q, D) -> logits (E, Q, N) (a view of the class-major logits)."""
        return self._logits_class_major(query).transpose(1, 2)

    def predict_proba(self, query: torch.Tensor) -> torch.Tensor:
        return self.decision_function(query).softmax(-1)

    def predict(self, query: torch.Tensor) -> torch.Tensor:
        return self._logits_class_major(query).max(1).indices


def _gradient(kernel: bool, c: dict, p: torch.Tensor, b: torch.Tensor, lg: torch.Tensor | None, inv_c: float,
              weighted: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradient of the summed objective at (p, b): (coefficients (E, N, S or D), bias (E, N, 1)).

    In the kernel form ``p`` are the coefficients A with the logits ``lg = A K`` carried along;
    in the primal form ``p`` is W. ``c`` holds the episodes' ``xc``, ``xct`` (primal), ``y``, ``sw``."""
    logits = lg + b if kernel else torch.baddbmm(b, p, c["xct"])
    r = torch.softmax(logits, 1).sub_(c["y"])  # residual (E, N, S)
    if weighted:
        r.mul_(c["sw"])
    g = torch.add(r, p, alpha=inv_c) if kernel else torch.baddbmm(p, r, c["xc"], beta=inv_c)
    return g, r.sum(2, keepdim=True)


def _bb_bounds(alpha: torch.Tensor, eta: torch.Tensor) -> torch.Tensor:
    """BB step sizes kept in [1/L, 1000/L] (``eta`` = 1/L per episode)."""
    return torch.clamp(alpha, min=eta, max=1000.0 * eta)


def _rows(d: dict, keep: torch.Tensor) -> dict:
    """The kept batch rows of every per-episode tensor in ``d`` (None stays None)."""
    return {k: (v[keep] if v is not None else None) for k, v in d.items()}


def _batch_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-episode inner products of (E, ...) tensors: (E,)."""
    e = a.shape[0]
    return torch.linalg.vecdot(a.reshape(e, -1), b.reshape(e, -1))


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
