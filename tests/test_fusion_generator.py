"""The fusion generator trained through the prototype classifier (fewgen.generators.fusion), on the
bundled digits with a tiny Conv-4: its images, its gallery, its loss, and resume.

The digits have 3 base classes, too few for an episode and a gallery of other classes, so the base
set here is the base and validation digits together (5 classes)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.generators.fusion import FusionGenerator, FusionOptions

TINY = dict(n_way=3, n_query=5, n_generated=4, width=8, neighbours=2, lr=1e-2)


@pytest.fixture(scope="module")
def base5(digits):
    return ArrayDataset(torch.cat([digits.base.images, digits.val.images]),
                        torch.cat([digits.base.labels, digits.val.labels + digits.base.num_classes]),
                        digits.base.class_names + digits.val.class_names, name="digits base+val")


@pytest.fixture(scope="module")
def conv4_5(base5):
    """A 16-channel Conv-4 fitted for a few steps on the 5 classes, in eval mode."""
    from fewgen.backbones import create_backbone

    torch.manual_seed(0)
    net = create_backbone("conv4", in_chans=1, hidden=16, out_channels=16)
    head = torch.nn.Linear(16, base5.num_classes)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], 1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(len(base5), (64,), generator=g)
        loss = F.cross_entropy(head(net.forward_features(base5.float_images(idx))), base5.labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()


def test_patch_weights_blend_probe_and_gallery():
    net = FusionGenerator(1, FusionOptions(**TINY)).net
    probe, gallery = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    for logit, expected in ((30.0, probe), (-30.0, gallery)):
        torch.nn.init.constant_(net.head.bias, logit)
        assert torch.allclose(net.fuse(probe, gallery), expected, atol=1e-6)
    torch.nn.init.constant_(net.head.bias, 0.0)
    assert torch.allclose(net.fuse(probe, gallery), (probe + gallery) / 2, atol=1e-6)


def test_gallery_comes_from_the_nearest_classes_outside_the_episode(base5, conv4_5):
    gen = FusionGenerator(1, FusionOptions(**TINY))
    gen.prepare(conv4_5, base5)
    shots = base5.float_images(torch.arange(0, len(base5), 7))
    with torch.no_grad():
        feats = conv4_5.forward_features(shots)
    noise = torch.rand(len(shots), 2, generator=torch.Generator().manual_seed(0))
    exclude = torch.tensor([0, 3])
    gallery = gen.gallery_images(feats, exclude, noise)
    # which base image each gallery drawing is: exact pixel matches
    flat = base5.float_images().flatten(1)
    which = torch.stack([(flat == g.flatten()).all(1).nonzero()[0, 0] for g in gallery])
    classes = base5.labels[which]
    assert not torch.isin(classes, exclude).any()
    sims = F.normalize(feats, dim=-1) @ gen.means.T
    sims[:, exclude] = -2
    near = sims.topk(2, dim=1).indices
    assert all(c in row for c, row in zip(classes.tolist(), near.tolist(), strict=True))


def test_checks_before_work(base5, conv4_5, digits):
    with pytest.raises(FewgenError, match="neighbours"):
        FusionGenerator(1, FusionOptions(**{**TINY, "neighbours": 3})).prepare(conv4_5, base5)
    gen = FusionGenerator(1, FusionOptions(**TINY))
    with pytest.raises(FewgenError, match="prepare"):
        gen.generate(digits.novel.images[:2], 2, seed=0, backbone=conv4_5)
    gen.prepare(conv4_5, base5)
    with pytest.raises(FewgenError, match="backbone="):
        gen.generate(digits.novel.images[:2], 2, seed=0)


@pytest.mark.slow
def test_loss_falls_and_images_are_drawings(base5, conv4_5, digits):
    gen = FusionGenerator(1, FusionOptions(steps=60, checkpoint_every=60, **TINY))
    gen.prepare(conv4_5, base5)
    before = gen.episode_loss(conv4_5, base5, n_episodes=30, seed=1, base_classes=True)
    gen.fit(conv4_5, base5)
    after = gen.episode_loss(conv4_5, base5, n_episodes=30, seed=1, base_classes=True)
    assert after < before - 0.005, (before, after)
    first, last = sum(gen.history[:15]) / 15, sum(gen.history[-15:]) / 15
    assert last < first, (first, last)

    shots = digits.novel.images[:5]
    images = gen.generate(shots, per_shot=3, seed=0, backbone=conv4_5)
    assert images.dtype == torch.uint8 and images.shape == (15, *shots.shape[1:])
    assert torch.equal(images, gen.generate(shots, per_shot=3, seed=0, backbone=conv4_5))
    # drawings: every pixel lies between its shot's and its gallery drawing's (a patch-wise blend of two drawings)
    from fewgen.utils import make_generator

    noise = gen.noise(15, make_generator("fusion-sample", 0))
    with torch.no_grad():
        feats = conv4_5.forward_features(shots.float() / 255).repeat_interleave(3, 0)
    gallery = (gen.gallery_images(feats, None, noise) * 255).round()
    source = shots.repeat_interleave(3, 0).float()
    low, high = torch.minimum(source, gallery), torch.maximum(source, gallery)
    assert ((images.float() >= low - 1) & (images.float() <= high + 1)).all()


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(base5, conv4_5, tmp_path):
    options = FusionOptions(steps=30, checkpoint_every=10, **TINY)
    whole = FusionGenerator(1, options).fit(conv4_5, base5)
    ckpt = tmp_path / "fusion.safetensors"
    FusionGenerator(1, options).fit(conv4_5, base5, checkpoint=ckpt, stop_at=20)
    resumed = FusionGenerator(1, options).fit(conv4_5, base5, checkpoint=ckpt)
    assert resumed.history == whole.history
    for (name, a), b in zip(whole.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_save_and_load(base5, conv4_5, digits, tmp_path):
    gen = FusionGenerator(1, FusionOptions(steps=5, **TINY)).fit(conv4_5, base5)
    gen.save(tmp_path / "g.safetensors")
    loaded = FusionGenerator.load(tmp_path / "g.safetensors")
    loaded.prepare(conv4_5, base5)
    shots = digits.novel.images[:2]
    assert torch.equal(loaded.generate(shots, 2, seed=3, backbone=conv4_5),
                       gen.generate(shots, 2, seed=3, backbone=conv4_5))
