"""Generative metrics against slow references (NumPy/SciPy FID, double-loop KID and k-NN)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import torch

from fewgen.backbones import create_backbone
from fewgen.checkpoint import save_model
from fewgen.errors import FewgenError
from fewgen.evaluation.generative import (
    FeatureNet,
    LPIPSAlex,
    PerceptualDistance,
    RealismClassifier,
    embed,
    fid_from_features,
    fid_kid,
    generation_metrics,
    intra_cluster_diversity,
    kid_from_features,
    load_feature_net,
    nearest_shot_distance,
    precision_recall,
)


def numpy_fid(a: np.ndarray, b: np.ndarray) -> float:
    mu1, mu2 = a.mean(0), b.mean(0)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def slow_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    d = x.shape[1]

    def k(a, b):
        return (a @ b / d + 1) ** 3
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(n)) / (m * n)
    return xx + yy - 2 * xy


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return create_backbone("conv4", in_chans=1, hidden=8, out_channels=8).eval()


def test_fid_matches_numpy_on_gaussians():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, 6))
    cov = np.diag(rng.uniform(0.5, 2.0, size=6))
    b = rng.multivariate_normal(np.full(6, 0.3), cov, size=500)
    ours = fid_from_features(torch.from_numpy(a), torch.from_numpy(b))
    assert ours == pytest.approx(numpy_fid(a, b), rel=1e-6, abs=1e-8)
    assert fid_from_features(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(0.0, abs=1e-8)


def test_kid_matches_double_loop():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(12, 4)), rng.normal(0.5, 1.0, size=(12, 4))
    mean, std = kid_from_features(torch.from_numpy(a), torch.from_numpy(b), subsets=3, subset_size=12)
    # every subset is a permutation of the whole sets, and MMD does not depend on order
    assert mean == pytest.approx(slow_mmd2(a, b), rel=1e-9)
    assert std == pytest.approx(0.0, abs=1e-9)


def test_fid_kid_of_images_equal_those_of_their_features(backbone):
    """fid_kid (torchmetrics over the feature network) and fid_from_features (torchmetrics over
    features embedded once, as the GAN tracker does) give the same FID."""
    g = torch.Generator().manual_seed(0)
    real = torch.randint(0, 256, (60, 1, 16, 16), dtype=torch.uint8, generator=g)
    fake = (torch.rand(50, 1, 16, 16, generator=g) * 0.5)
    net = FeatureNet(backbone)
    out = fid_kid(real, fake, net, kid_subsets=5, kid_subset_size=20)
    fr, ff = embed(net, real), embed(net, fake)
    assert out["fid"] == pytest.approx(fid_from_features(fr, ff), rel=1e-4)
    assert out["kid"] > 0 and out["n_real"] == 60 and out["n_fake"] == 50
    again = fid_kid(real, fake, net, kid_subsets=5, kid_subset_size=20)
    assert again == out  # KID's subsets are seeded


def test_precision_recall_matches_loops():
    rng = np.random.default_rng(2)
    real, fake = rng.normal(size=(30, 3)), rng.normal(0.7, 1.0, size=(25, 3))
    k = 3

    def radii(x):
        return np.array([np.sort([np.linalg.norm(p - q) for q in x])[k] for p in x])
    rr, rf = radii(real), radii(fake)
    prec = np.mean([any(np.linalg.norm(f - r) <= rr[j] for j, r in enumerate(real)) for f in fake])
    rec = np.mean([any(np.linalg.norm(r - f) <= rf[j] for j, f in enumerate(fake)) for r in real])
    out = precision_recall(torch.from_numpy(real), torch.from_numpy(fake), k=k)
    assert out["precision"] == pytest.approx(prec) and out["recall"] == pytest.approx(rec)
    same = precision_recall(torch.from_numpy(real), torch.from_numpy(real), k=k)
    assert same == {"precision": 1.0, "recall": 1.0}


def test_perceptual_distance_matches_direct_formula(backbone):
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(4, 1, 16, 16, generator=g), torch.rand(5, 1, 16, 16, generator=g)
    dist = PerceptualDistance(backbone)
    pair = dist.pairwise(dist.embed(x), dist.embed(y))
    with torch.no_grad():
        mx, my = backbone.forward_maps(x), backbone.forward_maps(y)
    for i in range(4):
        for j in range(5):
            ref = 0.0
            for a, b in zip(mx, my):
                a = a[i] / (a[i].norm(dim=0, keepdim=True) + 1e-10)
                b = b[j] / (b[j].norm(dim=0, keepdim=True) + 1e-10)
                ref += float((a - b).square().sum(0).mean())
            assert pair[i, j].item() == pytest.approx(ref, rel=1e-4, abs=1e-6)
    assert dist(x[:2], x[:2]).abs().max() < 1e-6


def test_intra_diversity_of_identical_images_is_zero(backbone):
    g = torch.Generator().manual_seed(4)
    shots = torch.randint(0, 256, (3, 1, 16, 16), dtype=torch.uint8, generator=g)
    samples = shots[1:2].repeat(20, 1, 1, 1)
    dist = PerceptualDistance(backbone)
    out = intra_cluster_diversity(samples, shots, dist)
    assert out["intra_diversity"] == pytest.approx(0.0, abs=1e-5)
    assert out["cluster_sizes"] == [0, 20, 0] and out["clusters_used"] == 1
    assert nearest_shot_distance(samples, shots, dist).abs().max() < 1e-5
    noisy = torch.rand(40, 1, 16, 16, generator=g)
    assert intra_cluster_diversity(noisy, shots, dist)["intra_diversity"] > 0.01


def test_lpips_alex_from_local_weights(tmp_path):
    torch.manual_seed(0)
    net = LPIPSAlex()
    tensors = {f"features.{k}": v for k, v in net.features.state_dict().items()}
    tensors |= {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPSAlex.CHANNELS)}
    from fewgen.checkpoint import save_tensors

    save_tensors(tmp_path / "lpips.safetensors", tensors)
    dist = PerceptualDistance(lpips_weights=tmp_path / "lpips.safetensors", image_size=64)
    x = torch.rand(3, 1, 32, 32)
    d = dist.pairwise(dist.embed(x), dist.embed(x))
    assert d.diagonal().abs().max() < 1e-5 and (d - d.T).abs().max() < 1e-5 and d[0, 1] > 0
    with pytest.raises(FewgenError, match="LPIPS"):
        save_tensors(tmp_path / "bad.safetensors", {"x": torch.zeros(1)})
        PerceptualDistance(lpips_weights=tmp_path / "bad.safetensors")


def test_realism_classifier_separates_domains(backbone):
    g = torch.Generator().manual_seed(5)
    target = (torch.rand(80, 1, 16, 16, generator=g) * 0.3 * 255).to(torch.uint8)  # dark
    source = (155 + torch.rand(120, 1, 16, 16, generator=g) * 100).to(torch.uint8)  # bright
    clf = RealismClassifier(backbone).fit(target, source)
    assert clf.holdout_accuracy > 0.9
    assert clf.predict_proba(target[:10]).mean() > 0.8 and clf.predict_proba(source[:10]).mean() < 0.2


def test_load_feature_net_from_checkpoint(tmp_path, backbone):
    save_model(tmp_path / "bb.safetensors", backbone)
    net = load_feature_net(tmp_path / "bb.safetensors", in_chans=1, hidden=8, out_channels=8)
    x = torch.rand(3, 3, 16, 16)  # RGB input is converted to the backbone's one channel
    assert torch.allclose(net(x), FeatureNet(backbone, channels=1)(x), atol=1e-6)
    with pytest.raises(FewgenError, match="backbone"):
        load_feature_net(tmp_path / "bb.safetensors", in_chans=3)
    with pytest.raises(FewgenError, match="neither"):
        load_feature_net(tmp_path / "missing.safetensors")


def test_generation_metrics_keys(backbone):
    g = torch.Generator().manual_seed(6)
    real = torch.rand(40, 1, 16, 16, generator=g)
    fake, shots = torch.rand(30, 1, 16, 16, generator=g), real[:4]
    dist = PerceptualDistance(backbone)
    realism = RealismClassifier(backbone).fit(real, torch.rand(40, 1, 16, 16, generator=g) * 0.2)
    out = generation_metrics(fake, shots, real[4:], backbone, dist, realism, kid_subsets=3, kid_subset_size=10)
    for key in ("fid", "kid", "intra_diversity", "realism", "precision", "recall", "nearest_shot_distance"):
        assert np.isfinite(out[key]), key
