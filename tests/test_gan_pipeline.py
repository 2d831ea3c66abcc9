"""``fewgen run`` with the GAN steps end to end on the embedded digits (tiny settings)."""

from __future__ import annotations

import json

import pytest

from fewgen.app.cli import main
from fewgen.app.config import load_config
from tests.conftest import DIGITS

TINY = [
    "pipeline=[pretrain,gan-source,gan-adapt,report]", "data.dataset=digits", "pretrain.epochs=1",
    "pretrain.max_steps_per_epoch=2", "pretrain.val_episodes=5", "pretrain.rotation_classes=false",
    "eval.n_ways=[2]", "eval.n_shots=[1]", "gan.setup=class-range", "gan.target_range=[8,10]", "gan.arch.image_size=16",
    "gan.arch.width=4", "gan.arch.z_dim=8", "gan.source.iters=3", "gan.adapt.iters=2", "gan.adapt.track_every=1", "gan.adapt.checkpoint_every=1",
    "gan.track_samples=30", "gan.eval_samples=40", "gan.kid_subset_size=10", "gan.methods=[tgan,dcl]", "seeds=[0,1]",
    "num_threads=1",
]


@pytest.mark.slow
def test_gan_pipeline_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWGEN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["run", DIGITS, *TINY, "--out", str(out), "--no-progress", "--quiet"]) == 0
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert [r["method"] for r in rows] == ["source", "tgan", "dcl"]
    for r in rows:
        assert "accuracy" not in r
        for k in ("fid", "kid", "intra_diversity", "realism", "precision", "recall", "nearest_shot_distance"):
            assert r[k] == r[k], (r["method"], k)  # not NaN
    for r in rows:
        assert r["seeds"] == [0, 1] and len(r["per_seed"]["fid"]) == 2
        assert r["fid"] == pytest.approx(sum(r["per_seed"]["fid"]) / 2)
    for f in ("shots_seed0.png", "shots_seed1.png", "source_samples.png", "tgan_samples_seed1.png",
              "dcl_samples_seed0.png", "curves.png", "tracking.json"):
        assert (out / "gan" / f).exists(), f
    tracking = json.loads((out / "gan" / "tracking.json").read_text())["tracking"]
    assert [p["iter"] for p in tracking["dcl"]["1"]] == [0, 1, 2]
    # the report shows the GAN table, the tracked curves and each method's samples
    page = (out / "report" / "index.html").read_text()
    assert "Few-shot image generation" in page and "intra-diversity" in page
    assert page.count("<tr>") >= 3  # source, tgan, dcl
    for f in ("gan_curves.png", "gan_tgan_samples_seed0.png", "gan_dcl_samples_seed0.png"):
        assert (out / "report" / f).exists() and f in page, f
    # a second run reuses the cached source and adapted GANs and gives the same numbers
    out2 = tmp_path / "run2"
    assert main(["run", DIGITS, *TINY, "--out", str(out2), "--no-progress", "--quiet"]) == 0
    assert "from cache" in (out2 / "log.txt").read_text()
    assert json.loads((out2 / "metrics.json").read_text())["rows"] == rows


@pytest.mark.parametrize("preset", ["dcl-omniglot", "dcl-pacs"])
def test_presets_load(preset):
    cfg = load_config(preset)
    assert cfg.pipeline == ["pretrain", "gan-source", "gan-adapt", "report"]
    assert cfg.gan.methods == ["tgan", "freezed", "cdc", "dcl"]


def test_bad_setup_is_one_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("FEWGEN_CACHE", str(tmp_path / "cache"))
    code = main(["run", DIGITS, *TINY, "gan.target_range=[8,12]", "pipeline=[gan-source]", "--out", str(tmp_path / "r"), "--no-progress",
                 "--quiet"])
    assert code == 2 and "gan.target_range" in capsys.readouterr().err
