"""Steered redrawings (fewgen.generators.steered) on the bundled digits with a tiny Conv-4: the
regressor learns, the kept images are the shot's redrawings (uint8, right shape, labels by row), their
mean feature lies nearer the predicted centre than random redrawings' does, and same seed, same images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewgen.data import load_dataset
from fewgen.errors import FewgenError
from fewgen.evaluation.features import extract_features
from fewgen.generators.steered import SteeredOptions, SteeredRedrawings, affine_pool, steer

SMALL = dict(pool=24, keep=4, regressor_steps=150, regressor_hidden=32)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def backbone(digits_conv4):
    return digits_conv4


def test_greedy_choice_beats_random_subsets():
    g = torch.Generator().manual_seed(0)
    pool = F.normalize(torch.randn(3, 30, 8, generator=g), dim=-1)
    pick = torch.tensor([[0, 5, 9], [1, 2, 3], [29, 28, 27]])
    target = F.normalize(torch.stack([pool[i, pick[i]].mean(0) for i in range(3)]), dim=-1)
    got = steer(pool, target, 3)
    assert all(len(set(r.tolist())) == 3 for r in got)  # each pool item at most once

    def cos(idx):  # (3, k) -> cosine of each row's normalised mean with its target
        return (F.normalize(torch.stack([pool[i, idx[i]].mean(0) for i in range(3)]), dim=-1) * target).sum(-1)

    random = torch.stack([cos(torch.stack([torch.randperm(30, generator=g)[:3] for _ in range(3)]))
                          for _ in range(200)])
    assert (cos(got) >= random.quantile(0.99, dim=0)).all(), (cos(got), random.max(0).values)


def test_steered_redrawings_move_the_mean_toward_the_prediction(digits, backbone):
    o = SteeredOptions(**SMALL)
    steerer = SteeredRedrawings(o).fit(backbone, digits.base)
    assert sum(steerer.history[-20:]) < sum(steerer.history[:20])  # the regressor learns
    shots = digits.novel.images[torch.tensor([ix[0] for ix in digits.novel.indices_by_class()])]
    images = steerer.generate(backbone, shots)
    assert images.dtype == torch.uint8 and images.shape == (len(shots) * o.keep, *shots.shape[1:])
    assert images.float().std() > 0 and not torch.equal(images[:o.keep], shots[:1].expand(o.keep, -1, -1, -1))
    target = steerer.predicted_centres(backbone, shots)

    def cos_of_mean(x):
        f = F.normalize(extract_features(backbone, x), dim=-1).view(len(shots), o.keep, -1).mean(1)
        return (F.normalize(f, dim=-1) * target).sum(-1)

    random = affine_pool(shots, o)[:, :o.keep].flatten(0, 1)  # the same pool, unsteered
    assert (cos_of_mean(images) > cos_of_mean(random)).all()
    assert torch.equal(images, SteeredRedrawings(o).fit(backbone, digits.base).generate(backbone, shots))


def test_options_are_checked_before_work():
    with pytest.raises(FewgenError, match="keep 30 of a pool of 10"):
        SteeredRedrawings(SteeredOptions(pool=10, keep=30))
