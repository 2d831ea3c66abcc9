"""The exemplar-conditioned generator (fewgen.generators.exemplar) with tiny models."""

from __future__ import annotations

import pytest
import torch

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.generators.exemplar import (
    AdaptedExemplar,
    ExemplarConfig,
    ExemplarDiffusion,
    pair_indices,
    train_exemplar_datadream,
)
from fewgen.generators.pixels import to_model_space
from tests.conftest import DIGITS


def tiny_encoder():
    from fewgen.backbones.conv4 import Conv4

    torch.manual_seed(0)
    return Conv4(in_chans=1, hidden=8, out_channels=16, depth=2).eval()


def tiny_exemplar(cond_mode: str = "both", **kw) -> ExemplarDiffusion:
    torch.manual_seed(0)
    cfg = ExemplarConfig(image_size=8, channels=1, block_out_channels=[8, 16], attention_levels=[False, True],
                         norm_num_groups=4, cond_dim=8, n_tokens=2, feat_dim=16, cond_mode=cond_mode, **kw)
    return ExemplarDiffusion(cfg, tiny_encoder() if cond_mode != "channels" else None)


def toy_base(n_classes: int = 4, per_class: int = 3) -> ArrayDataset:
    g = torch.Generator().manual_seed(1)
    centres = torch.randint(0, 256, (n_classes, 1, 8, 8), generator=g)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    noise = torch.randint(-20, 21, (len(labels), 1, 8, 8), generator=g)
    images = (centres[labels] + noise).clamp(0, 255).to(torch.uint8)
    return ArrayDataset(images, labels, [f"c{i}" for i in range(n_classes)], name="toy-base")


def test_pairs_are_same_class_and_never_an_image_with_itself():
    labels = torch.tensor([0, 0, 1, 1, 1, 2, 3, 3])  # class 2 has one image: never drawn
    ex, tg = pair_indices(labels, 500, torch.Generator().manual_seed(0))
    assert torch.equal(labels[ex], labels[tg])
    assert (ex != tg).all()
    assert 5 not in ex.tolist() and 5 not in tg.tolist()
    assert set(labels[ex].tolist()) == {0, 1, 3}
    with pytest.raises(FewgenError, match="at least two images"):
        pair_indices(torch.tensor([0, 1, 2]), 4, torch.Generator().manual_seed(0))


@pytest.mark.parametrize("cond_mode", ["features", "channels", "both"])
def test_guidance_zero_is_the_conditional_model(cond_mode):
    gen = tiny_exemplar(cond_mode)
    g = torch.Generator().manual_seed(0)
    x_t, ex = torch.randn(3, 1, 8, 8, generator=g), torch.rand(3, 1, 8, 8, generator=g) * 2 - 1
    t = torch.tensor([10, 500, 900])
    with torch.no_grad():
        for p in gen.conditioner.parameters():  # null tokens differ from the exemplar's
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        cond = gen._eps(x_t, t, ex, gen.encode(ex), torch.zeros(3, dtype=torch.bool))
        uncond = gen._eps(x_t, t, ex, gen.encode(ex), torch.ones(3, dtype=torch.bool))
        assert torch.allclose(gen.predict_noise(x_t, t, ex, guidance=0.0), cond, atol=1e-6)
        assert not torch.allclose(cond, uncond, atol=1e-4)
        w = 1.5
        assert torch.allclose(gen.predict_noise(x_t, t, ex, guidance=w), (1 + w) * cond - w * uncond, atol=1e-5)


def test_features_mode_needs_the_backbone():
    with pytest.raises(FewgenError, match="needs the pretrained backbone"):
        ExemplarDiffusion(ExemplarConfig(image_size=8, block_out_channels=[8, 16], attention_levels=[False, True],
                                         norm_num_groups=4, cond_mode="features"), None)


