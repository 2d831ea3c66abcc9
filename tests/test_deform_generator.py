"""The deformation generator trained through the prototype classifier (fewgen.generators.deform),
on the bundled digits with a tiny Conv-4: its images, its loss, and resume."""

from __future__ import annotations

import pytest
import torch

from fewgen.generators.deform import DeformGenerator, DeformOptions, warp

TINY = dict(n_way=3, n_query=5, n_generated=4, width=8, grid=4, lr=1e-2, proto_share=1.0, max_shift=0.3)


def test_identity_offsets_keep_the_image(digits):
    x = digits.base.float_images(torch.arange(4))
    assert torch.allclose(warp(x, torch.zeros(4, 2, 4, 4)), x, atol=1e-5)


def test_untrained_generator_returns_its_shots(digits):
    shots = digits.novel.images[:3]
    images = DeformGenerator(1, DeformOptions(**TINY, stroke=False)).generate(shots, per_shot=2, seed=0)
    assert torch.equal(images, shots.repeat_interleave(2, 0))


@pytest.mark.slow
def test_loss_falls_and_images_are_drawings(digits, digits_conv4):
    gen = DeformGenerator(1, DeformOptions(steps=100, checkpoint_every=100, **TINY))
    before = gen.episode_loss(digits_conv4, digits.base, n_episodes=30, seed=1)
    gen.fit(digits_conv4, digits.base)
    after = gen.episode_loss(digits_conv4, digits.base, n_episodes=30, seed=1)
    assert after < before - 0.01, (before, after)
    first, last = sum(gen.history[:20]) / 20, sum(gen.history[-20:]) / 20
    assert last < first, (first, last)

    shots = digits.novel.images[:5]
    images = gen.generate(shots, per_shot=3, seed=0)
    assert images.dtype == torch.uint8 and images.shape == (15, *shots.shape[1:])
    assert torch.equal(images, gen.generate(shots, per_shot=3, seed=0))
    assert not torch.equal(images, shots.repeat_interleave(3, 0))
    # still drawings: each image stays close to its shot (mean absolute change under a fifth of the range)
    change = (images.float() - shots.repeat_interleave(3, 0).float()).abs().mean() / 255
    assert 0 < change < 0.2


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted(digits, digits_conv4, tmp_path):
    options = DeformOptions(steps=30, checkpoint_every=10, **TINY)
    whole = DeformGenerator(1, options).fit(digits_conv4, digits.base)
    ckpt = tmp_path / "deform.safetensors"
    DeformGenerator(1, options).fit(digits_conv4, digits.base, checkpoint=ckpt, stop_at=20)
    resumed = DeformGenerator(1, options).fit(digits_conv4, digits.base, checkpoint=ckpt)
    assert resumed.history == whole.history
    for (name, a), b in zip(whole.net.state_dict().items(), resumed.net.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_save_and_load(digits, digits_conv4, tmp_path):
    gen = DeformGenerator(1, DeformOptions(steps=5, **TINY)).fit(digits_conv4, digits.base)
    gen.save(tmp_path / "g.safetensors")
    loaded = DeformGenerator.load(tmp_path / "g.safetensors")
    shots = digits.novel.images[:2]
    assert torch.equal(loaded.generate(shots, 2, seed=3), gen.generate(shots, 2, seed=3))
