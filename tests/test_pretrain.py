"""Pretraining: val-class model selection, cached checkpoints, exact resume after interruption."""

from __future__ import annotations

import pytest
import torch

import fewgen.pretrain.loop as loop
from fewgen.app.config import load_config, pretrain_options
from fewgen.cache import ArtifactCache
from fewgen.checkpoint import load_tensors
from fewgen.data import load_dataset
from fewgen.pretrain import pretrain_backbone
from tests.conftest import DIGITS

QUIET = {"log": lambda m: None, "progress": False}


def _cfg():
    return load_config(DIGITS, ["pretrain.epochs=3", "pretrain.val_episodes=10", "pretrain.max_steps_per_epoch=6"])


@pytest.mark.slow
def test_interrupted_pretraining_resumes_to_identical_weights(tmp_path, monkeypatch):
    data = load_dataset("digits")
    full = pretrain_backbone(*pretrain_options(_cfg()), data, ArtifactCache(tmp_path / "a"), **QUIET)

    calls = {"n": 0}
    real_val = loop.validation_accuracy

    def crash_on_second_epoch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_val(*a, **k)

    monkeypatch.setattr(loop, "validation_accuracy", crash_on_second_epoch)
    cache_b = ArtifactCache(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        pretrain_backbone(*pretrain_options(_cfg()), data, cache_b, **QUIET)
    monkeypatch.setattr(loop, "validation_accuracy", real_val)
    logs = []
    resumed = pretrain_backbone(*pretrain_options(_cfg()), data, cache_b, log=logs.append, progress=False)
    assert any("resuming after epoch 1/3" in m for m in logs)
    a, b = full.backbone.state_dict(), resumed.backbone.state_dict()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert [h["val_acc"] for h in full.history] == [h["val_acc"] for h in resumed.history]


def test_selection_uses_val_and_cache_is_reused(tmp_path, monkeypatch):
    data = load_dataset("digits")
    cache = ArtifactCache(tmp_path)
    pb = pretrain_backbone(*pretrain_options(_cfg()), data, cache, **QUIET)
    vals = [h["val_acc"] for h in pb.history]
    assert pb.best_val == max(vals) and pb.history[pb.best_epoch - 1]["val_acc"] == pb.best_val
    tensors, meta = load_tensors(pb.path)
    assert meta["best_epoch"] == pb.best_epoch
    # a second call loads from the cache without training
    monkeypatch.setattr(loop, "train_backbone", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    again = pretrain_backbone(*pretrain_options(_cfg()), data, cache, **QUIET)
    assert again.key == pb.key
    # another config gets another key
    other = load_config(DIGITS, ["pretrain.epochs=2", "pretrain.val_episodes=10", "pretrain.max_steps_per_epoch=6"])
    monkeypatch.undo()
    assert pretrain_backbone(other.backbone, other.pretrain, data, cache, **QUIET).key != pb.key


def test_backbones_have_the_uniform_contract():
    from fewgen.backbones import BACKBONES, create_backbone

    for name in BACKBONES:
        if BACKBONES.meta(name).get("pretrained"):  # built from a model folder: tests/test_pretrained_backbones.py
            continue
        m = create_backbone(name, in_chans=1).eval()
        f = m.forward_features(torch.zeros(2, 1, 28, 28))
        assert f.shape == (2, m.num_features)