def test_fit_lowers_the_loss_and_resumes_to_the_same_weights(tmp_path):
    base = toy_base()
    a = tiny_exemplar(rotations=True, pair_aug=0.5, exemplar_aug=0.3, t_dist="high")
    res = a.fit(base, steps=40, batch_size=8, lr=3e-3, warmup=5, seed=0)
    assert sum(res.losses[-10:]) < sum(res.losses[:10])
    b = tiny_exemplar(rotations=True, pair_aug=0.5, exemplar_aug=0.3, t_dist="high")
    state = tmp_path / "state.safetensors"

    def interrupt(message):
        if "step 25/" in message:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # killed at step 25; the last state is step 20's
        b.fit(base, steps=40, batch_size=8, lr=3e-3, warmup=5, seed=0, state_path=state, save_every=10,
              log=interrupt, log_every=5)
    c = tiny_exemplar(rotations=True, pair_aug=0.5, exemplar_aug=0.3, t_dist="high")
    c.fit(base, steps=40, batch_size=8, lr=3e-3, warmup=5, seed=0, state_path=state, save_every=10)
    for (_, pa), (_, pc) in zip(a.unet.state_dict().items(), c.unet.state_dict().items()):
        assert torch.allclose(pa, pc, atol=1e-6)


def test_sdedit_starts_from_the_source_and_each_image_depends_on_its_own_seed(tmp_path):
    gen = tiny_exemplar()
    shots = toy_base().images[:4]
    copies = gen.sdedit(shots, 0.0, seeds=[1, 2, 3, 4], steps=4)
    assert torch.equal(copies, shots)
    a = gen.sdedit(shots, [0.5, 1.0, 0.5, 1.0], seeds=[1, 2, 3, 4], steps=4, guidance=1.0)
    b = torch.cat([gen.sdedit(shots[i:i + 1], [0.5, 1.0, 0.5, 1.0][i], seeds=[i + 1], steps=4, guidance=1.0)
                   for i in range(4)])
    assert a.dtype == torch.uint8 and a.shape == shots.shape and torch.equal(a, b)
    assert not torch.equal(a, gen.sdedit(shots, [0.5, 1.0, 0.5, 1.0], seeds=[5, 6, 7, 8], steps=4, guidance=1.0))
    gen.save(tmp_path)
    again = ExemplarDiffusion.load(tmp_path, tiny_encoder())
    assert torch.equal(again.sdedit(shots, [0.5, 1.0, 0.5, 1.0], seeds=[1, 2, 3, 4], steps=4, guidance=1.0), a)
    mean = gen.encode(to_model_space(shots)).mean(0, keepdim=True).expand(4, -1)
    assert not torch.equal(gen.sdedit(shots, 1.0, seeds=[1, 2, 3, 4], steps=4, feats=mean), gen.sample(
        shots, seeds=[1, 2, 3, 4], steps=4))
    with pytest.raises(FewgenError, match="one strength"):
        gen.sdedit(shots, [0.5, 1.5, 0.5, 0.5], seeds=[1, 2, 3, 4])


def test_datadream_on_top_of_the_exemplar_generator(tmp_path):
    from fewgen.generators.datadream import DataDreamAdapter, DataDreamConfig

    gen = tiny_exemplar()
    few = toy_base(n_classes=3, per_class=2)
    shots = few.images[::2]
    for mode in ("dset", "cls"):
        adapter = train_exemplar_datadream(gen, few, DataDreamConfig(mode=mode, rank=2, alpha=2.0, steps_per_class=3,
                                                                     batch_size=4, lr=1e-2))
        assert len(adapter.lora) == (1 if mode == "dset" else 3) and adapter.class_embeddings.shape == (3, 0)
        adapted = AdaptedExemplar(gen, adapter)
        adapted.use(1)
        before = gen.sdedit(shots, 1.0, seeds=[1, 2, 3], steps=3)
        after = adapted.sdedit(shots, 1.0, seeds=[1, 2, 3], steps=3)
        assert not torch.equal(before, after)
        adapter.save(tmp_path / mode)
        loaded = DataDreamAdapter.load(tmp_path / mode)
        assert loaded.key == adapter.key
        again = AdaptedExemplar(gen, loaded)
        again.use(1)
        assert torch.equal(again.sdedit(shots, 1.0, seeds=[1, 2, 3], steps=3), after)


