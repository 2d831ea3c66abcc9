"""Frozen-feature classifiers against slow references."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression as SkLogReg

from fewgen.evaluation.classifiers import LogisticRegression, PrototypeClassifier, argmax_last


def _episodes(e=40, n=5, k=5, q=10, d=32, noise=1.5, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(e, n, d, generator=g).abs()
    sup = (centers.repeat_interleave(k, 1) + noise * torch.randn(e, n * k, d, generator=g)).relu()
    qry = (centers.repeat_interleave(q, 1) + noise * torch.randn(e, n * q, d, generator=g)).relu()
    ys = torch.arange(n).repeat_interleave(k).expand(e, -1)
    yq = torch.arange(n).repeat_interleave(q).expand(e, -1)
    return sup, ys, qry, yq


def test_batched_logreg_agrees_with_sklearn():
    sup, ys, qry, yq = _episodes()
    clf = LogisticRegression(c=1.0).fit(sup, ys, 5)
    ours = clf.predict(qry)
    sn, qn = F.normalize(sup, dim=-1).numpy(), F.normalize(qry, dim=-1).numpy()
    agree, acc_ours, acc_sk = [], [], []
    for e in range(sup.shape[0]):
        sk = SkLogReg(C=1.0, max_iter=1000).fit(sn[e], ys[e].numpy())
        pred = sk.predict(qn[e])
        agree.append((pred == ours[e].numpy()).mean())
        acc_sk.append((pred == yq[e].numpy()).mean())
        acc_ours.append((ours[e] == yq[e]).float().mean().item())
        # same optimum: weights agree up to the softmax's shift invariance
        w_sk = sk.coef_ - sk.coef_.mean(0, keepdims=True)  # (N, D), as clf.weight[e]
        w = clf.weight[e].numpy()
        np.testing.assert_allclose(w - w.mean(0, keepdims=True), w_sk, atol=5e-3)
    assert np.mean(agree) > 0.99
    assert abs(np.mean(acc_ours) - np.mean(acc_sk)) < 0.005
    assert np.mean(acc_ours) > 0.4  # well above chance (0.2): the task is not trivial or broken


def test_logreg_sample_weights_match_repeated_samples():
    sup, ys, qry, _ = _episodes(e=4, n=3, k=2)
    w = torch.ones(ys.shape)
    w[:, 0] = 3.0
    a = LogisticRegression().fit(sup, ys, 3, sample_weight=w).decision_function(qry)
    rep_sup = torch.cat([sup, sup[:, :1], sup[:, :1]], 1)
    rep_y = torch.cat([ys, ys[:, :1], ys[:, :1]], 1)
    b = LogisticRegression().fit(rep_sup, rep_y, 3).decision_function(qry)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_kernel_and_primal_forms_reach_the_same_classifier():
    # supports of 12 in 8 dims (primal is the automatic choice) and in 32 dims (kernel)
    for d in (8, 32):
        sup, ys, qry, _ = _episodes(e=6, n=4, k=3, q=4, d=d, seed=d)
        w = torch.rand(ys.shape, generator=torch.Generator().manual_seed(1)) + 0.5
        fits = [LogisticRegression(form=f, tol=1e-6).fit(sup, ys, 4, sample_weight=w) for f in ("kernel", "primal")]
        torch.testing.assert_close(fits[0].weight, fits[1].weight, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(fits[0].decision_function(qry), fits[1].decision_function(qry), atol=1e-4, rtol=1e-4)


def test_bb_fista_and_the_fista_fallback_reach_the_same_classifier():
    # 5-shot in 16 dims runs the primal form, 1-shot the kernel form; bb_iters=2 leaves nearly every
    # episode unconverged, so FISTA finishes them from where BB stopped
    for k, d in ((5, 16), (1, 32)):
        sup, ys, qry, _ = _episodes(e=12, n=5, k=k, q=4, d=d, seed=k)
        w = torch.rand(ys.shape, generator=torch.Generator().manual_seed(2)) + 0.5
        fits = {name: LogisticRegression(tol=1e-6, **kw).fit(sup, ys, 5, sample_weight=w)
                for name, kw in {"bb": {}, "fista": {"solver": "fista"}, "fallback": {"bb_iters": 2}}.items()}
        assert fits["fallback"].n_iter > 2  # the fallback ran
        for name in ("fista", "fallback"):
            torch.testing.assert_close(fits[name].weight, fits["bb"].weight, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(fits[name].decision_function(qry), fits["bb"].decision_function(qry),
                                       atol=1e-4, rtol=1e-4)


def test_an_episode_answer_does_not_depend_on_the_rest_of_the_batch():
    sup, ys, qry, _ = _episodes(e=30, n=5, k=2, q=3, d=16)
    sup[7] *= 0.05  # a harder episode that needs more steps than the others
    together = LogisticRegression().fit(sup, ys, 5)
    for e in (0, 7, 29):
        alone = LogisticRegression().fit(sup[e:e + 1], ys[e:e + 1], 5)
        torch.testing.assert_close(together.weight[e:e + 1], alone.weight, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(together.bias[e:e + 1], alone.bias, atol=1e-6, rtol=1e-5)


def test_argmax_last_matches_argmax_with_ties_to_the_first():
    scores = torch.randint(0, 4, (50, 7, 6)).float()  # many ties
    assert torch.equal(argmax_last(scores), scores.argmax(-1))


def test_prototype_is_cosine_nearest_centroid():
    sup, ys, qry, _ = _episodes(e=3, n=4, k=3, q=5, d=8)
    pred = PrototypeClassifier().fit(sup, ys, 4).predict(qry)
    for e in range(3):
        protos = torch.stack([F.normalize(sup[e][ys[e] == c], dim=-1).mean(0) for c in range(4)])
        sims = torch.stack([F.cosine_similarity(qry[e], p.unsqueeze(0), dim=-1) for p in protos], 1)
        assert torch.equal(pred[e], sims.argmax(1))


def test_weighted_supports_match_repeated_supports():
    """Integer sample weights equal repeating a support that many times (proto and logreg)."""
    from fewgen.evaluation.classifiers import LogisticRegression, PrototypeClassifier

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 6, 8, generator=g)
    y = torch.tensor([0, 0, 1, 1, 2, 2]).expand(3, -1)
    w = torch.tensor([1.0, 3.0, 1.0, 2.0, 1.0, 1.0]).expand(3, -1)
    reps = torch.tensor([1, 3, 1, 2, 1, 1])
    xr, yr = x.repeat_interleave(reps, 1), y.repeat_interleave(reps, 1)
    q = torch.randn(3, 10, 8, generator=g)
    a = PrototypeClassifier().fit(x, y, 3, sample_weight=w).decision_function(q)
    b = PrototypeClassifier().fit(xr, yr, 3).decision_function(q)
    assert torch.allclose(a, b, atol=1e-6)
    la = LogisticRegression(tol=1e-8).fit(x, y, 3, sample_weight=w).decision_function(q)
    lb = LogisticRegression(tol=1e-8).fit(xr, yr, 3).decision_function(q)
    assert torch.allclose(la, lb, atol=1e-3)


def test_extra_support_joins_episodes_and_all_way():
    from fewgen.data.base import ArrayDataset
    from fewgen.data.fewshot import all_way_split, sample_episodes
    from fewgen.evaluation.protocol import ExtraSupport, all_way_accuracy, episode_accuracies

    g = torch.Generator().manual_seed(1)
    centres = torch.randn(4, 16, generator=g) * 3
    labels = torch.arange(4).repeat_interleave(12)
    feats = centres[labels] + torch.randn(48, 16, generator=g) * 6
    novel = ArrayDataset(torch.zeros(48, 1, 2, 2, dtype=torch.uint8), labels, list("abcd"), name="toy")
    ep = sample_episodes(novel, 4, 1, 5, 40, seed=0)
    # perfect extra supports (the class centres) raise accuracy; at weight -> 0 they change nothing
    extra = ExtraSupport({(0, 1): centres.repeat(3, 1)}, {(0, 1): torch.arange(4).repeat(3)}, weight=5.0)
    plain = episode_accuracies(feats, ep, "proto").mean()
    more = episode_accuracies(feats, ep, "proto", extra_support=lambda c: extra.for_episodes(c, 0, 1, 4)).mean()
    assert more > plain and extra.images_per_class(0, 1, 4) == 3
    tiny = ExtraSupport(extra.features, extra.labels, weight=1e-9)
    same = episode_accuracies(feats, ep, "proto", extra_support=lambda c: tiny.for_episodes(c, 0, 1, 4)).mean()
    assert torch.isclose(same, plain)
    sup, qry = all_way_split(novel, 1, 0)
    a = all_way_accuracy(feats, labels, sup, qry, "logreg").mean()
    b = all_way_accuracy(feats, labels, sup, qry, "logreg", extra=extra.for_all_way(0, 1, 4)).mean()
    assert b > a


def test_proto_share_sets_the_extra_images_share_of_each_prototype():
    from fewgen.evaluation.classifiers import PrototypeClassifier
    from fewgen.evaluation.protocol import ExtraSupport

    g = torch.Generator().manual_seed(3)
    shots = F.normalize(torch.randn(3, 2, 8, generator=g), dim=-1)  # 3 classes x K=2 shots
    extra_f = F.normalize(torch.randn(3 * 4, 8, generator=g), dim=-1)  # 4 extra images per class
    extra_y = torch.arange(3).repeat_interleave(4)
    w = torch.rand(12, generator=g) + 0.5  # unequal per-image weights: their relative sizes are kept
    es = ExtraSupport({(0, 2): extra_f}, {(0, 2): extra_y}, weights={(0, 2): w}, proto_share=0.3)
    xs, ys, ws = es.for_episodes(torch.arange(3)[None], 0, 2, 3, "proto")
    support = torch.cat([shots.reshape(1, 6, 8), xs], 1)
    y = torch.cat([torch.arange(3).repeat_interleave(2)[None], ys], 1)
    sw = torch.cat([torch.ones(1, 6), ws], 1)
    proto = PrototypeClassifier().fit(support, y, n_classes=3, sample_weight=sw).prototypes[0]
    for c in range(3):
        wc = w[extra_y == c]
        want = 0.7 * shots[c].mean(0) + 0.3 * (wc[:, None] * extra_f[extra_y == c]).sum(0) / wc.sum()
        assert torch.allclose(proto[c], F.normalize(want, dim=-1), atol=1e-5)
    # logistic regression keeps the per-image weights
    _, _, w_lr = es.for_episodes(torch.arange(3)[None], 0, 2, 3, "logreg")
    assert torch.allclose(w_lr[0], w)
    _, _, w_all = es.for_all_way(0, 2, 3, "proto")
    assert torch.allclose(w_all.view(3, 4).sum(1), torch.full((3,), 0.3 / 0.7 * 2))
