"""Learning with synthetic data: loss terms, label hallucination, batches, the learn step, presets."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from fewgen.learners.losses import (
    datadream_loss,
    hallucinate_labels,
    hallucination_kl,
    label_smoothed_ce,
    mmd,
)
from tests.conftest import DIGITS


def mmd_reference(x, y, bandwidths):
    """Biased multi-kernel MMD^2 with explicit loops."""
    def k(a, b):
        d2 = float(((a - b) ** 2).sum())
        return sum(math.exp(-d2 / (2 * s * s)) for s in bandwidths)

    n, m = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(n) for j in range(n)) / (n * n)
    kyy = sum(k(y[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    kxy = sum(k(x[i], y[j]) for i in range(n) for j in range(m)) / (n * m)
    return kxx + kyy - 2 * kxy


@pytest.mark.parametrize("bandwidths", [(1.0,), (0.5, 1.0, 2.0)])
def test_mmd_matches_double_loop(bandwidths):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 4, generator=g, dtype=torch.float64)
    y = torch.randn(5, 4, generator=g, dtype=torch.float64) + 0.5
    assert mmd(x, y, bandwidths).item() == pytest.approx(mmd_reference(x, y, bandwidths), rel=1e-9, abs=1e-12)


def test_mmd_is_zero_for_equal_samples_and_grows_with_shift():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 8, generator=g)
    assert mmd(x, x).abs().item() < 1e-6
    near, far = mmd(x, x + 0.1).item(), mmd(x, x + 1.0).item()
    assert 0 < near < far
    y = (x + 1.0).requires_grad_()
    mmd(x, y).backward()
    assert torch.isfinite(y.grad).all() and y.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        mmd(x, torch.randn(3, 5))


def test_label_smoothed_ce_matches_torch():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(7, 5, generator=g)
    y = torch.randint(5, (7,), generator=g)
    for eps in (0.0, 0.1, 0.3):
        ref = F.cross_entropy(logits, y, label_smoothing=eps)
        assert label_smoothed_ce(logits, y, eps).item() == pytest.approx(ref.item(), rel=1e-6)


def test_hallucination_kl():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 4, generator=g)
    q = torch.randn(6, 4, generator=g).softmax(-1)
    ref = F.kl_div(logits.log_softmax(-1), q, reduction="batchmean")
    assert hallucination_kl(logits, q).item() == pytest.approx(ref.item(), rel=1e-5)
    assert hallucination_kl(q.log(), q).abs().item() < 1e-6  # zero at the target
    assert hallucination_kl(logits, q).item() > 0


def test_datadream_loss_weights():
    g = torch.Generator().manual_seed(4)
    lr, ls = torch.randn(4, 3, generator=g), torch.randn(6, 3, generator=g)
    yr, ys = torch.randint(3, (4,), generator=g), torch.randint(3, (6,), generator=g)
    terms = datadream_loss(lr, yr, ls, ys, lam=0.8)
    assert terms["real"].item() == pytest.approx(0.8 * F.cross_entropy(lr, yr).item(), rel=1e-6)
    assert terms["synthetic"].item() == pytest.approx(0.2 * F.cross_entropy(ls, ys).item(), rel=1e-6)
    empty = datadream_loss(lr, yr, ls[:0], ys[:0], lam=0.8)
    assert empty["synthetic"].item() == 0.0


def test_label_hallucination_gives_base_images_soft_novel_labels():
    # three novel classes around three centres; base images near each centre
    g = torch.Generator().manual_seed(5)
    centres = torch.eye(3, 8) * 4
    support = centres.repeat_interleave(2, 0) + 0.3 * torch.randn(6, 8, generator=g)
    labels = torch.arange(3).repeat_interleave(2)
    base = centres[[2, 0, 1, 1]] + 0.3 * torch.randn(4, 8, generator=g)
    soft = hallucinate_labels(support, labels, base, n_classes=3)
    assert soft.shape == (4, 3)
    assert torch.allclose(soft.sum(1), torch.ones(4), atol=1e-5)
    assert soft.argmax(1).tolist() == [2, 0, 1, 1]
    assert (soft.max(1).values < 1).all() and (soft.min(1).values > 0).all()  # soft, not one-hot
    sharper = hallucinate_labels(support, labels, base, n_classes=3, temperature=0.1)
    assert (sharper.max(1).values > soft.max(1).values).all()


@pytest.fixture(scope="module")
def digits():
    from fewgen.data import load_dataset

    return load_dataset("digits")


def test_datadream_batches_repeat_real_to_balance(digits):
    from fewgen.data.fewshot import few_shot_set
    from fewgen.learners.datadream_classifier import datadream_batches, real_repeats

    real = few_shot_set(digits.novel, 1, seed=0)  # 5 images
    syn = few_shot_set(digits.novel, 20, seed=1)  # 100 "synthetic" images
    assert real_repeats(len(real), len(syn)) == 20
    batch_fn = datadream_batches(real, syn, 40, "t")
    n_real = sum(len(batch_fn(s)["y_real"]) for s in range(50))
    assert 0.4 < n_real / (50 * 40) < 0.6  # half the pool is (repeated) real
    b = batch_fn(0)
    assert b["x_real"].dtype == torch.uint8 and b["x_syn"].shape[1:] == digits.novel.image_shape


def test_diffalign_batches_are_class_matched_and_ablations_drop_terms(digits):
    from fewgen.backbones import create_backbone
    from fewgen.data.fewshot import few_shot_set
    from fewgen.learners.diffalign import DiffAlignOptions, diffalign_batches, diffalign_loss_fn
    from fewgen.learners.finetune import BackboneClassifier

    real = few_shot_set(digits.novel, 2, seed=0)
    syn = few_shot_set(digits.novel, 6, seed=1)
    base = digits.base.images[:30]
    soft = torch.full((30, 5), 0.2)
    batch = diffalign_batches(real, syn, base, soft, 8, 12, 6, "t")(0)
    assert set(batch["y_syn"].tolist()) <= set(batch["y_real"].tolist())
    assert batch["x_base"].shape[0] == 6 and batch["q_base"].shape == (6, 5)
    model = BackboneClassifier(create_backbone("conv4", in_chans=1), 5)
    fbatch = {k: (v.float() / 255 if k.startswith("x_") else v) for k, v in batch.items()}
    w = DiffAlignOptions()
    assert set(diffalign_loss_fn(w)(model, fbatch)) == {"real", "synthetic", "hallucination", "mmd"}
    for term in ("real", "synthetic", "hallucination", "mmd"):
        assert term not in diffalign_loss_fn(w.without(term))(model, fbatch)


def test_finetune_is_deterministic_and_head_eval_is_exact(digits, monkeypatch):
    from fewgen.backbones import create_backbone
    from fewgen.data.fewshot import few_shot_set, sample_episodes
    from fewgen.learners.finetune import (
        BackboneClassifier,
        FinetuneSettings,
        ce_batches,
        ce_loss,
        finetune,
        finetuned_episode_accuracies,
    )

    real = few_shot_set(digits.novel, 2, seed=0)

    def train():
        torch.manual_seed(0)
        model = BackboneClassifier(create_backbone("conv4", in_chans=1, hidden=8, out_channels=8), 5)
        hist = finetune(model, ce_batches(real, 10, "t"), ce_loss, FinetuneSettings(steps=3, log_every=1),
                        digits.novel.image_shape)
        return model, hist

    (m1, h1), (m2, h2) = train(), train()
    assert [h["loss"] for h in h1] == [h["loss"] for h in h2]
    assert all(torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m2.state_dict().values()))

    # features = one-hot true labels and an identity head: restricted to the episode classes the
    # head is always right, and so is a prototype classifier on those features
    import fewgen.learners.finetune as ft

    novel = digits.novel
    oracle = torch.nn.Module()
    oracle.head = torch.nn.Identity()
    ep = sample_episodes(novel, 3, 1, 5, 20, seed=0)
    monkeypatch.setattr(ft, "model_features", lambda model, images, **kw: F.one_hot(novel.labels, 5).float())
    acc = finetuned_episode_accuracies(oracle, novel, [ep], ["head", "proto"])
    assert torch.allclose(acc["head"][0], torch.ones(20, dtype=torch.float64))
    assert torch.allclose(acc["proto"][0], torch.ones(20, dtype=torch.float64))


TINY = ["seeds=[0]", "pretrain.epochs=1", "pretrain.val_episodes=10", "pretrain.max_steps_per_epoch=4",
        "eval.episodes=20", "eval.n_shots=[1]", "learner.steps=3", "learner.batch_size=10",
        "learner.synthetic_batch_size=10", "learner.base_batch_size=10", "learner.augmented_copies_per_class=12",
        "num_threads=1"]


@pytest.mark.slow
def test_learn_step_end_to_end_on_digits_with_augmented_copies(tmp_path):
    """The whole learner table on digits, with augmented copies standing in for a generator."""
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    cfg = load_config(DIGITS, [*TINY, "pipeline=[pretrain,augmented-copies,learn,report]", "learner.sweep=[0,5,12,50]",
                               f"cache_dir={tmp_path / 'cache'}"])
    r = run(cfg, tmp_path / "run", progress=False, quiet=True)
    methods = {(row["method"], row["classifier"]) for row in r.rows}
    for m in ("real-only", "synthetic-only", "datadream", "diffalign", "diffalign-no-synthetic",
              "diffalign-no-hallucination", "diffalign-no-mmd"):
        assert (m, "head") in methods and (m, "logreg") in methods
    assert ("frozen+synthetic", "logreg") in methods
    sweep = sorted({row["synthetic_per_class"] for row in r.rows if row.get("sweep")})
    assert sweep == [0, 5, 12]  # 50 is above the 12 copies per class: skipped, not faked
    for row in r.rows:
        assert 0 <= row["accuracy"] <= 100 and row["episodes"] == (1 if row.get("all_way") else 20)
        assert row["uses_synthetic"] is False  # augmented copies are the generator-free control
    assert any(row["method"] == "frozen+synthetic" and row.get("all_way") for row in r.rows)
    dd = next(row for row in r.rows if row["method"] == "datadream" and row["classifier"] == "head")
    assert dd["n_synthetic"] == [60] and dd["synthetic_per_class"] == 12
    hist = json.loads((tmp_path / "run" / "learn_history.json").read_text())
    assert "diffalign/seed0/1shot" in hist
    assert (tmp_path / "run" / "report" / "index.html").exists()
    # a rerun reuses every fine-tuned model from the cache and gives identical numbers
    r2 = run(cfg, tmp_path / "run2", progress=False, quiet=True)
    assert [row["accuracy"] for row in r2.rows] == [row["accuracy"] for row in r.rows]
    assert "from cache" in (tmp_path / "run2" / "log.txt").read_text()


def test_keep_consistent_keeps_each_class_most_likely_images_in_order():
    from fewgen.data.base import ArrayDataset
    from fewgen.errors import FewgenError
    from fewgen.learners.synthetic import first_per_class, keep_consistent

    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    syn = ArrayDataset(torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 1, 2, 2).contiguous(), labels,
                       ["a", "b"], name="syn")
    own = torch.tensor([0.1, 0.9, 0.2, 0.8, 0.7, 0.05, 0.6, 0.3])
    kept = keep_consistent(syn, own, 0.5)
    assert kept.images[:, 0, 0, 0].tolist() == [1, 3, 4, 6]  # top half per class, original order
    assert kept.labels.tolist() == [0, 0, 1, 1]
    assert first_per_class(kept, 1).images[:, 0, 0, 0].tolist() == [1, 4]
    assert keep_consistent(syn, own, 1.0) is syn
    assert len(keep_consistent(syn, own, 0.01)) == 2  # never empties a class
    with pytest.raises(FewgenError, match="synthetic_keep"):
        keep_consistent(syn, own, 0)


def test_learn_step_filters_synthetic_images_by_the_shot_classifier(tmp_path):
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    cfg = load_config(DIGITS, [*TINY, "pipeline=[pretrain,augmented-copies,learn]", "learner.methods=[datadream]",
                               "learner.synthetic_keep=0.5", "learner.frozen_synthetic=false",
                               f"cache_dir={tmp_path / 'cache'}"])
    r = run(cfg, tmp_path / "run", progress=False, quiet=True)
    dd = next(row for row in r.rows if row["method"] == "datadream" and row["classifier"] == "head")
    assert dd["synthetic_per_class"] == 6 and dd["n_synthetic"] == [30]  # half of 12 copies of 5 classes
    diag = json.loads((tmp_path / "run" / "synthetic_diagnostics.json").read_text())
    assert next(iter(diag.values()))["synthetic_per_class"] == 6


def test_learn_step_errors_without_synthetic(tmp_path):
    from fewgen.app.config import load_config
    from fewgen.app.runner import run
    from fewgen.errors import FewgenError

    cfg = load_config(DIGITS, [*TINY, "pipeline=[pretrain,learn]", f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(FewgenError, match="synthesize"):
        run(cfg, tmp_path / "run", progress=False, quiet=True)
    bad = load_config(DIGITS, [*TINY, "pipeline=[pretrain,learn]", "learner.methods=[real-only, datadreem]",
                               f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(FewgenError, match="datadream"):
        run(bad, tmp_path / "run2", progress=False, quiet=True)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """One cache for both presets: the second reuses pretraining, generator, adapters, images."""
    return tmp_path_factory.mktemp("preset-cache")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["datadream", "diffalign"])
def test_presets_run_end_to_end_on_digits(preset, tmp_path, shared_cache):
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    cfg = load_config(preset, ["data.dataset=digits", "data.image_size=null", "eval.n_ways=[5]", *TINY,
                               *PRESET_TINY, f"cache_dir={shared_cache}"])
    r = run(cfg, tmp_path / "run", progress=False, quiet=True)
    methods = {row["method"] for row in r.rows}
    assert {"real-only", "synthetic-only", "datadream"} <= methods
    if preset == "diffalign":
        assert {"diffalign", "diffalign-no-mmd"} <= methods
    real_only = {"real-only", "datadream@0", "frozen+synthetic@0", "ce"}  # none generated
    for row in r.rows:  # every row says whether generated images went into it
        assert row["uses_synthetic"] is (row["method"] not in real_only), row["method"]
    assert (tmp_path / "run" / "report" / "index.html").exists()


# tiny generator, adaptation and synthesis (fewgen.generators / fewgen.synthesis settings)
PRESET_TINY = ["generator.diffusion.train_steps=10", "generator.diffusion.block_out_channels=[16,32]",
               "generator.diffusion.attention_levels=[false,true]", "generator.diffusion.cond_dim=32",
               "generator.diffusion.batch_size=16", "generator.datadream.steps_per_class=1",
               "generator.datadream.batch_size=4", "synthesis.synthetic_per_class=4", "synthesis.steps=2",
               "synthesis.chunk=4", "synthesis.grid_classes=0", "learner.sweep=[0,2]"]


def _write_class_folders(root, counts: dict[str, int], size: int = 12) -> None:
    from PIL import Image

    for ci, (name, n) in enumerate(counts.items()):
        (root / name).mkdir(parents=True)
        for i in range(n):
            Image.new("L", (size, size), color=10 * ci + i).save(root / name / f"{i:03d}.png")


def test_import_synthetic_reads_a_folder_in_novel_class_order(tmp_path):
    from fewgen.data.base import ArrayDataset
    from fewgen.errors import FewgenError
    from fewgen.learners.synthetic import import_synthetic

    novel = ArrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 0, 1, 1]), ["7", "5"], name="n")
    _write_class_folders(tmp_path / "syn", {"5": 4, "7": 3, "other": 2})
    syn = import_synthetic(str(tmp_path / "syn"), novel, 2)
    assert syn.class_names == ["7", "5"] and syn.image_shape == (1, 8, 8)
    assert syn.labels.tolist() == [0, 0, 1, 1]
    # class "7" was written second (colours 10, 11), "5" first (0, 1): first files by name, per class
    assert syn.images[:, 0, 0, 0].tolist() == [10, 11, 0, 1]
    with pytest.raises(FewgenError, match="has 3 images but synthesis.synthetic_per_class=4"):
        import_synthetic(str(tmp_path / "syn"), novel, 4)
    _write_class_folders(tmp_path / "partial", {"5": 2})
    with pytest.raises(FewgenError, match="no folder for novel class.*'7'"):
        import_synthetic(str(tmp_path / "partial"), novel, 1)
    with pytest.raises(FewgenError, match="is not a folder"):
        import_synthetic(str(tmp_path / "nowhere"), novel, 1)
    (tmp_path / "syn" / "5" / "000.png").write_bytes(b"not a png")
    with pytest.raises(FewgenError, match="cannot read image .*000.png"):
        import_synthetic(str(tmp_path / "syn"), novel, 2)


def test_import_synthetic_step_feeds_the_learner(tmp_path):
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    _write_class_folders(tmp_path / "syn", {str(d): 6 for d in range(5, 10)}, size=16)
    cfg = load_config(DIGITS, [*TINY, "pipeline=[pretrain,import-synthetic,learn]", "learner.methods=[datadream]",
                               f"synthesis.import_dir={tmp_path / 'syn'}", "synthesis.synthetic_per_class=4",
                               "learner.frozen_synthetic=false", f"cache_dir={tmp_path / 'cache'}"])
    r = run(cfg, tmp_path / "run", progress=False, quiet=True)
    dd = next(row for row in r.rows if row["method"] == "datadream" and row["classifier"] == "head")
    assert dd["synthetic_per_class"] == 4 and dd["n_synthetic"] == [20]
    assert "imported from" in (tmp_path / "run" / "log.txt").read_text()


def test_mnist_as_digits_makes_optdigits_counts():
    """The oracle script's conversion: 4x4 block counts of a 32x32 bitmap, full height."""
    import importlib.util
    from pathlib import Path

    import numpy as np

    path = Path(__file__).resolve().parents[1] / "scripts" / "mnist_as_digits.py"
    spec = importlib.util.spec_from_file_location("mnist_as_digits", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    img = np.zeros((28, 28), np.uint8)
    img[4:24, 12:16] = 255  # a thin vertical bar: a "1"
    out = mod.optdigits_8x8(img)
    assert out.shape == (8, 8) and out.min() >= 0 and out.max() == 16
    assert (out.sum(1) > 0).all()  # stretched to the full height, as optdigits bitmaps are
    assert (out.sum(0) > 0).sum() == 4  # widened to the 16-pixel minimum width: 4 blocks
    assert out.sum() == 16 * 32  # a 16 x 32 block of on pixels
