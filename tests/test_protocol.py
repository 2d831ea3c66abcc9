"""The few-shot protocol: disjoint support/query, reproducible episodes, clear errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from fewgen.data import load_dataset
from fewgen.data.fewshot import Episodes, all_way_split, few_shot_indices, sample_episodes
from fewgen.errors import FewgenError
from fewgen.evaluation.protocol import mean_ci95


@pytest.fixture(scope="module")
def novel():
    return load_dataset("digits").novel


def test_support_and_query_never_share_an_image(novel):
    ep = sample_episodes(novel, n_way=5, n_shot=5, n_query=15, n_episodes=300, seed=3)
    for e in range(ep.n_episodes):
        s, q = set(ep.support[e].reshape(-1).tolist()), set(ep.query[e].reshape(-1).tolist())
        assert not (s & q)
        assert len(q) == 5 * 15  # no query repeated inside an episode
        # every image belongs to its episode class
        assert (novel.labels[ep.support[e]] == ep.classes[e].unsqueeze(1)).all()
        assert (novel.labels[ep.query[e]] == ep.classes[e].unsqueeze(1)).all()
    sup, qry = all_way_split(novel, 5, seed=3)
    assert not set(sup.reshape(-1).tolist()) & set(qry.tolist())
    assert len(qry) == len(novel) - 25


def test_support_is_the_seeds_few_shot_set(novel):
    shots = few_shot_indices(novel, 5, seed=1)
    ep = sample_episodes(novel, 3, 5, 4, 50, seed=1)
    assert torch.equal(ep.support, shots[ep.classes])
    assert torch.equal(few_shot_indices(novel, 1, seed=1)[:, 0], shots[:, 0])  # nested shots


def test_same_seed_same_episodes_other_seed_differs(novel, tmp_path):
    a = sample_episodes(novel, 5, 1, 15, 100, seed=0)
    b = sample_episodes(novel, 5, 1, 15, 100, seed=0)
    c = sample_episodes(novel, 5, 1, 15, 100, seed=1)
    assert torch.equal(a.query, b.query) and torch.equal(a.support, b.support)
    assert not torch.equal(a.query, c.query)
    a.save(tmp_path / "e.npz")
    d = Episodes.load(tmp_path / "e.npz")
    assert torch.equal(d.query, a.query) and d.seed == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"n_way": 6, "n_shot": 1, "n_query": 5}, r"n_way=6 is larger than the number of novel classes \(5\)"),
        ({"n_way": 5, "n_shot": 0, "n_query": 5}, "n_shot must be at least 1"),
        ({"n_way": 1, "n_shot": 1, "n_query": 5}, "n_way must be at least 2"),
        ({"n_way": 5, "n_shot": 100, "n_query": 100}, r"fewer than n_shot \+ n_query = 100 \+ 100"),
    ],
)
def test_impossible_settings(novel, kwargs, message):
    with pytest.raises(FewgenError, match=message):
        sample_episodes(novel, n_episodes=10, seed=0, **kwargs)


def test_mean_ci95_matches_t_interval():
    x = np.random.default_rng(0).normal(50, 10, size=40)
    mean, half = mean_ci95(x)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    assert mean == pytest.approx(x.mean()) and half == pytest.approx((hi - lo) / 2)


def test_all_way_logreg_is_the_converged_optimum():
    """With many classes a 1e-4 gradient tolerance stops near the start; all-way runs to the optimum."""
    import torch.nn.functional as F
    from sklearn.linear_model import LogisticRegression as SkLogReg

    from fewgen.evaluation.protocol import all_way_accuracy

    g = torch.Generator().manual_seed(0)
    n_cls, per, d = 150, 6, 48
    centers = torch.randn(n_cls, d, generator=g)
    feats = (centers.repeat_interleave(per, 0) + torch.randn(n_cls * per, d, generator=g)).relu()
    labels = torch.arange(n_cls).repeat_interleave(per)
    sup = torch.arange(n_cls * per).view(n_cls, per)[:, :1]  # 1-shot
    qry = torch.arange(n_cls * per).view(n_cls, per)[:, 1:].reshape(-1)
    ours = all_way_accuracy(feats, labels, sup, qry, "logreg")
    xs = F.normalize(feats, dim=-1).double().numpy()
    sk = SkLogReg(C=1.0, tol=1e-10, max_iter=10000).fit(xs[sup.reshape(-1)], labels[sup.reshape(-1)].numpy())
    ref = torch.from_numpy(sk.predict(xs[qry]) == labels[qry].numpy()).double()
    assert (ours != ref).sum() <= 1  # of 750 queries; stopping at tol 1e-4 disagrees on 2
