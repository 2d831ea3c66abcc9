"""The small GAN, its adaptation methods (TGAN, FreezeD, CDC, DCL) and their losses."""

from __future__ import annotations

import math

import pytest
import torch

from fewgen.cache import ArtifactCache
from fewgen.errors import FewgenError
from fewgen.gan.methods.cdc import distance_consistency_loss
from fewgen.gan.methods.dcl import discriminator_contrastive_loss, generator_contrastive_loss
from fewgen.gan.model import (
    GAN_METHODS,
    AdaptSettings,
    Discriminator,
    GANArch,
    GANTrainSettings,
    Generator,
    SourceGAN,
    adapt_gan,
    create_adapter,
    pretrained_source_gan,
    sample,
)

TINY = GANArch(image_size=8, channels=1, z_dim=8, width=4)


def _softmax(xs):
    e = [math.exp(x) for x in xs]
    return [v / sum(e) for v in e]


# ----------------------------------------------------------------------------- losses by hand


def test_generator_contrastive_loss_by_hand():
    tau = 0.5
    adapted = torch.tensor([[1.0, 0.0], [0.0, 2.0]])  # normalised: (1, 0), (0, 1)
    source = torch.tensor([[3.0, 0.0], [1.0, 1.0]])  # normalised: (1, 0), (1, 1)/sqrt(2)
    r = 1 / math.sqrt(2)
    # row 1: sims to source (1, r), positive 1; row 2: sims (0, r), positive r
    l1 = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + math.exp(r / tau)))
    l2 = -math.log(math.exp(r / tau) / (math.exp(0.0) + math.exp(r / tau)))
    got = generator_contrastive_loss(adapted, source, temperature=tau)
    assert got.item() == pytest.approx((l1 + l2) / 2, rel=1e-6)


def test_discriminator_contrastive_loss_by_hand():
    tau = 0.07
    adapted = torch.tensor([[2.0, 0.0]])
    source = torch.tensor([[0.0, 5.0]])  # positive similarity 0
    real = torch.tensor([[1.0, 0.0], [-4.0, 0.0]])  # negatives: similarity 1 and -1
    expected = -math.log(1.0 / (1.0 + math.exp(1 / tau) + math.exp(-1 / tau)))
    got = discriminator_contrastive_loss(adapted, source, real, temperature=tau)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # the loss falls when the adapted feature moves to its source positive
    assert discriminator_contrastive_loss(source, source, real, tau) < got


def test_distance_consistency_loss_by_hand():
    r = 1 / math.sqrt(2)
    source = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # cos: s12 = 0, s13 = s23 = r
    adapted = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])  # cos: t12 = 1, t13 = t23 = 0

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))
    rows = [kl(_softmax([0, r]), _softmax([1, 0])),  # i = 1: j = 2, 3
            kl(_softmax([0, r]), _softmax([1, 0])),  # i = 2: j = 1, 3
            kl(_softmax([r, r]), _softmax([0, 0]))]  # i = 3: j = 1, 2 (zero)
    got = distance_consistency_loss(source, adapted)
    assert got.item() == pytest.approx(sum(rows) / 3, rel=1e-6)
    assert distance_consistency_loss(source, source * 3).item() == pytest.approx(0.0, abs=1e-7)


# ----------------------------------------------------------------------------- networks and training


def test_networks_shapes_and_features():
    arch = GANArch(image_size=32, channels=3, z_dim=16, width=8)
    G, D = Generator(arch), Discriminator(arch)
    img, feats = G(torch.randn(2, 16), return_features=True)
    assert img.shape == (2, 3, 32, 32) and img.abs().max() <= 1
    assert [f.shape[-1] for f in feats] == [4, 8, 16, 32]
    logits, dfeats = D(img, return_features=True)
    assert logits.shape == (2,) and [f.shape[-1] for f in dfeats] == [16, 8, 4]
    assert D.patch_logits(dfeats).shape == (2, 16 * 16)
    with pytest.raises(FewgenError, match="image_size"):
        GANArch(image_size=28).widths()


