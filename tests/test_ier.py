"""IER (Rizve et al. 2021): losses against slow references, the memory bank, the
transformations, distillation from a saved teacher, and both recipes end to end on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from fewgen.app.config import load_config, pretrain_options
from fewgen.cache import ArtifactCache
from fewgen.checkpoint import load_tensors
from fewgen.data import load_dataset
from fewgen.data.augment import add_rotation_classes
from fewgen.errors import FewgenError
from fewgen.pretrain import RECIPES, pretrain_backbone
from fewgen.pretrain.ier import (
    FAMILY_SIZES,
    BatchIndexer,
    MemoryBank,
    TransformSet,
    _make_views,
    _ViewPlan,
    distill_kl,
    ier_losses,
    invariant_contrastive_loss,
)
from fewgen.pretrain.loop import TrainSettings, train_backbone
from tests.conftest import DIGITS

TINY = ["pretrain.epochs=1", "pretrain.max_steps_per_epoch=3", "pretrain.batch_size=16", "pretrain.val_episodes=10",
        "pretrain.ier.bank_negatives=50"]


def tiny_cfg(recipe: str, *extra: str):
    return load_config(DIGITS, [f"pretrain.recipe={recipe}", *TINY, *extra])


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# ----------------------------------------------------------------------------- losses


def slow_contrastive(anchor, positive, negatives, tau):
    total = 0.0
    for i in range(len(anchor)):
        a, p = anchor[i].double(), positive[i].double()
        cos = lambda u, v: float(u @ v / (u.norm() * v.norm()))  # noqa: E731
        num = math.exp(cos(a, p) / tau)
        den = num + sum(math.exp(cos(p, n.double()) / tau) for n in negatives)
        total += -math.log(num / den)
    return total / len(anchor)


@pytest.mark.parametrize("tau", [1.0, 0.1])
def test_contrastive_loss_matches_double_loop(tau):
    g = torch.Generator().manual_seed(0)
    a, p, n = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g), torch.randn(7, 8, generator=g)
    got = invariant_contrastive_loss(a, p, n, tau)
    assert got.item() == pytest.approx(slow_contrastive(a, p, n, tau), rel=1e-5)


def test_contrastive_loss_hand_value():
    # one pair, identical anchor/positive, one orthogonal negative, tau = 1: -log(e / (e + 1))
    a = torch.tensor([[1.0, 0.0]])
    got = invariant_contrastive_loss(a, a.clone(), torch.tensor([[0.0, 2.0]]), 1.0)
    assert got.item() == pytest.approx(-math.log(math.e / (math.e + 1)), rel=1e-6)


def test_distill_kl_matches_hand_formula():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=g), torch.randn(4, 6, generator=g)
    T = 4.0
    ref = 0.0
    for i in range(4):
        ps, pt = F.softmax(s[i] / T, 0), F.softmax(t[i] / T, 0)
        ref += float((pt * (pt.log() - ps.log())).sum())
    assert distill_kl(s, t, T).item() == pytest.approx(ref / 4 * T * T, rel=1e-5)
    assert distill_kl(t, t, T).item() == pytest.approx(0.0, abs=1e-6)


def test_ier_losses_terms():
    g = torch.Generator().manual_seed(2)
    B, V, C, M, D = 3, 4, 5, 4, 6
    logits, eq_logits = torch.randn(V * B, C, generator=g), torch.randn(V * B, M, generator=g)
    labels, eq_labels = torch.randint(0, C, (V * B,), generator=g), torch.arange(V).repeat_interleave(B)
    inv, bank, neg = torch.randn(V * B, D, generator=g), torch.randn(B, D, generator=g), torch.randn(9, D, generator=g)
    out = ier_losses(logits, labels, eq_logits, eq_labels, inv, bank, neg, V, 0.5)
    assert out["ce"].item() == pytest.approx(F.cross_entropy(logits, labels).item())
    assert out["equivariant"].item() == pytest.approx(F.cross_entropy(eq_logits, eq_labels).item())
    v0 = inv[:B]
    ref = slow_contrastive(bank, v0, neg, 0.5) + sum(slow_contrastive(v0, inv[v * B:(v + 1) * B], neg, 0.5)
                                                      for v in range(1, V))
    assert out["invariant"].item() == pytest.approx(ref / V, rel=1e-5)
    assert "invariant" not in ier_losses(logits, labels, eq_logits, eq_labels, inv, None, None, V, 0.5)


# ----------------------------------------------------------------------------- memory bank


def test_memory_bank_update_and_negatives():
    bank = MemoryBank(10, 3, momentum=0.9, seed=0)
    assert torch.allclose(bank.features.norm(dim=1), torch.ones(10), atol=1e-5)
    before = bank.features.clone()
    idx, feats = torch.tensor([2, 7]), torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 10.0]])
    bank.update(idx, feats)
    assert torch.allclose(bank.features[idx], 0.9 * before[idx] + 0.1 * feats)
    others = torch.tensor([i for i in range(10) if i not in (2, 7)])
    assert torch.equal(bank.features[others], before[others])
    neg = bank.negatives(torch.tensor([0, 1, 2]), k=100)  # capped at the 7 other rows
    assert neg.shape == (7, 3)
    rows = {tuple(r.tolist()) for r in bank.features[3:]}
    assert all(tuple(r.tolist()) in rows for r in neg)
    assert "features" in bank.state_dict()  # a buffer: checkpointed with the training state


def test_batch_indexer_matches_training_loop(digits):
    images, labels = digits.base.images, digits.base.labels
    s = TrainSettings(epochs=2, batch_size=32, lr=0.01, val_episodes=5, max_steps_per_epoch=3)
    indexer = BatchIndexer(labels, s, "probe")
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 3))
    seen = []

    def loss_fn(x, y, step):
        seen.append(indexer(step, y))  # raises if the recomputed indices do not give these labels
        return {"ce": F.cross_entropy(model(x), y)}

    backbone = torch.nn.Sequential(torch.nn.Flatten())
    backbone.forward_features = backbone.forward  # the loop validates backbone features
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        train_backbone(model, backbone, loss_fn, images, labels, digits.val, s, Path(d), stage="probe",
                       log=lambda m: None, progress=False)
    assert len(seen) == 6 and all(len(i) == 32 for i in seen)
    with pytest.raises(RuntimeError, match="batch order"):
        indexer(0, (labels[seen[0]] + 1) % 3)


# ----------------------------------------------------------------------------- transformations


@pytest.mark.parametrize("family", list(FAMILY_SIZES))
def test_transform_family_shapes_and_identity(family):
    ts = TransformSet([family])
    assert len(ts) == FAMILY_SIZES[family]
    x = torch.rand(4, 1, 16, 16)
    assert torch.allclose(ts.apply(x, 0), x)
    for t in range(1, len(ts)):
        y = ts.apply(x, t)
        assert y.shape == x.shape and torch.isfinite(y).all() and not torch.allclose(y, x)


def test_transform_product_and_rotation():
    ts = TransformSet(["crop", "rotate"])
    assert len(ts) == 16 and ts.index({"crop": 2, "rotate": 3}) == 11 and ts.component(11, "crop") == 2
    x = torch.rand(2, 1, 8, 8)
    assert torch.equal(ts.apply(x, ts.index({"rotate": 1})), torch.rot90(x, 1, dims=(2, 3)))
    with pytest.raises(FewgenError, match="unknown IER transformation"):
        TransformSet(["rotate", "spin"])


def test_relabel_views_land_in_the_right_rotation_class(digits):
    # a view rotated by r' of an image of rotation class (c, r) is exactly an image of class (c, r + r')
    base = digits.base
    C, n = base.num_classes, len(base)
    images, labels = add_rotation_classes(base.images, base.labels, C)
    ts = TransformSet(["rotate"])
    pick = torch.tensor([0, n + 1, 2 * n + 2, 3 * n + 3])  # one image from each rotation
    x, y = images[pick].float(), labels[pick]
    xv, yv, ev, V = _make_views(x, y, _ViewPlan(ts, 4, True, C))
    assert V == 4
    for v in range(4):
        for j, i in enumerate(pick.tolist()):
            src = i % n
            target = src + int(yv[v * 4 + j] // C) * n  # same source image in the rotation the label names
            assert int(yv[v * 4 + j] % C) == int(base.labels[src])
            assert torch.equal(xv[v * 4 + j], images[target].float())
            assert int(ev[v * 4 + j]) == int(yv[v * 4 + j] // C)  # absolute orientation
    # drop mode: the class label is invariant and the transformation label is the applied one
    xv, yv, ev, _ = _make_views(x, y, _ViewPlan(ts, 4, False, C))
    assert torch.equal(yv, y.repeat(4)) and torch.equal(ev, torch.arange(4).repeat_interleave(4))


def test_num_views_subset_keeps_identity_first():
    ts = TransformSet(["rotate", "flip"])
    x, y = torch.rand(3, 1, 8, 8), torch.tensor([0, 1, 2])
    torch.manual_seed(0)
    xv, yv, ev, V = _make_views(x, y, _ViewPlan(ts, 3, False, 3))
    assert V == 3 and xv.shape == (9, 1, 8, 8)
    assert torch.equal(ev[:3], torch.zeros(3, dtype=torch.long)) and torch.equal(xv[:3], x)
    assert len(set(ev.tolist())) == 3


# ----------------------------------------------------------------------------- recipes


def test_recipes_registered():
    assert {"ce", "ier", "ier-distill"} <= set(RECIPES.names())


@pytest.mark.parametrize("bad, match", [
    ("pretrain.ier.num_views=1", "num_views"),
    ("pretrain.ier.num_views=5", "num_views"),
    ("pretrain.ier.transforms=[spin]", "unknown IER transformation"),
    ("pretrain.ier.rotation_classes=keep", "drop or relabel"),
    ("pretrain.ier.ce_weight=-1", ">= 0"),
])
def test_bad_settings_fail_before_training(digits, tmp_path, bad, match):
    cfg = tiny_cfg("ier", bad)
    with pytest.raises(FewgenError, match=match):
        pretrain_backbone(cfg.backbone, cfg.pretrain, digits, ArtifactCache(tmp_path), log=lambda m: None, progress=False)
    assert not list(tmp_path.glob("backbones/*/*.safetensors"))


@pytest.mark.parametrize("mode", ["drop", "relabel"])
def test_ier_end_to_end_on_digits(digits, tmp_path, mode):
    cfg = tiny_cfg("ier", f"pretrain.ier.rotation_classes={mode}")
    pb = pretrain_backbone(cfg.backbone, cfg.pretrain, digits, ArtifactCache(tmp_path), log=lambda m: None, progress=False)
    rec = pb.history[-1]
    assert {"loss/ce", "loss/equivariant", "loss/invariant"} <= set(rec)
    assert all(math.isfinite(v) for k, v in rec.items() if k.startswith("loss/"))
    state, _ = load_tensors(next(tmp_path.glob("backbones/*/ier-state.safetensors")))
    n_train = len(digits.base)  # both modes train on the unrotated images (relabel: views are rotation classes)
    assert state["model.bank.features"].shape == (n_train, 64)
    feats = pb.backbone.forward_features(digits.novel.float_images()[:8])
    assert feats.shape == (8, pb.backbone.num_features) and torch.isfinite(feats).all()


def test_ablation_weight_zero_drops_the_term(digits, tmp_path):
    cfg = tiny_cfg("ier", "pretrain.ier.invariant_weight=0", "pretrain.ier.equivariant_weight=0")
    pb = pretrain_backbone(cfg.backbone, cfg.pretrain, digits, ArtifactCache(tmp_path), log=lambda m: None, progress=False)
    assert [k for k in pb.history[-1] if k.startswith("loss/")] == ["loss/ce"]


def test_distillation_generations_reuse_ier_and_train_students(digits, tmp_path):
    cache = ArtifactCache(tmp_path)
    pretrain_backbone(*pretrain_options(tiny_cfg("ier", "pretrain.ier.generations=2")), digits, cache, log=lambda m: None,
                      progress=False)
    logs: list[str] = []
    pb = pretrain_backbone(*pretrain_options(tiny_cfg("ier-distill", "pretrain.ier.generations=2")), digits, cache, log=logs.append,
                           progress=False)
    assert any("generation 0 from the finished ier run" in m for m in logs)  # loaded, not retrained
    assert [r["stage"] for r in pb.history] == ["ier", "gen1", "gen2"]
    entry = next(p for p in tmp_path.glob("backbones/*") if (p / "gen2-model.safetensors").exists())
    assert (entry / "gen1-model.safetensors").exists() and not (entry / "ier-model.safetensors").exists()
    kd = pb.history[1]
    assert {"loss/kd_class", "loss/kd_transform", "loss/kd_invariant"} <= set(kd)
    assert all(math.isfinite(kd[k]) for k in kd if k.startswith("loss/"))
    # each student starts from its own initialisation and ends different from its teacher
    teacher, _ = load_tensors(entry / "gen1-model.safetensors")
    student, _ = load_tensors(entry / "gen2-model.safetensors")
    assert set(teacher) == set(student)
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher if k.endswith("weight"))
    # the returned backbone is the last generation's val-selected one
    best, _ = load_tensors(entry / "gen2-best.safetensors")
    assert all(torch.equal(v, pb.backbone.state_dict()[k]) for k, v in best.items())


def test_generation_loads_frozen_teacher_and_trains_student(digits, tmp_path):
    from fewgen.pretrain.ier import _prepare, _train_generation, load_generation
    from fewgen.pretrain.registry import PretrainContext

    cfg = tiny_cfg("ier-distill")
    images, labels = add_rotation_classes(digits.base.images, digits.base.labels, digits.base.num_classes)
    ctx = PretrainContext(cfg.backbone, cfg.pretrain, digits, images, labels, 4 * digits.base.num_classes, tmp_path, torch.device("cpu"),
                          lambda m: None, progress=False)
    ctx, plan = _prepare(ctx)
    # relabel (default): the unrotated images, labelled with the rotation classes
    assert ctx.num_classes == 4 * digits.base.num_classes and len(ctx.train_images) == len(digits.base)
    _train_generation(ctx, plan, "ier")
    teacher = load_generation(tmp_path / "ier-model.safetensors", ctx, plan)
    saved, _ = load_tensors(tmp_path / "ier-model.safetensors")
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in saved.items())
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    result, student = _train_generation(ctx, plan, "gen1", teacher=teacher)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())  # frozen, BN stats too
    assert not any(p.requires_grad for p in teacher.parameters())
    assert {"loss/kd_class", "loss/kd_transform", "loss/kd_invariant"} <= set(result.history[-1])
    assert any(not torch.equal(before[k], v) for k, v in student.state_dict().items() if k.endswith("weight"))


def test_ier_through_the_pipeline(tmp_path):
    from fewgen.app.runner import run

    cfg = load_config(DIGITS, ["pretrain.recipe=ier", *TINY, "eval.episodes=10", "seeds=[0]", "eval.n_shots=[1]",
                               f"cache_dir={tmp_path / 'cache'}", "eval.all_way=false"])
    r = run(cfg, out_dir=tmp_path / "run", progress=False, quiet=True)
    assert (tmp_path / "run" / "metrics.json").exists()
    assert {row["method"] for row in r.rows} == {"ier"}
    assert all(20.0 <= row["accuracy"] <= 100.0 for row in r.rows)
