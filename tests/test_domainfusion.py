"""DomainFusion and the leave-one-domain-out protocol: loss gradients, candidate selection,
splits, rows, and the ``domainfusion`` preset end to end on tiny domain data."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from fewgen.backbones import create_backbone
from fewgen.data.base import ArrayDataset
from fewgen.dg.domainfusion import (
    OnlineAugmenter,
    latent_distillation_loss,
    select_candidates,
    style_content,
)
from fewgen.dg.protocol import DGClassifier, dg_rows, leave_one_domain_out
from fewgen.generators.denoisers import DenoisingModel, PixelDiffusionAdapter, freeze
from tests.conftest import DATA_ROOT, requires_data


def tiny_generator(image_size: int = 8, n_classes: int = 3):
    from fewgen.generators.diffusion import DiffusionConfig, DiffusionGenerator

    cfg = DiffusionConfig(image_size=image_size, channels=3, block_out_channels=[8, 16],
                          attention_levels=[False, False], cond_mode="class")
    torch.manual_seed(0)
    return DiffusionGenerator(cfg, [f"c{i}" for i in range(n_classes)])


def test_latent_distillation_grad_reaches_classifier_not_generator():
    gen = tiny_generator()
    model = PixelDiffusionAdapter(gen, image_size=16)
    assert isinstance(model, DenoisingModel)
    freeze(model)
    before = {k: v.clone() for k, v in gen.unet.state_dict().items()}
    torch.manual_seed(1)
    clf = DGClassifier(create_backbone("conv4", in_chans=3, hidden=8, out_channels=8), num_classes=3)
    opt = torch.optim.SGD(list(clf.parameters()) + list(model.parameters()), lr=0.1)
    x = torch.rand(4, 3, 16, 16)
    y = torch.tensor([0, 1, 2, 0])
    loss = latent_distillation_loss(model, x, y, clf(x), (10, 500), torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in clf.parameters()]
    assert all(g is not None for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())
    opt.step()
    after = gen.unet.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # the same draw gives the same loss; the loss depends on the classifier's confidence
    l1 = latent_distillation_loss(model, x, y, clf(x), (10, 500), torch.Generator().manual_seed(0))
    l2 = latent_distillation_loss(model, x, y, clf(x), (10, 500), torch.Generator().manual_seed(0))
    assert torch.equal(l1, l2)
    with pytest.raises(Exception, match="timesteps"):
        latent_distillation_loss(model, x, y, clf(x), (10, 5000))


def test_style_content_and_candidate_selection():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(2, 6, 5, 5, generator=g)
    other = torch.randn(2, 6, 5, 5, generator=g)
    restyled = source * 3.0 + 2.0        # same content (instance-normalised), new channel statistics
    slightly = source * 1.2 + 0.3        # same content, a smaller style change
    new_content = other * 3.0 + 2.0      # the large style change, but different content
    s_src, c_src = style_content(source)
    s_re, c_re = style_content(restyled)
    assert torch.allclose(c_src, c_re, atol=1e-3) and not torch.allclose(s_src, s_re)
    cands = torch.stack([source, slightly, new_content, restyled], 1)  # (M=2, N=4, C, H, W)
    cs, cc = style_content(cands.flatten(0, 1))
    pick = select_candidates(s_src, c_src, cs.view(2, 4, -1), cc.view(2, 4, -1), content_weight=1.0)
    assert pick.tolist() == [3, 3]
    # with no weight on content, the largest style change wins even with other content
    far = torch.stack([source, new_content * 2, restyled], 1)
    fs, fc = style_content(far.flatten(0, 1))
    assert select_candidates(s_src, c_src, fs.view(2, 3, -1), fc.view(2, 3, -1), content_weight=0.0).tolist() == [1, 1]


class ShiftModel:
    """A stand-in generator: candidate k of a call brightens or darkens by the seed's parity."""

    num_train_timesteps = 1000

    def __init__(self):
        self.calls = 0

    def img2img(self, images, labels, strength, steps, seed):
        self.calls += 1
        delta = 60 if seed % 2 else -60
        return (images.int() + delta).clamp(0, 255).to(torch.uint8)


