"""Loss terms for learning with synthetic data, as pure functions.

* :func:`mmd` - multi-kernel maximum mean discrepancy with Gaussian kernels (Gretton et al.
  2012; the multi-kernel form of Long et al. 2015), used by DiffAlign to align real and
  synthetic feature distributions.
* :func:`label_smoothed_ce` - cross-entropy against ``(1 - eps) * onehot + eps / C``
  (Szegedy et al. 2016), DiffAlign's loss on synthetic images.
* :func:`hallucination_kl` - KL from hallucinated soft labels to the model's prediction
  (Jian & Torresani 2022, "Label Hallucination for Few-Shot Classification").
* :func:`hallucinate_labels` - the soft labels themselves: a classifier fitted on the
  support set of the novel classes labels base images with distributions over novel classes.
* :func:`datadream_loss` - ``lambda * CE(real) + (1 - lambda) * CE(synthetic)`` (Kim et al.
  2024, "DataDream: Few-shot Guided Dataset Generation").
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def gaussian_kernel_sum(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float]) -> torch.Tensor:
    """``sum_s exp(-||x_i - y_j||^2 / (2 s^2))``; x (n, D), y (m, D) -> (n, m)."""
    d2 = torch.cdist(x, y).pow(2)
    return sum(torch.exp(-d2 / (2.0 * s * s)) for s in bandwidths)


def mmd(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float] = (0.5, 1.0, 2.0)) -> torch.Tensor:
    """Biased estimate of the squared multi-kernel MMD between two samples.

    ``MMD^2 = mean_ij k(x_i, x_j) + mean_ij k(y_i, y_j) - 2 mean_ij k(x_i, y_j)`` with
    ``k = sum_s exp(-||a - b||^2 / (2 s^2))`` over the bandwidths ``s``.

    Args:
        x: first sample (e.g. real features), shape (n, D).
        y: second sample (e.g. synthetic features), shape (m, D).
        bandwidths: Gaussian kernel widths (same units as the features).

    Returns:
        a scalar tensor, differentiable in x and y; zero when the samples are identical.
    """
    if x.dim() != 2 or y.dim() != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd needs (n, D) and (m, D) inputs, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not len(bandwidths):
        raise ValueError("mmd needs at least one bandwidth")
    kxx = gaussian_kernel_sum(x, x, bandwidths).mean()
    kyy = gaussian_kernel_sum(y, y, bandwidths).mean()
    kxy = gaussian_kernel_sum(x, y, bandwidths).mean()
    return kxx + kyy - 2 * kxy


def label_smoothed_ce(logits: torch.Tensor, target: torch.Tensor, smoothing: float = 0.1) -> torch.Tensor:
    """Mean cross-entropy of logits (B, C) against labels (B,) smoothed by ``smoothing``.

    Equal to ``(1 - eps) * CE(logits, y) + eps * mean_c(-log p_c)``.
    """
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(f"label smoothing must be in [0, 1), got {smoothing}")
    logp = logits.log_softmax(-1)
    nll = -logp.gather(1, target[:, None]).squeeze(1)
    uniform = -logp.mean(-1)
    return ((1 - smoothing) * nll + smoothing * uniform).mean()


def hallucination_kl(logits: torch.Tensor, soft_labels: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(q || softmax(logits / T))`` averaged over the batch, times ``T^2`` (Hinton et al.).

    Args:
        logits: model logits over the novel classes for base images, shape (B, C).
        soft_labels: hallucinated label distributions q, shape (B, C), rows summing to 1.
    """
    logp = (logits / temperature).log_softmax(-1)
    q = soft_labels.clamp_min(0)
    kl = (q * (q.clamp_min(1e-12).log() - logp)).sum(-1)
    return kl.mean() * temperature**2


@torch.no_grad()
def hallucinate_labels(support: torch.Tensor, support_labels: torch.Tensor, base: torch.Tensor, n_classes: int,
                       temperature: float = 1.0, c: float = 1.0, max_iter: int = 100) -> torch.Tensor:
    """Soft labels over the novel classes for base images (label hallucination).

    A logistic regression (fewgen's batched L-BFGS one, scikit-learn's objective on
    L2-normalised features) is fitted on the support features of the novel classes; its
    class probabilities on the base features, at ``temperature``, are the soft labels.

    Args:
        support: support features of the novel classes, shape (S, D).
        support_labels: their labels in [0, n_classes), shape (S,).
        base: base-image features, shape (M, D).

    Returns:
        soft labels, shape (M, n_classes), rows summing to 1.
    """
    from fewgen.evaluation.classifiers import LogisticRegression

    clf = LogisticRegression(c=c, max_iter=max_iter).fit(support[None], support_labels[None], n_classes=n_classes)
    logits = clf.decision_function(base[None])[0]
    return (logits / temperature).softmax(-1).float()


def datadream_loss(logits_real: torch.Tensor, y_real: torch.Tensor, logits_synthetic: torch.Tensor,
                   y_synthetic: torch.Tensor, lam: float = 0.8) -> dict[str, torch.Tensor]:
    """DataDream's classifier loss as its two weighted terms.

    ``lambda * CE(real) + (1 - lambda) * CE(synthetic)``; a part with no images in the batch
    contributes zero. Returns ``{"real": ..., "synthetic": ...}`` (already weighted).
    """
    zero = logits_real.sum() * 0 + logits_synthetic.sum() * 0
    real = F.cross_entropy(logits_real, y_real) if len(y_real) else zero
    synthetic = F.cross_entropy(logits_synthetic, y_synthetic) if len(y_synthetic) else zero
    return {"real": lam * real, "synthetic": (1 - lam) * synthetic}