def test_source_pretraining_is_cached_and_deterministic(tmp_path):
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    settings = GANTrainSettings(iters=3, batch_size=4, checkpoint_every=2)
    cache = ArtifactCache(tmp_path / "cache")
    logs: list[str] = []
    a = pretrained_source_gan(images, TINY, settings, cache, log=logs.append)
    assert (a.path / "generator.safetensors").exists() and cache.is_done(a.path)
    assert not (a.path / "state.safetensors").exists()
    b = pretrained_source_gan(images, TINY, settings, cache, log=logs.append)
    assert any("from cache" in line for line in logs) and b.key == a.key
    assert torch.equal(sample(a.generator, 5, seed=1), sample(b.generator, 5, seed=1))
    c = pretrained_source_gan(images, TINY, settings, ArtifactCache(tmp_path / "other"), log=logs.append)
    assert torch.equal(sample(a.generator, 5, seed=1), sample(c.generator, 5, seed=1))  # same seed, same weights


@pytest.fixture
def source_gan():
    torch.manual_seed(0)
    # frozen like the EMA generator pretraining returns: adaptation must still train a copy
    return SourceGAN(Generator(TINY).eval().requires_grad_(False), Discriminator(TINY).eval().requires_grad_(False),
                     "test", None)


@pytest.mark.parametrize("name", GAN_METHODS.names())
def test_two_adaptation_iterations(name, source_gan):
    shots = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    calls = []

    def track(G):
        calls.append(1)
        return {"mean": float(sample(G, 4, seed=0).float().mean())}
    settings = AdaptSettings(iters=2, batch_size=4, track_every=1, checkpoint_every=1)
    before = {k: v.clone() for k, v in source_gan.generator.state_dict().items()}
    result = adapt_gan(create_adapter(name), source_gan, shots, settings, track=track, log=lambda s: None)
    assert [t["iter"] for t in result.tracking] == [0, 1, 2] and len(calls) == 3
    terms = result.history[-1]
    assert all(math.isfinite(v) for v in terms.values())
    g_changed = any(not torch.equal(p, q) for p, q in zip(result.generator.parameters(), source_gan.generator.parameters()))
    assert g_changed
    src_d = dict(source_gan.discriminator.named_parameters())
    changed = {n for n, p in result.discriminator.named_parameters() if not torch.equal(p, src_d[n])}
    assert any(n.startswith("final") for n in changed)
    if name == "freezed":
        assert not any(n.startswith(("from_image", "blocks.0.")) for n in changed)
    else:
        assert any(n.startswith("from_image") for n in changed)
    assert any(n.startswith("patch_head") for n in changed) == (name == "cdc")
    expected = {"tgan": {"g_adv"}, "freezed": {"g_adv"}, "cdc": {"g_dist"}, "dcl": {"g_cl1", "g_cl2", "d_cl2"},
                "dcl-g": {"g_cl1", "g_cl2"}, "dcl-cl1": {"g_cl1"}}[name]
    assert expected <= set(terms)
    # the ablations leave out exactly their part: D's contrastive term, or the whole D-side loss
    if name in ("dcl-g", "dcl-cl1"):
        assert "d_cl2" not in terms
    if name == "dcl-cl1":
        assert "g_cl2" not in terms
    # the source GAN itself is untouched
    for k, v in source_gan.generator.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_adaptation_resumes_to_the_same_weights(tmp_path, source_gan):
    shots = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    method = create_adapter("dcl")
    full = adapt_gan(method, source_gan, shots, AdaptSettings(iters=4, batch_size=4, checkpoint_every=2, r1_every=2),
                     entry=tmp_path / "a", log=lambda s: None)
    adapt_gan(method, source_gan, shots, AdaptSettings(iters=2, batch_size=4, checkpoint_every=2, r1_every=2),
              entry=tmp_path / "b", log=lambda s: None)
    logs: list[str] = []
    resumed = adapt_gan(method, source_gan, shots, AdaptSettings(iters=4, batch_size=4, checkpoint_every=2, r1_every=2),
                        entry=tmp_path / "b", log=logs.append)
    assert any("resuming" in line for line in logs)
    for p, q in zip(full.generator.parameters(), resumed.generator.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_registry_and_bad_freeze():
    assert set(GAN_METHODS.names()) >= {"tgan", "freezed", "cdc", "dcl"}
    with pytest.raises(FewgenError, match="dlc"):
        create_adapter("dlc")
    with pytest.raises(FewgenError, match="FreezeD"):
        create_adapter("freezed", layers=9).trainable_d_parameters(Discriminator(TINY))