def test_online_augmenter_counts_every_candidate():
    imgs = torch.randint(60, 190, (5, 3, 16, 16), dtype=torch.uint8)
    aug = OnlineAugmenter(ShiftModel(), imgs, torch.arange(5) % 3, every=2, candidates=3, strength=0.5,
                          steps=4, feature_level=0, seed=0)
    backbone = create_backbone("conv4", in_chans=3, hidden=8, out_channels=8)
    refreshed = [aug.maybe_refresh(e, backbone) for e in range(5)]
    assert refreshed == [True, False, True, False, True]
    assert aug.images_generated == 3 * 5 * 3 == OnlineAugmenter.planned_images(5, 2, 5, 3)
    assert aug.images.shape == imgs.shape and aug.images.dtype == torch.uint8
    assert not torch.equal(aug.images, imgs)


def domain_dataset(n_per: int = 10, size: int = 8) -> ArrayDataset:
    g = torch.Generator().manual_seed(0)
    n = 3 * 3 * n_per
    return ArrayDataset(torch.randint(0, 255, (n, 3, size, size), generator=g, dtype=torch.uint8),
                        torch.arange(n) % 3, ["a", "b", "c"], torch.arange(n) // (3 * n_per), ["d0", "d1", "d2"], "toy")


def test_leave_one_domain_out_never_trains_or_selects_on_target():
    full = domain_dataset()
    s = leave_one_domain_out(full, "d1", val_fraction=0.2, seed=3)
    assert s.sources == ["d0", "d2"]
    assert (s.test.domains == 1).all() and len(s.test) == 30
    assert not (s.train.domains == 1).any() and not (s.val.domains == 1).any()
    assert torch.bincount(s.val.domains, minlength=3).tolist() == [6, 0, 6]  # 20% of each source domain
    assert len(s.train) + len(s.val) == 60
    again = leave_one_domain_out(full, "d1", val_fraction=0.2, seed=3)
    assert torch.equal(s.val.images, again.val.images)
    with pytest.raises(Exception, match="unknown target domain"):
        leave_one_domain_out(full, "photo")
    with pytest.raises(Exception, match="no domains"):
        leave_one_domain_out(ArrayDataset(full.images, full.labels, full.class_names), "d0")


def test_dg_rows_average_and_intervals():
    correct = {"d0": [torch.tensor([1, 1, 0, 0]), torch.tensor([1, 1, 1, 0])],
               "d1": [torch.tensor([1, 0, 0, 0]), torch.tensor([1, 1, 0, 0])]}
    rows = dg_rows("erm", correct, [0, 1], {t: {"images_generated": 10, "wall_s": 2.0} for t in correct})
    assert [r["domain"] for r in rows] == ["d0", "d1", "average"]
    assert rows[0]["accuracy"] == 62.5 and rows[0]["seed_accuracies"] == [50.0, 75.0]
    assert rows[2]["accuracy"] == pytest.approx((62.5 + 37.5) / 2)
    assert rows[2]["seed_accuracies"] == [37.5, 62.5]
    assert rows[2]["ci95"] == pytest.approx(np.sqrt(rows[0]["ci95"] ** 2 + rows[1]["ci95"] ** 2) / 2, abs=1e-3)
    assert rows[2]["images_generated"] == 10


TINY = [
    "seeds=[0]", "data.image_size=16", "num_threads=1", "domainfusion.epochs=2", "domainfusion.batch_size=8",
    "domainfusion.diffusion.image_size=8", "domainfusion.diffusion.block_out_channels=[8,16]",
    "domainfusion.diffusion.steps=2", "domainfusion.diffusion.batch_size=8", "domainfusion.sample_steps=2", "domainfusion.ld_batch=4",
    "domainfusion.aug_synthetic=4", "domainfusion.aug_every=1", "domainfusion.aug_candidates=2",
    "backbone.kwargs={hidden: 8, out_channels: 8}",
]


def check_metrics(run_dir, targets, planned):
    rows = json.loads((run_dir / "metrics.json").read_text())["rows"]
    from fewgen.dg.algorithms import DG_ALGORITHMS

    methods = DG_ALGORITHMS.names()  # the preset runs every registered algorithm
    assert sorted({r["method"] for r in rows}) == sorted(methods)
    expected_domains = targets + (["average"] if len(targets) > 1 else [])
    for m in methods:
        assert [r["domain"] for r in rows if r["method"] == m] == expected_domains
    by = {(r["method"], r["domain"]): r for r in rows}
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 100.0 and r["seeds"] == [0] and r["wall_s"] >= 0
    t = targets[0]
    assert by[("erm", t)]["images_generated"] == 0 and by[("df-ld", t)]["images_generated"] == 0
    assert by[("df-aug", t)]["images_generated"] == planned == by[("df", t)]["images_generated"]
    assert by[("erm+offline", t)]["images_generated"] == 2 * planned
    return rows


def write_tiny_domains(root, per_class: int = 3):
    """<root>/<domain>/<class>/*.png: 3 domains x 4 classes, colour by class, texture by domain."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for d, domain in enumerate(["art", "photo", "sketch"]):
        for c, cls in enumerate(["cat", "dog", "fox", "owl"]):
            folder = root / domain / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                img = np.zeros((16, 16, 3), np.uint8)
                img[..., c % 3] = 200 if c < 3 else 90
                img = np.clip(img + rng.integers(0, 40 * (d + 1), img.shape), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")


def test_preset_runs_on_tiny_imagefolder_domains(tmp_path):
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    root = tmp_path / "domains"
    write_tiny_domains(root)
    overrides = [*TINY, "data.dataset=imagefolder", f"data.root={root}", "data.base_classes=[cat]",
                 "data.val_classes=[dog]", "data.novel_classes=[fox, owl]", "eval.n_ways=[2]", "eval.n_query=1",
                 "domainfusion.targets=[photo, sketch]", f"cache_dir={tmp_path / 'cache'}"]
    cfg = load_config("domainfusion", overrides)
    run(cfg, tmp_path / "run", progress=False, quiet=True)
    rows = check_metrics(tmp_path / "run", ["photo", "sketch"], OnlineAugmenter.planned_images(2, 1, 4, 2))
    # a rerun reads every result from the cache and reproduces the table exactly
    run(cfg, tmp_path / "run2", progress=False, quiet=True)
    rows2 = json.loads((tmp_path / "run2" / "metrics.json").read_text())["rows"]
    assert [(r["method"], r["domain"], r["accuracy"]) for r in rows] == \
        [(r["method"], r["domain"], r["accuracy"]) for r in rows2]


@requires_data("pacs64", "PACS")
def test_preset_runs_on_tiny_real_pacs_subset(tmp_path):
    from fewgen.app.config import load_config
    from fewgen.app.runner import run

    src = DATA_ROOT / "pacs64" / "PACS"
    dst = tmp_path / "data" / "pacs64" / "PACS"
    for domain in ("art_painting", "cartoon", "photo", "sketch"):
        for cls_dir in sorted((src / domain).iterdir()):
            (dst / domain / cls_dir.name).mkdir(parents=True)
            for f in sorted(cls_dir.iterdir())[:3]:
                shutil.copy(f, dst / domain / cls_dir.name / f.name)
    cfg = load_config("domainfusion", [*TINY, f"data.root={tmp_path / 'data'}", "eval.n_query=1",
                                       "domainfusion.targets=[sketch]", f"cache_dir={tmp_path / 'cache'}"])
    run(cfg, tmp_path / "run", progress=False, quiet=True)
    check_metrics(tmp_path / "run", ["sketch"], OnlineAugmenter.planned_images(2, 1, 4, 2))


def test_preset_runs_with_a_stable_diffusion_folder(tmp_path):
    """domainfusion.generator: the frozen latent model serves every target; nothing is trained for it."""
    from fewgen.app.config import load_config
    from fewgen.app.runner import run
    from fewgen.errors import FewgenError
    from tests.tiny_sd import build_tiny_pipeline

    root = tmp_path / "domains"
    write_tiny_domains(root)
    pipe = build_tiny_pipeline(tmp_path / "sd")
    base = [*TINY, "data.dataset=imagefolder", f"data.root={root}", "data.base_classes=[cat]",
            "data.val_classes=[dog]", "data.novel_classes=[fox, owl]", "eval.n_ways=[2]", "eval.n_query=1",
            "domainfusion.targets=[photo, sketch]", f"cache_dir={tmp_path / 'cache'}", "domainfusion.guidance=2.0"]
    run(load_config("domainfusion", [*base, f"domainfusion.generator={pipe}"]), tmp_path / "run", progress=False,
        quiet=True)
    check_metrics(tmp_path / "run", ["photo", "sketch"], OnlineAugmenter.planned_images(2, 1, 4, 2))
    assert not (tmp_path / "cache" / "dg-diffusion").exists()  # no pixel model was trained
    with pytest.raises(FewgenError, match="cannot load Stable Diffusion"):
        run(load_config("domainfusion", [*base, f"domainfusion.generator={tmp_path / 'missing'}"]), tmp_path / "r2",
            quiet=True)
    with pytest.raises(FewgenError, match="no {} for the class name"):
        run(load_config("domainfusion", [*base, f"domainfusion.generator={pipe}", "domainfusion.prompt=a photo"]),
            tmp_path / "r3", quiet=True)


def test_bad_config_is_one_clear_error(tmp_path):
    from fewgen.app.config import load_config
    from fewgen.app.runner import run
    from fewgen.errors import FewgenError

    root = tmp_path / "domains"
    write_tiny_domains(root, per_class=2)
    base = [*TINY, "data.dataset=imagefolder", f"data.root={root}", "data.base_classes=[cat]",
            "data.val_classes=[dog]", "data.novel_classes=[fox, owl]", "eval.n_ways=[2]", "eval.n_query=1",
            f"cache_dir={tmp_path / 'cache'}"]
    with pytest.raises(FewgenError, match="unknown domainfusion method"):
        run(load_config("domainfusion", [*base, "domainfusion.methods=[erm, dfx]"]), tmp_path / "r1", quiet=True)
    with pytest.raises(FewgenError, match="unknown target domain"):
        run(load_config("domainfusion", [*base, "domainfusion.targets=[clipart]"]), tmp_path / "r2", quiet=True)


def test_latent_adapter_with_tiny_stable_diffusion_components():
    """The Stable Diffusion path: tiny random UNet + VAE (diffusers' dummy-component sizes)."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    from fewgen.generators.denoisers import LatentDiffusionAdapter

    torch.manual_seed(0)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=12,
                                norm_num_groups=4, attention_head_dim=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    model = LatentDiffusionAdapter(unet, vae, DDPMScheduler(num_train_timesteps=1000), torch.randn(3, 5, 12),
                                   guidance=2.0)
    assert isinstance(model, DenoisingModel)
    freeze(model)
    clf = DGClassifier(create_backbone("conv4", in_chans=3, hidden=8, out_channels=8), num_classes=3)
    x, y = torch.rand(2, 3, 16, 16), torch.tensor([0, 2])
    loss = latent_distillation_loss(model, x, y, clf(x), (10, 900), torch.Generator().manual_seed(0))
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in clf.parameters()) > 0
    assert all(p.grad is None for p in model.parameters())
    out = model.img2img(torch.randint(0, 255, (2, 3, 16, 16), dtype=torch.uint8), y, 0.5, 4, seed=1)
    assert out.shape == (2, 3, 16, 16) and out.dtype == torch.uint8


def test_pretrained_backbone_checkpoint_is_loaded(tmp_path):
    from types import SimpleNamespace

    from fewgen.app.config import load_config
    from fewgen.app.steps.domainfusion import new_classifier
    from fewgen.checkpoint import save_model
    from fewgen.errors import FewgenError

    ckpt = tmp_path / "backbone.safetensors"
    ref = create_backbone("conv4", in_chans=3, hidden=8, out_channels=8)
    save_model(ckpt, ref)
    cfg = load_config("domainfusion", ["backbone.kwargs={hidden: 8, out_channels: 8}",
                                       f"domainfusion.pretrained={ckpt}"])
    run = SimpleNamespace(cfg=cfg, data=SimpleNamespace(full=domain_dataset()))
    clf = new_classifier(run, 3, seed=0, target="d0")
    assert all(torch.equal(a, b) for a, b in zip(clf.backbone.state_dict().values(), ref.state_dict().values()))
    cfg.backbone.kwargs = {"hidden": 16, "out_channels": 8}
    with pytest.raises(FewgenError, match="does not fit backbone"):
        new_classifier(run, 3, seed=0, target="d0")