EXEMPLAR = ["generator.kind=exemplar", "generator.exemplar.cond=both", "generator.exemplar.block_out_channels=[8,16]",
            "generator.exemplar.attention_levels=[false,true]", "generator.exemplar.cond_dim=8",
            "generator.exemplar.train_steps=6", "generator.exemplar.batch_size=8", "synthesis.synthetic_per_class=4", "synthesis.steps=2",
            "synthesis.sdedit_strengths=[0.5,1.0]", "synthesis.chunk=4", "synthesis.grid_classes=2"]
TINY = ["pretrain.epochs=1", "pretrain.val_episodes=10", "eval.episodes=20", "seeds=[0]", "eval.n_shots=[1,2]",
        "learner.methods=[]", "learner.eval_with=[head]"]


def test_the_pipeline_draws_from_each_seeds_shots(tmp_path):
    """pretrain -> exemplar generator -> synthesis from the shots -> frozen classifiers with the
    generated images in the support; a set's key holds its shots and the conditioning mode."""
    from fewgen.app.config import load_config
    from fewgen.app.runner import run
    from fewgen.app.steps.generate import run_synthesis_spec
    from fewgen.synthesis.store import SynthesisCache

    cfg = load_config(DIGITS, [*TINY, *EXEMPLAR, f"cache_dir={tmp_path / 'cache'}", "learner.augmented_control=true",
                               "learner.augmented_copies_per_class=3", "export.extra=synthetic+copies",
                               "pipeline=[pretrain,generator,synthesize,learn,evaluate,export]"])
    r = run(cfg, tmp_path / "run", progress=False, quiet=True)
    syn = r.state.synthetic
    assert set(syn) == {(0, 1), (0, 2)} and all(len(s) == 4 * 5 for s in syn.values())
    assert "exemplar-both-sdedit0.5+1" in syn[(0, 1)].name
    rows = {(row["method"], row["classifier"], row["n_shot"], bool(row.get("all_way"))): row for row in r.rows}
    assert rows[("frozen+synthetic", "proto", 1, True)]["uses_synthetic"] is True
    assert rows[("ce", "proto", 1, False)]["uses_synthetic"] is False
    control = rows[("frozen+augmented-copies", "logreg", 2, True)]  # the generator-free control, same episodes
    assert control["uses_synthetic"] is False and control["synthetic_per_class"] == 3
    both = rows[("frozen+synthetic+copies", "logreg", 2, True)]
    exported = r.state.classifier.info  # fitted as that row's classifier: the same all-way accuracy
    assert exported["fit"]["uses_synthetic"] and exported["all_way"]["accuracy"] == both["seed_accuracies"][0]
    assert (tmp_path / "run" / "grids" / "seed0_1shot" / "overview.png").exists()
    gen = r.state.generator
    from fewgen.data.fewshot import few_shot_set

    novel = r.data.novel
    spec1 = run_synthesis_spec(r, gen, None, few_shot_set(novel, 1, 0))
    store = SynthesisCache(r.cache)
    assert store.key(spec1) != store.key(run_synthesis_spec(r, gen, None, few_shot_set(novel, 1, 1)))  # other shots
    assert spec1.sources == few_shot_set(novel, 1, 0).digest()
    # another conditioning mode is another generator, hence another set
    other = load_config(DIGITS, [*TINY, *EXEMPLAR, "generator.exemplar.cond=channels", f"cache_dir={tmp_path / 'c2'}",
                                 "pipeline=[pretrain,generator]"])
    r2 = run(other, tmp_path / "run2", progress=False, quiet=True)
    assert r2.state.generator.state_key() != gen.state_key()
    again = run(cfg, tmp_path / "run3", progress=False, quiet=True)  # everything from the cache, same images
    assert torch.equal(again.state.synthetic[(0, 1)].images, syn[(0, 1)].images)
    assert "generator from cache" in (tmp_path / "run3" / "log.txt").read_text()


def test_exemplar_generator_with_features_needs_pretraining_first(tmp_path):
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    cfg = load_config(DIGITS, [*TINY, *EXEMPLAR, f"cache_dir={tmp_path / 'cache'}", "pipeline=[generator]"])
    with pytest.raises(FewgenError, match="the generator step needs the run's backbone: put 'pretrain' before it"):
        run(cfg, tmp_path / "run", progress=False, quiet=True)
