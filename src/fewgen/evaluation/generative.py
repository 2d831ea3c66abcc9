"""Generative metrics shared by every fewgen generator (GANs, diffusion, Stable Diffusion).

Images everywhere are tensors of shape (n, C, H, W), either uint8 in [0, 255] or float in
[0, 1]. Nothing here imports diffusers or transformers at module level.

API
---
Feature networks (what FID / KID / realism / precision-recall look through):
    FeatureNet(backbone, image_size=None, channels=None)   nn.Module for torchmetrics: images -> (n, D)
    load_feature_net(spec, in_chans=..., backbone_name="conv4")  a FeatureNet from a fewgen backbone,
        a PretrainedBackbone, a fewgen backbone checkpoint (``.safetensors``) or ``clip:<local dir>``
    embed(feature_net, images, batch_size) -> (n, D)

Distribution distances:
    fid_kid(real_images, fake_images, feature_net, kid_subsets=50, kid_subset_size=100, seed=0)
        -> {"fid", "kid", "kid_std", "n_real", "n_fake"}      (torchmetrics FID and KID)
    fid_from_features(real_feats, fake_feats) -> float       (Frechet distance, float64)
    kid_from_features(real_feats, fake_feats, subsets, subset_size, seed) -> (mean, std)
    precision_recall(real_feats, fake_feats, k=3) -> {"precision", "recall"}  (Kynkaanniemi et al. 2019)

Few-shot diversity and memorisation (perceptual distances):
    PerceptualDistance(backbone=... | lpips_weights=path)    LPIPS-style distance on multi-layer maps
    intra_cluster_diversity(samples, shots, distance) -> {"intra_diversity", "cluster_sizes", ...}
        the intra-LPIPS protocol (Ojha et al. 2021): samples assigned to the nearest training shot,
        mean pairwise distance inside each cluster, averaged over clusters with >= 2 members
    nearest_shot_distance(samples, shots, distance) -> (n,)   per-sample distance to the closest shot

Realism (Zhao et al. 2022, Sec. 3):
    RealismClassifier(feature_net).fit(target_real, source_real) ; .predict_proba(images) -> (n,)
        P(target | image) from a logistic regression on frozen features, trained on *real*
        target images that are not the training shots versus real source images.

Everything together:
    generation_metrics(fake, shots, target_real, feature_net, distance, realism=None) -> dict
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from fewgen.data.images import resize, to_gray
from fewgen.errors import FewgenError

# ----------------------------------------------------------------------------- feature networks


def to_float_images(x: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [0, 1] images (n, C, H, W) -> float32 in [0, 1]."""
    if x.dim() != 4:
        raise FewgenError(f"images must have shape (n, C, H, W), got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        return x.float().div(255.0)
    return x.float()


def _match(x: torch.Tensor, channels: int | None, image_size: int | None) -> torch.Tensor:
    """Convert channels (1 <-> 3) and resize to what a network expects."""
    if channels is not None and x.shape[1] != channels:
        if x.shape[1] == 1:
            x = x.expand(-1, channels, -1, -1)
        elif channels == 1:
            x = to_gray(x)
        else:
            raise FewgenError(f"cannot feed {x.shape[1]}-channel images to a {channels}-channel network")
    if image_size is not None:
        x = resize(x, image_size, mode="bilinear", antialias=True)
    return x


class FeatureNet(nn.Module):
    """A frozen network mapping images (n, C, H, W) (uint8 or float [0, 1]) to features (n, D).

    Wraps anything with ``forward_features`` (every fewgen backbone); usable as the
    ``feature=`` argument of torchmetrics' FID and KID.
    """

    def __init__(self, backbone: nn.Module, image_size: int | None = None, channels: int | None = None):
        super().__init__()
        if not hasattr(backbone, "forward_features"):
            raise FewgenError(f"{type(backbone).__name__} has no forward_features(x); give a fewgen backbone")
        self.backbone = backbone
        self.image_size = image_size
        self.channels = channels
        self.num_features = int(backbone.num_features)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        device = next(self.backbone.parameters()).device
        x = _match(to_float_images(x).to(device), self.channels, self.image_size)
        was_training = self.backbone.training
        self.backbone.eval()  # BatchNorm statistics frozen, whatever mode the caller left it in
        feats = self.backbone.forward_features(x).float()
        self.backbone.train(was_training)
        return feats


class ClipImageFeatures(nn.Module):
    """CLIP image embeddings from a local transformers checkpoint (``CLIPVisionModelWithProjection``)."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import CLIPVisionModelWithProjection

        try:
            self.model = CLIPVisionModelWithProjection.from_pretrained(path, local_files_only=True,
                                                                       use_safetensors=True).eval()
        except OSError as e:
            raise FewgenError(f"cannot load a CLIP vision model from {path} ({e}); give a local checkpoint folder") from None
        self.model.requires_grad_(False)
        cfg = self.model.config
        self.image_size = int(cfg.image_size)
        self.num_features = int(cfg.projection_dim)
        # OpenAI CLIP normalisation constants
        self.register_buffer("mean", torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = _match(x, 3, self.image_size)
        return self.model(pixel_values=(x - self.mean) / self.std).image_embeds


def load_feature_net(spec: Any, in_chans: int = 3, backbone_name: str = "conv4", image_size: int | None = None,
                     device: torch.device | str = "cpu", **backbone_kwargs: Any) -> FeatureNet:
    """A :class:`FeatureNet` from a backbone, a ``PretrainedBackbone``, a checkpoint path or ``clip:<dir>``.

    Args:
        spec: an ``nn.Module`` with ``forward_features``; an object with ``.backbone``; a fewgen
            backbone checkpoint (``.safetensors``, architecture ``backbone_name``); or
            ``"clip:<local folder>"`` for a transformers CLIP vision checkpoint.
        in_chans: input channels of the backbone built for a checkpoint (images are converted).
    """
    if isinstance(spec, FeatureNet):
        return spec
    if hasattr(spec, "backbone") and isinstance(spec.backbone, nn.Module):
        spec = spec.backbone
    if isinstance(spec, nn.Module):
        in_ch = _first_conv_channels(spec)
        return FeatureNet(spec, image_size=image_size, channels=in_ch)
    text = str(spec)
    if text.startswith("clip:"):
        return FeatureNet(ClipImageFeatures(text[5:]).to(device), channels=3)
    path = Path(text)
    if not path.is_file():
        raise FewgenError(f"feature network {text!r} is neither a checkpoint file nor 'clip:<folder>'")
    from fewgen.backbones import create_backbone
    from fewgen.checkpoint import load_model

    backbone = create_backbone(backbone_name, in_chans=in_chans, **backbone_kwargs)
    try:
        load_model(path, backbone)
    except RuntimeError as e:
        raise FewgenError(f"{path} does not hold a {backbone_name} backbone with {in_chans} input channels "
                          f"({str(e).splitlines()[0]}); pass the matching backbone_name/in_chans") from None
    return FeatureNet(backbone.to(device), image_size=image_size, channels=in_chans)


def _first_conv_channels(module: nn.Module) -> int | None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


@torch.no_grad()
def embed(feature_net: nn.Module, images: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """Features (n, D) of images (n, C, H, W), in batches, on the CPU."""
    return torch.cat([feature_net(chunk).cpu() for chunk in torch.split(images, batch_size)])


# ----------------------------------------------------------------------------- FID / KID


class _GivenFeatures(nn.Module):
    """The "feature network" of torchmetrics' FID and KID when the features are already computed
    (the GAN tracker embeds the target images once): features in, the same features out."""

    def __init__(self, dim: int):
        super().__init__()
        self.num_features = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def fid_from_features(real_feats: torch.Tensor, fake_feats: torch.Tensor) -> float:
    """torchmetrics' Frechet distance between Gaussians fitted to two feature sets (n, D), (m, D),
    in float64: ``|mu_r - mu_f|^2 + tr(S_r) + tr(S_f) - 2 tr((S_r S_f)^(1/2))``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real_feats.shape[0] < 2 or fake_feats.shape[0] < 2:
        raise FewgenError(f"FID needs at least 2 real and 2 fake samples, got {real_feats.shape[0]} and "
                          f"{fake_feats.shape[0]}")
    fid = FrechetInceptionDistance(feature=_GivenFeatures(real_feats.shape[1]))
    fid.update(real_feats.double(), real=True)
    fid.update(fake_feats.double(), real=False)
    return float(fid.compute())


def kid_from_features(real_feats: torch.Tensor, fake_feats: torch.Tensor, subsets: int = 50,
                      subset_size: int = 100, seed: int = 0) -> tuple[float, float]:
    """torchmetrics' KID (Binkowski et al. 2018) of two feature sets: mean and std of the unbiased
    polynomial MMD^2 over ``subsets`` random subsets (seeded by ``seed``) of at most ``subset_size``."""
    from torchmetrics.image.kid import KernelInceptionDistance

    size = min(subset_size, real_feats.shape[0], fake_feats.shape[0])
    if size < 2:
        raise FewgenError(f"KID needs at least 2 real and 2 fake samples, got {real_feats.shape[0]} and "
                          f"{fake_feats.shape[0]}")
    with warnings.catch_warnings():  # KID warns that it buffers features: fine at our sizes
        warnings.simplefilter("ignore", UserWarning)
        kid = KernelInceptionDistance(feature=_GivenFeatures(real_feats.shape[1]), subsets=subsets, subset_size=size)
    kid.update(real_feats.double(), real=True)
    kid.update(fake_feats.double(), real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = kid.compute()
    return float(mean), float(std)


def fid_kid(real_images: torch.Tensor, fake_images: torch.Tensor, feature_net: Any, kid_subsets: int = 50,
            kid_subset_size: int = 100, batch_size: int = 256, seed: int = 0) -> dict[str, float]:
    """FID and KID of ``fake_images`` against ``real_images`` (torchmetrics), seen through ``feature_net``.

    Args:
        real_images, fake_images: (n, C, H, W) uint8 or float in [0, 1].
        feature_net: a :class:`FeatureNet` or anything :func:`load_feature_net` takes.
        kid_subset_size: capped at the smaller of the two sample counts.
        seed: seeds KID's random subsets (results are reproducible).
    Returns:
        ``{"fid", "kid", "kid_std", "n_real", "n_fake"}``.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    net = load_feature_net(feature_net)
    n_real, n_fake = len(real_images), len(fake_images)
    if n_real < 2 or n_fake < 2:
        raise FewgenError(f"FID/KID need at least 2 real and 2 fake images, got {n_real} and {n_fake}")
    size = min(kid_subset_size, n_real, n_fake)
    with warnings.catch_warnings():  # KID warns that it buffers features: fine at our sizes
        warnings.simplefilter("ignore", UserWarning)
        fid = FrechetInceptionDistance(feature=net, reset_real_features=True)
        kid = KernelInceptionDistance(feature=net, subsets=kid_subsets, subset_size=size, reset_real_features=True)
    for real, chunks in ((True, torch.split(real_images, batch_size)), (False, torch.split(fake_images, batch_size))):
        for chunk in chunks:
            x = to_float_images(chunk)
            fid.update(x, real=real)
            kid.update(x, real=real)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        kid_mean, kid_std = kid.compute()
    return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std),
            "n_real": n_real, "n_fake": n_fake}


# ----------------------------------------------------------------------------- precision / recall


def _kth_nn_radius(feats: torch.Tensor, k: int, batch: int = 1024) -> torch.Tensor:
    """Distance of each row to its k-th nearest other row, shape (n,)."""
    radii = []
    for chunk in torch.split(feats, batch):
        d = torch.cdist(chunk, feats)
        radii.append(d.kthvalue(k + 1, dim=1).values)  # +1: the point itself is at distance 0
    return torch.cat(radii)


def _covered(queries: torch.Tensor, refs: torch.Tensor, radii: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    out = []
    for chunk in torch.split(queries, batch):
        out.append((torch.cdist(chunk, refs) <= radii[None]).any(1))
    return torch.cat(out)


def precision_recall(real_feats: torch.Tensor, fake_feats: torch.Tensor, k: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019) on features (n, D) and (m, D).

    Each set's manifold is the union of balls around its points with radius the distance to
    the k-th nearest neighbour in the same set. Precision: share of fakes inside the real
    manifold (quality); recall: share of reals inside the fake manifold (coverage).
    """
    a, b = real_feats.double(), fake_feats.double()
    if a.shape[0] <= k or b.shape[0] <= k:
        raise FewgenError(f"precision/recall with k={k} needs more than {k} real and fake samples "
                          f"(got {a.shape[0]} and {b.shape[0]}); lower k or sample more")
    precision = _covered(b, a, _kth_nn_radius(a, k)).double().mean()
    recall = _covered(a, b, _kth_nn_radius(b, k)).double().mean()
    return {"precision": float(precision), "recall": float(recall)}


# ----------------------------------------------------------------------------- perceptual distance


class LPIPSAlex(nn.Module):
    """LPIPS (Zhang et al. 2018), AlexNet variant, built without the lpips or torchvision packages.

    Loads one local safetensors file holding torchvision AlexNet ``features.{0,3,6,8,10}.*``
    weights and the LPIPS linear heads ``lin{0..4}.model.1.weight`` (the keys of the lpips
    package's ``alex.pth`` merged with torchvision's ``alexnet`` state dict).
    """

    CHANNELS = (64, 192, 384, 256, 256)

    def __init__(self, weights: str | Path | None = None):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, 11, 4, 2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(64, 192, 5, padding=2), nn.ReLU(), nn.MaxPool2d(3, 2),
            nn.Conv2d(192, 384, 3, padding=1), nn.ReLU(),
            nn.Conv2d(384, 256, 3, padding=1), nn.ReLU(),
            nn.Conv2d(256, 256, 3, padding=1), nn.ReLU(),
        )
        self.lins = nn.ParameterList([nn.Parameter(torch.ones(c)) for c in self.CHANNELS])
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        if weights is not None:
            self.load(weights)
        self.eval().requires_grad_(False)

    def load(self, path: str | Path) -> None:
        from fewgen.checkpoint import load_tensors

        tensors, _ = load_tensors(path)
        feats = {k[len("features."):]: v for k, v in tensors.items() if k.startswith("features.")}
        try:
            self.features.load_state_dict(feats)
            for i, lin in enumerate(self.lins):
                lin.data.copy_(tensors[f"lin{i}.model.1.weight"].reshape(-1))
        except (RuntimeError, KeyError) as e:
            raise FewgenError(f"{path} is not an LPIPS-AlexNet weight file ({e}); see LPIPSAlex's docstring") from None

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """x: float images in [0, 1], (B, 3, H, W) -> the five ReLU maps LPIPS compares."""
        h = (x * 2 - 1 - self.shift) / self.scale
        maps = []
        for layer in self.features:
            h = layer(h)
            if isinstance(layer, nn.ReLU):
                maps.append(h)
        return maps


class PerceptualDistance:
    """LPIPS-style distance: ``d(x, y) = sum_l mean_hw || w_l * (n(f_l(x)) - n(f_l(y))) ||^2``.

    ``f_l`` are the maps of ``backbone.forward_maps`` (a fewgen backbone, no weights ``w``) or
    of LPIPS-AlexNet (``lpips_weights``: a local file, linear weights ``w``), and ``n``
    unit-normalises the channel vector at each position. Images are embedded once into
    per-layer flat vectors, so all pairwise distances are matrix products.
    """

    def __init__(self, backbone: nn.Module | None = None, lpips_weights: str | Path | None = None,
                 layers: list[int] | None = None, image_size: int | None = None, batch_size: int = 128):
        if (backbone is None) == (lpips_weights is None):
            raise FewgenError("PerceptualDistance needs exactly one of backbone= or lpips_weights=")
        if lpips_weights is not None:
            self.net: nn.Module = LPIPSAlex(lpips_weights)
            self.channels, self.image_size = 3, image_size or 64
        else:
            if hasattr(backbone, "backbone") and isinstance(backbone.backbone, nn.Module):
                backbone = backbone.backbone
            if not hasattr(backbone, "forward_maps"):
                raise FewgenError(f"{type(backbone).__name__} has no forward_maps(x); use a fewgen backbone")
            self.net = backbone
            self.channels, self.image_size = _first_conv_channels(backbone), image_size
        self.layers = layers
        self.batch_size = batch_size

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images (n, C, H, W) -> one (n, C_l * H_l * W_l) float tensor per layer."""
        was_training = self.net.training
        self.net.eval()
        device = next(self.net.parameters()).device
        per_layer: list[list[torch.Tensor]] = []
        for chunk in torch.split(images, self.batch_size):
            x = _match(to_float_images(chunk).to(device), self.channels, self.image_size)
            maps = self.net.forward_maps(x)
            chosen = [maps[i] for i in self.layers] if self.layers is not None else maps
            lins = getattr(self.net, "lins", None)
            for li, m in enumerate(chosen):
                m = m.float()
                m = m / (m.square().sum(1, keepdim=True).sqrt() + 1e-10)
                if lins is not None:
                    m = m * lins[li].clamp(min=0).sqrt().view(1, -1, 1, 1)
                m = m / math.sqrt(m.shape[-1] * m.shape[-2])  # so that the squared norm is a spatial mean
                if len(per_layer) <= li:
                    per_layer.append([])
                per_layer[li].append(m.flatten(1).cpu())
        self.net.train(was_training)
        return [torch.cat(parts) for parts in per_layer]

    @staticmethod
    def pairwise(emb_a: list[torch.Tensor], emb_b: list[torch.Tensor]) -> torch.Tensor:
        """All distances between two embedded sets: (n, m)."""
        total = None
        for a, b in zip(emb_a, emb_b):
            a64, b64 = a.double(), b.double()
            d = a64.square().sum(1, keepdim=True) + b64.square().sum(1)[None] - 2 * a64 @ b64.T
            total = d if total is None else total + d
        return total.clamp_min_(0).float()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Paired distances d(x_i, y_i): (n,)."""
        ex, ey = self.embed(x), self.embed(y)
        return sum((a - b).square().sum(1) for a, b in zip(ex, ey))


def intra_cluster_diversity(samples: torch.Tensor, shots: torch.Tensor, distance: PerceptualDistance,
                            max_per_cluster: int | None = None) -> dict[str, Any]:
    """Intra-cluster diversity (the intra-LPIPS protocol of Ojha et al. 2021).

    Args:
        samples: generated images (n, C, H, W), e.g. n = 1000.
        shots: the training images (k, C, H, W), e.g. k = 10.
        distance: the perceptual distance.
        max_per_cluster: cap cluster members (the first ones) to bound the O(n^2) pairs.
    Returns:
        ``intra_diversity``: mean over clusters with at least two members of the mean
        distance over pairs i < j inside the cluster (nan when no cluster has two members);
        ``cluster_sizes``: members per shot; ``clusters_used``.
    """
    es, et = distance.embed(samples), distance.embed(shots)
    assign = distance.pairwise(es, et).argmin(1)
    sizes = torch.bincount(assign, minlength=len(shots))
    means = []
    for c in range(len(shots)):
        idx = (assign == c).nonzero().squeeze(1)
        if max_per_cluster is not None:
            idx = idx[:max_per_cluster]
        if len(idx) < 2:
            continue
        d = distance.pairwise([e[idx] for e in es], [e[idx] for e in es])
        iu = torch.triu_indices(len(idx), len(idx), offset=1)
        means.append(float(d[iu[0], iu[1]].double().mean()))
    return {"intra_diversity": float(np.mean(means)) if means else float("nan"),
            "cluster_sizes": sizes.tolist(), "clusters_used": len(means)}


def nearest_shot_distance(samples: torch.Tensor, shots: torch.Tensor, distance: PerceptualDistance) -> torch.Tensor:
    """Perceptual distance of each sample to its closest training shot, shape (n,) (memorisation check)."""
    return distance.pairwise(distance.embed(samples), distance.embed(shots)).min(1).values


# ----------------------------------------------------------------------------- realism


class RealismClassifier:
    """P(target domain | image): logistic regression on frozen features (Zhao et al. 2022, Sec. 3).

    Trained on real target images that are *not* the training shots against real source
    images; ``holdout_accuracy`` is its balanced accuracy on a held-out fifth of both.
    """

    def __init__(self, feature_net: Any, c: float = 1.0, max_source: int = 4000):
        self.feature_net = load_feature_net(feature_net)
        self.c = c
        self.max_source = max_source
        self.holdout_accuracy = float("nan")

    def fit(self, target_real: torch.Tensor, source_real: torch.Tensor, seed: int = 0) -> RealismClassifier:
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        if len(target_real) < 5 or len(source_real) < 5:
            raise FewgenError(f"the realism classifier needs >= 5 real target and source images "
                              f"(got {len(target_real)} and {len(source_real)})")
        g = torch.Generator().manual_seed(seed)
        src = source_real[torch.randperm(len(source_real), generator=g)[: self.max_source]]
        x = torch.cat([embed(self.feature_net, target_real), embed(self.feature_net, src)]).numpy()
        y = np.r_[np.ones(len(target_real)), np.zeros(len(src))]
        rng = np.random.default_rng(seed)
        order = rng.permutation(len(y))
        n_val = len(y) // 5
        val, train = order[:n_val], order[n_val:]
        def make():
            return make_pipeline(StandardScaler(), LogisticRegression(C=self.c, max_iter=1000,
                                                                     class_weight="balanced"))
        probe = make().fit(x[train], y[train])
        pred = probe.predict(x[val])
        accs = [np.mean(pred[y[val] == cls] == cls) for cls in (0, 1) if np.any(y[val] == cls)]
        self.holdout_accuracy = float(np.mean(accs))
        self.model = make().fit(x, y)
        return self

    def predict_proba(self, images: torch.Tensor) -> torch.Tensor:
        """P(target) per image, shape (n,)."""
        if not hasattr(self, "model"):
            raise FewgenError("RealismClassifier.predict_proba before fit(target_real, source_real)")
        feats = embed(self.feature_net, images).numpy()
        return torch.from_numpy(self.model.predict_proba(feats)[:, 1]).float()


# ----------------------------------------------------------------------------- all together


def generation_metrics(fake: torch.Tensor, shots: torch.Tensor, target_real: torch.Tensor, feature_net: Any,
                       distance: PerceptualDistance, realism: RealismClassifier | None = None,
                       kid_subsets: int = 50, kid_subset_size: int = 100, pr_k: int = 3, seed: int = 0,
                       which: tuple[str, ...] = ("fid", "diversity", "realism", "pr", "memorisation")) -> dict[str, Any]:
    """The generative metrics of ``fake`` (n, C, H, W) for a few-shot target.

    Args:
        shots: the training images the generator adapted to (k, C, H, W).
        target_real: held-out real target images (never the shots): FID/KID/precision-recall reference.
        which: subset of metrics to compute (e.g. only diversity and realism while tracking).
    Returns:
        a flat dict: fid, kid, kid_std, intra_diversity, realism, precision, recall,
        nearest_shot_distance (mean over samples), shot_spread (mean distance between shots, for scale).
    """
    net = load_feature_net(feature_net)
    out: dict[str, Any] = {}
    if "fid" in which:
        r = fid_kid(target_real, fake, net, kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed)
        out.update(fid=r["fid"], kid=r["kid"], kid_std=r["kid_std"])
    if "diversity" in which:
        out["intra_diversity"] = intra_cluster_diversity(fake, shots, distance)["intra_diversity"]
    if "realism" in which and realism is not None:
        out["realism"] = float(realism.predict_proba(fake).mean())
    if "pr" in which:
        out.update(precision_recall(embed(net, target_real), embed(net, fake), k=pr_k))
    if "memorisation" in which:
        out["nearest_shot_distance"] = float(nearest_shot_distance(fake, shots, distance).mean())
        es = distance.embed(shots)
        d = distance.pairwise(es, es)
        iu = torch.triu_indices(len(shots), len(shots), offset=1)
        out["shot_spread"] = float(d[iu[0], iu[1]].mean()) if len(shots) > 1 else float("nan")
    return out
