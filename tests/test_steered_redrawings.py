"""Steered redrawings (fewgen.generators.steered) on the bundled digits with a tiny Conv-4: the
regressor learns, the kept images are the shot's redrawings (uint8, right shape, labels by row), their
mean feature lies nearer the predicted centre than random redrawings' does, and same seed, same images."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fewgen.errors import FewgenError
from fewgen.evaluation.features import extract_features
from fewgen.generators.steered import SteeredOptions, SteeredRedrawings, affine_pool, steer

SMALL = dict(pool=24, keep=4, regressor_steps=150, regressor_hidden=32)


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


def test_steered_redrawings_move_the_mean_toward_the_prediction(digits, digits_conv4):
    o = SteeredOptions(**SMALL)
    steerer = SteeredRedrawings(o).fit(digits_conv4, digits.base)
    assert sum(steerer.history[-20:]) < sum(steerer.history[:20])  # the regressor learns
    shots = digits.novel.images[torch.tensor([ix[0] for ix in digits.novel.indices_by_class()])]
    images = steerer.generate(digits_conv4, shots)
    assert images.dtype == torch.uint8 and images.shape == (len(shots) * o.keep, *shots.shape[1:])
    assert images.float().std() > 0 and not torch.equal(images[:o.keep], shots[:1].expand(o.keep, -1, -1, -1))
    target = steerer.predicted_centres(digits_conv4, shots)

    def cos_of_mean(x):
        f = F.normalize(extract_features(digits_conv4, x), dim=-1).view(len(shots), o.keep, -1).mean(1)
        return (F.normalize(f, dim=-1) * target).sum(-1)

    random = affine_pool(shots, o)[:, :o.keep].flatten(0, 1)  # the same pool, unsteered
    assert (cos_of_mean(images) > cos_of_mean(random)).all()
    assert torch.equal(images, SteeredRedrawings(o).fit(digits_conv4, digits.base).generate(digits_conv4, shots))


def test_options_are_checked_before_work():
    with pytest.raises(FewgenError, match="keep 30 of a pool of 10"):
        SteeredRedrawings(SteeredOptions(pool=10, keep=30))


def test_steered_kind_runs_in_the_pipeline_from_each_seeds_shots(tmp_path):
    """generator.kind=steered: the regressor is fitted once through the run's backbone and cached; each
    class's images are redrawings of its own shots (image i of shot i mod K), uint8 of the data's shape,
    in the frozen rows as generated images; its key holds only its own section."""
    from fewgen.app.config import load_config
    from fewgen.app.runner import run
    from fewgen.keys import key_parts
    from tests.conftest import DIGITS

    steered = ["generator.kind=steered", "generator.steered.pool=12", "generator.steered.regressor_steps=40",
               "generator.steered.regressor_hidden=16", "synthesis.synthetic_per_class=4", "synthesis.grid_classes=2",
               "pretrain.epochs=1", "pretrain.val_episodes=10", "eval.episodes=20", "seeds=[0]", "eval.n_shots=[1,2]",
               "learner.methods=[]", "learner.eval_with=[head]", "eval.proto_share=0.75",
               "pipeline=[pretrain,generator,synthesize,learn,evaluate]"]
    cfg = load_config(DIGITS, [*steered, f"cache_dir={tmp_path / 'cache'}"])
    r = run(cfg, tmp_path / "run", progress=False, quiet=True)
    novel = r.data.novel
    for (seed, k), syn in r.state.synthetic.items():
        assert syn.images.dtype == torch.uint8 and syn.image_shape == novel.image_shape
        assert len(syn) == 4 * novel.num_classes and syn.name.startswith("synthetic/steered")
        from fewgen.data.fewshot import few_shot_set

        shots = few_shot_set(novel, k, seed)
        for c in range(novel.num_classes):
            own = shots.images[shots.labels == c]
            pool = affine_pool(own, r.state.generator.options, stream=(cfg.synthesis.seed, c))  # (K, pool, ...)
            for i, img in enumerate(syn.images[syn.labels == c]):  # image i: a redrawing of shot i mod K
                assert any(torch.equal(img, q) for q in pool[i % k])
            assert len({bytes(x.numpy()) for x in syn.images[syn.labels == c]}) == 4  # each chosen once
    rows = {(row["method"], row["classifier"], row["n_shot"], bool(row.get("all_way"))): row for row in r.rows}
    assert rows[("frozen+synthetic", "proto", 1, False)]["uses_synthetic"] is True
    assert rows[("frozen+synthetic", "proto", 1, False)]["proto_share"] == 0.75
    log = (tmp_path / "run" / "log.txt").read_text()
    assert "[steered] regressor: 40 steps" in log
    # a second run reuses the fitted regressor and the sets
    again = run(cfg, tmp_path / "run2", progress=False, quiet=True)
    assert "generator from cache" in (tmp_path / "run2" / "log.txt").read_text()
    assert all(torch.equal(again.state.synthetic[key].images, s.images) for key, s in r.state.synthetic.items())
    # the key holds generator.kind and generator.steered only
    parts = key_parts("generators", cfg, base="b", encoder="e")["config"]
    assert set(parts) == {"generator.kind"} | {p for p in parts if p.startswith("generator.steered.")}
    other = load_config(DIGITS, [*steered, "generator.exemplar.train_steps=7", "generator.diffusion.seed=3"])
    assert key_parts("generators", other, base="b", encoder="e") == key_parts("generators", cfg, base="b", encoder="e")
    assert key_parts("generators", load_config(DIGITS, [*steered, "generator.steered.pool=13"]), base="b",
                     encoder="e") != key_parts("generators", cfg, base="b", encoder="e")


def test_steered_count_and_scale_are_checked_before_the_run(tmp_path):
    from fewgen.app.config import load_config
    from fewgen.app.runner import check_config
    from tests.conftest import DIGITS

    base = ["generator.kind=steered", "pipeline=[pretrain,generator,synthesize,evaluate]"]
    with pytest.raises(FewgenError, match="raise generator.steered.pool"):
        check_config(load_config(DIGITS, [*base, "generator.steered.pool=5", "synthesis.synthetic_per_class=8"]))
    with pytest.raises(FewgenError, match="scale"):
        check_config(load_config(DIGITS, [*base, "generator.steered.scale=[1.2,0.8]"]))
    with pytest.raises(FewgenError, match="drop 'adapt' from pipeline"):
        check_config(load_config(DIGITS, ["generator.kind=steered", "pipeline=[pretrain,generator,adapt,synthesize]"]))


def test_averaged_regressors_are_saved_and_loaded(digits, digits_conv4, tmp_path):
    """regressors=R averages R regressors' predictions; the generator's file holds all R and loads to
    the same images."""
    from fewgen.generators.steered import SteeredGenerator

    o = SteeredOptions(**{**SMALL, "regressor_steps": 30}, regressors=2)
    gen = SteeredGenerator(o, digits_conv4)
    gen.fit(digits.base)
    one = SteeredRedrawings(SteeredOptions(**{**SMALL, "regressor_steps": 30})).fit(digits_conv4, digits.base)
    shots = digits.novel.images[:3]
    assert len(gen.steerer.regressors) == 2
    assert not torch.allclose(gen.steerer.predicted_centres(digits_conv4, shots), one.predicted_centres(digits_conv4, shots))
    gen.save(tmp_path)
    back = SteeredGenerator.load_trained(tmp_path, digits_conv4)
    assert torch.equal(back.steerer.generate(digits_conv4, shots, keep=2), gen.steerer.generate(digits_conv4, shots, keep=2))


def test_pixel_target_learns_and_is_saved_and_loaded(digits, digits_conv4, tmp_path):
    """target=pixel+regressor: a copy of the backbone fine-tuned toward each base drawing's class mean
    (its loss falls, the backbone is untouched), averaged with the regressor's prediction; the
    generator's file holds it and loads to the same images."""
    from fewgen.generators.steered import (
        SteeredGenerator,
        leave_one_out_means,
        train_pixel_predictor,
    )

    before = {k: v.clone() for k, v in digits_conv4.state_dict().items()}
    feats = extract_features(digits_conv4, digits.base)
    target = leave_one_out_means(feats, digits.base.labels)

    def loss(net):
        return (1 - F.cosine_similarity(extract_features(net, digits.base), target)).mean().item()

    pixel = train_pixel_predictor(digits_conv4, digits.base, feats, epochs=3, seed=0, lr=1e-3)
    assert loss(pixel) < 0.75 * loss(digits_conv4), (loss(digits_conv4), loss(pixel))
    assert all(torch.equal(v, before[k]) for k, v in digits_conv4.state_dict().items())

    o = SteeredOptions(**{**SMALL, "regressor_steps": 30}, target="pixel+regressor", pixel_epochs=1)
    gen = SteeredGenerator(o, digits_conv4)
    gen.fit(digits.base)
    plain = SteeredRedrawings(SteeredOptions(**{**SMALL, "regressor_steps": 30})).fit(digits_conv4, digits.base)
    shots = digits.novel.images[:3]
    assert not torch.allclose(gen.steerer.predicted_centres(digits_conv4, shots),
                              plain.predicted_centres(digits_conv4, shots))
    gen.save(tmp_path)
    back = SteeredGenerator.load_trained(tmp_path, digits_conv4)
    assert torch.equal(back.steerer.generate(digits_conv4, shots, keep=2), gen.steerer.generate(digits_conv4, shots, keep=2))
    assert back.state_key() == gen.state_key() != SteeredGenerator(plain.options, digits_conv4).state_key()
