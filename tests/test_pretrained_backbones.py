"""Pretrained backbones (clip, dinov2): tiny random models saved with their image processors, one
row per backbone. Preprocessing equals the processor's ``pixel_values``; features equal the wrapped
model's; the pipeline pretrain -> evaluate -> export -> fewgen predict gives one set of probabilities."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
import torch

from fewgen.app.config import pretrain_options

pytest.importorskip("transformers")

from tests.test_clip import tiny_clip_folder  # noqa: E402

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def pil_processor(name: str, **kwargs):
    """The PIL implementation of a transformers image processor (``<Name>Pil`` from transformers 5 on,
    the plain class before)."""
    import transformers

    cls = getattr(transformers, f"{name}Pil", None) or getattr(transformers, name)
    return cls(**kwargs)


def save_clip(folder, shortest_edge: int = 40, crop: int = 32):
    tiny_clip_folder(folder)
    pil_processor("CLIPImageProcessor", size={"shortest_edge": shortest_edge},
                  crop_size={"height": crop, "width": crop}).save_pretrained(folder)
    return folder


def save_dinov2(folder, shortest_edge: int = 40, crop: int = 32):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                             intermediate_size=37)).save_pretrained(folder)
    pil_processor("BitImageProcessor", size={"shortest_edge": shortest_edge}, crop_size={"height": crop, "width": crop},
                  image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD).save_pretrained(folder)
    return folder


#: one row per pretrained backbone: (name, folder maker, processor class, feature size)
BACKBONES = [("clip", save_clip, "CLIPImageProcessor", 16), ("dinov2", save_dinov2, "BitImageProcessor", 32)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {name: make(tmp_path_factory.mktemp(f"tiny-{name}")) for name, make, _, _ in BACKBONES}


def random_images(n: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, channels, height, width), generator=g, dtype=torch.uint8)


def processor_pixels(processor, images: torch.Tensor) -> torch.Tensor:
    """The processor on the same images as users give them: PIL images (``L`` for gray)."""
    from PIL import Image

    arrays = images.permute(0, 2, 3, 1).numpy()
    pil = [Image.fromarray(a[..., 0], "L") if a.shape[-1] == 1 else Image.fromarray(a, "RGB") for a in arrays]
    return processor(images=pil, return_tensors="pt")["pixel_values"]


# (channels, height, width): square and not, gray and RGB, below, at and above the crop and the resize
SHAPES = [(3, 48, 48), (3, 50, 70), (3, 70, 50), (1, 33, 61), (1, 20, 20), (3, 31, 100), (3, 40, 40), (3, 32, 32),
          (1, 300, 17), (3, 17, 300), (3, 41, 40)]


@pytest.mark.parametrize("name,make,processor_name,dim", BACKBONES)
def test_preprocessing_equals_the_image_processor(name, make, processor_name, dim, models):
    from transformers import AutoImageProcessor

    from fewgen.backbones.pretrained import preprocess, read_preprocessing

    prep = read_preprocessing(models[name])
    processor = AutoImageProcessor.from_pretrained(models[name])
    assert processor.__class__.__name__.startswith(processor_name)
    for i, (c, h, w) in enumerate(SHAPES):
        images = random_images(2, c, h, w, seed=i)
        ours, ref = preprocess(images, prep), processor_pixels(processor, images)
        assert ours.shape == ref.shape == (2, 3, 32, 32), (c, h, w)
        assert (ours - ref).abs().max() <= 1e-6, (c, h, w)
        # floats in [0, 1] (what extract_features hands a backbone) are the same 8-bit images
        assert torch.equal(preprocess(images.float() / 255, prep), ours)


@pytest.mark.parametrize("config", [
    {"size": 40, "crop_size": 32},  # the legacy int sizes: shortest edge, square crop
    {"size": {"shortest_edge": 24}, "crop_size": {"height": 32, "width": 28}},  # a crop larger than the image: zero pad
    {"size": {"height": 36, "width": 30}, "do_center_crop": False, "resample": 2},
    {"do_resize": False, "crop_size": {"height": 20, "width": 20}, "do_normalize": False},
])
def test_preprocessing_reads_processor_configs_as_transformers_does(config, tmp_path):
    from transformers import AutoImageProcessor

    from fewgen.backbones.pretrained import preprocess, read_preprocessing

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "CLIPImageProcessor",
                                                                   **config}))
    prep = read_preprocessing(tmp_path)
    processor = AutoImageProcessor.from_pretrained(tmp_path)
    for i, (c, h, w) in enumerate([(3, 50, 70), (1, 23, 41), (3, 24, 24)]):
        images = random_images(2, c, h, w, seed=i)
        ours, ref = preprocess(images, prep), processor_pixels(processor, images)
        assert ours.shape == ref.shape and (ours - ref).abs().max() <= 1e-6, (config, c, h, w)


def test_unsupported_processor_is_one_clear_error(tmp_path):
    from fewgen.backbones.pretrained import read_preprocessing
    from fewgen.errors import FewgenError

    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"image_processor_type": "SiglipImageProcessor"}))
    with pytest.raises(FewgenError, match="SiglipImageProcessor.*not supported"):
        read_preprocessing(tmp_path)
    (tmp_path / "preprocessor_config.json").unlink()
    with pytest.raises(FewgenError, match="no preprocessor_config.json"):
        read_preprocessing(tmp_path)


@pytest.mark.parametrize("name,make,processor_name,dim", BACKBONES)
def test_registry_builds_a_frozen_backbone_with_the_models_features(name, make, processor_name, dim, models):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel

    from fewgen.backbones import BACKBONES as REGISTRY
    from fewgen.backbones import create_backbone

    assert REGISTRY.meta(name)["pretrained"]
    backbone = create_backbone(name, model=str(models[name]))
    assert backbone.num_features == dim and backbone.source == str(models[name].resolve())
    assert not any(p.requires_grad for p in backbone.parameters())
    images = random_images(4, 3, 48, 64)
    feats = backbone.forward_features(images)
    assert feats.shape == (4, dim) and feats.dtype == torch.float32 and torch.isfinite(feats).all()
    backbone.train()  # frozen: the model stays in eval mode
    assert torch.equal(backbone.forward_features(images.float() / 255), feats)
    assert torch.equal(create_backbone(name, model=str(models[name])).forward_features(images), feats)
    # the reference: the processor's pixel values through the transformers model it wraps
    pixels = processor_pixels(AutoImageProcessor.from_pretrained(models[name]), images)
    with torch.no_grad():
        if name == "clip":
            out = CLIPModel.from_pretrained(models[name]).eval().get_image_features(pixel_values=pixels)
            ref = out if isinstance(out, torch.Tensor) else out.pooler_output
        else:
            ref = AutoModel.from_pretrained(models[name]).eval()(pixel_values=pixels).last_hidden_state[:, 0]
    assert torch.allclose(feats, ref, atol=1e-5)


def test_clip_backbone_reads_a_vision_tower_folder_alike(models, tmp_path):
    from transformers import CLIPVisionModelWithProjection

    from fewgen.backbones import create_backbone

    tower = tmp_path / "tower"
    CLIPVisionModelWithProjection.from_pretrained(models["clip"]).save_pretrained(tower)
    shutil.copy(models["clip"] / "preprocessor_config.json", tower)
    images = random_images(3, 1, 36, 50)  # gray: repeated to RGB
    a = create_backbone("clip", model=str(models["clip"])).forward_features(images)
    b = create_backbone("clip", model=str(tower)).forward_features(images)
    assert torch.allclose(a, b, atol=1e-6)


def test_wrong_or_missing_model_is_one_clear_error(models, tmp_path):
    from fewgen.backbones import create_backbone
    from fewgen.errors import FewgenError

    with pytest.raises(FewgenError, match="needs backbone.model="):
        create_backbone("clip")
    with pytest.raises(FewgenError, match="'dinov2' model; backbone.name=clip needs a CLIP model"):
        create_backbone("clip", model=str(models["dinov2"]))
    with pytest.raises(FewgenError, match="is not a folder"):
        create_backbone("dinov2", model=str(tmp_path / "nowhere"))
    with pytest.raises(FewgenError, match="takes no backbone.kwargs"):
        create_backbone("dinov2", model=str(models["dinov2"]), hidden=8)


def _config(name: str, model, cache, **more):
    from fewgen.app.config import load_config

    return load_config(None, [f"backbone.name={name}", f"backbone.model={model}", f"cache_dir={cache}",
                              *[f"{k}={v}" for k, v in more.items()]])


def test_cache_key_follows_the_model_content_not_its_path(models, tmp_path):
    from fewgen.cache import ArtifactCache
    from fewgen.pretrain import pretrain_backbone

    cache = ArtifactCache(tmp_path / "cache")
    copy = tmp_path / "copy"
    shutil.copytree(models["dinov2"], copy)
    quiet = {"log": lambda m: None}
    pb = pretrain_backbone(*pretrain_options(_config("dinov2", models["dinov2"], cache.root)), None, cache, **quiet)
    assert pb.path == models["dinov2"].resolve() and pb.history == []
    assert pretrain_backbone(*pretrain_options(_config("dinov2", copy, cache.root)), None, cache, **quiet).key == pb.key
    # the pretrain options are not read; the dtype is
    assert pretrain_backbone(*pretrain_options(_config("dinov2", copy, cache.root, **{"pretrain.epochs": 3})), None, cache,
                             **quiet).key == pb.key
    assert pretrain_backbone(*pretrain_options(_config("dinov2", copy, cache.root, **{"backbone.dtype": "bfloat16"})), None, cache,
                             **quiet).key != pb.key
    config = json.loads((copy / "preprocessor_config.json").read_text())
    (copy / "preprocessor_config.json").write_text(json.dumps({**config, "crop_size": {"height": 24, "width": 24}}))
    assert pretrain_backbone(*pretrain_options(_config("dinov2", copy, cache.root)), None, cache, **quiet).key != pb.key


def test_images_are_read_at_the_processors_resize_size(models, tmp_path):
    from fewgen.data.loading import load_data

    root = photo_folder(tmp_path / "photos", ["a", "b", "c"], per_class=2)
    for name in ("clip", "dinov2"):
        cfg = _config(name, models[name], tmp_path / "cache", **{"data.dataset": "imagefolder", "data.root": root})
        assert load_data(cfg.data, cfg.backbone).base.image_shape == (3, 40, 40)  # size.shortest_edge of the tiny processors
        cfg.data.image_size = 56
        assert load_data(cfg.data, cfg.backbone).base.image_shape == (3, 56, 56)
    conv4 = _config("conv4", "null", tmp_path / "cache", **{"data.dataset": "imagefolder", "data.root": root})
    assert load_data(conv4.data, conv4.backbone).base.image_shape == (3, 64, 64)


def photo_folder(folder, classes: list[str], per_class: int, size: tuple[int, int] = (48, 48), seed: int = 0):
    """``<folder>/<class>/<i>.png``: RGB images of a colour per class with noise, ``size`` = (W, H)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for cls in classes:
        (folder / cls).mkdir(parents=True, exist_ok=True)
        colour = rng.integers(0, 256, 3)
        for i in range(per_class):
            noise = rng.integers(-60, 60, (size[1], size[0], 3))
            pixels = np.clip(colour[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(folder / cls / f"{i}.png")
    return folder


@pytest.mark.parametrize("name,make,processor_name,dim", BACKBONES)
def test_run_exports_a_classifier_that_predict_reads_alike(name, make, processor_name, dim, models, tmp_path):
    """fewgen run [pretrain, evaluate, export] -> classifier.json names the model, holds no backbone
    weights; fewgen predict == load_classifier().predict_proba == the run's own features + head."""
    import yaml

    from fewgen.app.cli import main
    from fewgen.app.config import load_config
    from fewgen.cache import ArtifactCache
    from fewgen.checkpoint import load_tensors
    from fewgen.classifier import load_classifier, read_image_file
    from fewgen.data.loading import load_data
    from fewgen.evaluation.features import cached_features
    from fewgen.keys import key_parts
    from fewgen.pretrain import pretrain_backbone

    base = photo_folder(tmp_path / "base", ["b1", "b2", "b3"], per_class=2, seed=1)
    novel = photo_folder(tmp_path / "mine", ["cat", "dog", "owl"], per_class=4, size=(64, 48), seed=2)
    config = {"name": f"tiny-{name}", "seeds": [0], "pipeline": ["pretrain", "evaluate", "export"],
              "cache_dir": str(tmp_path / "cache"), "device": "cpu",
              "data": {"dataset": "imagefolder", "root": str(base), "novel_dataset": "imagefolder",
                       "novel_root": str(novel)},
              "backbone": {"name": name, "model": str(models[name])},
              "eval": {"n_ways": [3], "n_shots": [1], "n_query": 2, "episodes": 4, "classifiers": ["logreg"]},
              "export": {"extra": "none"}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "runs" / name
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(out), "--no-progress", "--quiet"]) == 0
    assert not (out / "checkpoints" / "backbone.safetensors").exists()  # the model stays in its folder
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    frozen = [r for r in rows if r["method"] == name]  # rows name the frozen model, not a recipe
    zero_shot = [r for r in rows if r["method"] == "clip-zero-shot"]  # CLIP's text tower: one row per setting
    assert frozen and len(frozen) + len(zero_shot) == len(rows)
    assert len(zero_shot) == (2 if name == "clip" else 0)
    assert all(r["classifier"] == "prompts" and not r["uses_synthetic"] for r in zero_shot)
    info = json.loads((out / "classifier" / "classifier.json").read_text())
    arch = info["backbone"]
    assert arch["name"] == name and arch["model"] == str(models[name].resolve()) and arch["num_features"] == dim
    assert arch["preprocessing"]["shortest_edge"] == 40 and arch["preprocessing"]["crop"] == [32, 32]
    assert info["image_shape"] == [3, 40, 40]
    tensors, _ = load_tensors(out / "classifier" / "model.safetensors")
    assert sorted(tensors) == ["head.bias", "head.mean", "head.weight"]

    clf = load_classifier(out / "classifier")
    files = sorted((novel / "owl").glob("*.png")) + sorted((novel / "cat").glob("*.png"))
    assert clf.crops  # a pretrained backbone's classifier reads files as the run did: aspect kept, centre cut out
    images = torch.stack([read_image_file(f, clf.image_shape, clf.crops) for f in files])
    proba = clf.predict_proba(images)
    # the run's own: its cached features of the same images (the novel set, read alike) and its head
    cfg = load_config(str(tmp_path / "run.yaml"))
    data, cache = load_data(cfg.data, cfg.backbone), ArtifactCache(cfg.cache_dir)
    pb = pretrain_backbone(cfg.backbone, cfg.pretrain, data, cache, log=lambda m: None)
    assert cache.is_done(cache.path("features", key_parts("features", None, checkpoint=pb.key,
                                                           images=data.novel.digest())))  # made by the run
    feats = cached_features(cache, pb.key, pb.backbone, data.novel)
    order = [next(n for n in range(len(data.novel)) if torch.equal(data.novel.images[n], image)) for image in images]
    run_proba = clf._proba(clf._head(), feats[order][None])
    assert torch.allclose(proba, run_proba, atol=1e-6)

    csv_path = tmp_path / f"{name}.csv"
    assert main(["predict", str(out / "classifier"), *map(str, files), "--out", str(csv_path), "--no-progress",
                 "--top-k", "3"]) == 0
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["file"] for r in rows] == [str(f) for f in files]
    for r, p in zip(rows, proba):
        assert r["predicted"] == clf.class_names[int(p.argmax())]
        assert abs(float(r["probability"]) - float(p.max())) <= 1e-6


def test_a_changed_model_folder_is_refused_at_load(models, tmp_path, capsys):
    from fewgen.app.cli import main
    from fewgen.backbones import create_backbone
    from fewgen.classifier import fit_classifier, load_classifier
    from fewgen.errors import FewgenError

    model = tmp_path / "clip"
    shutil.copytree(models["clip"], model)
    backbone = create_backbone("clip", model=str(model))
    shots = random_images(4, 3, 40, 40)
    clf = fit_classifier(backbone, backbone.spec(), shots, torch.tensor([0, 0, 1, 1]), ["x", "y"])
    folder = clf.save(tmp_path / "classifier")
    again = load_classifier(folder)
    assert torch.allclose(again.predict_proba(shots), clf.predict_proba(shots), atol=1e-6)

    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")
    key = next(k for k in weights if k.endswith("visual_projection.weight"))
    weights[key] = weights[key] + 0.01
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(FewgenError, match="changed since this classifier was made") as e:
        load_classifier(folder)
    assert "\n" not in str(e.value)
    image = tmp_path / "one.png"
    from PIL import Image

    Image.fromarray(np.zeros((40, 40, 3), np.uint8)).save(image)
    assert main(["predict", str(folder), str(image), "--out", str(tmp_path / "p.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: the base model") and "\n" not in err


def test_fit_photos_preset_reads_colour_shots_and_predict_agrees(models, tmp_path):
    """`fewgen fit my_photos/ --preset photos backbone.model=...`: colour shots at the processor's size
    (the base digits are gray), a classifier without backbone weights, and predict on the shots."""
    from fewgen.app.cli import main
    from fewgen.classifier import load_classifier, read_image_file

    shots = photo_folder(tmp_path / "my_photos", ["apple", "pear"], per_class=3, size=(60, 45), seed=3)
    out = tmp_path / "fit"
    assert main(["fit", str(shots), "--preset", "photos", f"backbone.model={models['dinov2']}", "backbone.name=dinov2",
                 f"cache_dir={tmp_path / 'cache'}", "--out", str(out), "--no-progress", "--quiet"]) == 0
    clf = load_classifier(out / "classifier")
    assert clf.image_shape == (3, 40, 40) and clf.info["backbone"]["name"] == "dinov2"
    files = sorted(shots.rglob("*.png"))
    assert main(["predict", str(out / "classifier"), str(shots), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    proba = clf.predict_proba(torch.stack([read_image_file(f, clf.image_shape, clf.crops) for f in files]))
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert all(abs(float(r["probability"]) - float(p.max())) <= 1e-6 for r, p in zip(rows, proba))


def test_zero_shot_rows_classify_by_the_nearest_class_prompt():
    """Queries whose features lie near their class's prompt embedding are all right, in episodes and
    all-way; with the prompts of two classes swapped, those classes' queries are all wrong."""
    from fewgen.data.base import ArrayDataset
    from fewgen.data.fewshot import all_way_split, sample_episodes
    from fewgen.evaluation.protocol import zero_shot_accuracies, zero_shot_all_way

    g = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(10)
    data = ArrayDataset(torch.zeros(60, 1, 4, 4, dtype=torch.uint8), labels, [f"c{i}" for i in range(6)], name="t")
    w = torch.randn(6, 8, generator=g)
    feats = w[labels] + 0.2 * torch.randn(60, 8, generator=g)
    episodes = sample_episodes(data, 3, 1, 4, 50, 0)
    query = all_way_split(data, 1, 0)[1]
    assert zero_shot_accuracies(feats, w, episodes).min() == 1
    assert zero_shot_all_way(feats, labels, w, query).min() == 1
    swapped = w[[1, 0, 2, 3, 4, 5]]
    wrong = zero_shot_all_way(feats, labels, swapped, query)
    assert wrong[labels[query] < 2].max() == 0 and wrong[labels[query] >= 2].min() == 1


def test_fit_photos_with_stable_diffusion_and_clip_end_to_end(models, tmp_path):
    """The issue's command: `fewgen fit <photos> --preset photos generator.stable_diffusion.model=<tiny SD>
    backbone.model=<tiny CLIP>` runs DataDream's generation (LoRA on the shots, synthesis) and exports
    a CLIP-based classifier fitted on the shots and the generated images; `fewgen predict` on the
    shots gives the run's own probabilities (the run's cached features + the exported head)."""
    from fewgen.app.cli import main
    from fewgen.classifier import load_classifier, read_image_file
    from tests.tiny_sd import build_tiny_pipeline

    sd = build_tiny_pipeline(tmp_path / "sd")
    shots = photo_folder(tmp_path / "my_photos", ["apple", "pear", "plum"], per_class=2, size=(52, 44), seed=5)
    out = tmp_path / "fit"
    assert main(["fit", str(shots), "--preset", "photos", f"generator.stable_diffusion.model={sd}", f"backbone.model={models['clip']}",
                 "generator.datadream.steps_per_class=2", "synthesis.synthetic_per_class=2", "synthesis.steps=2",
                 f"cache_dir={tmp_path / 'cache'}", "--out", str(out), "--no-progress", "--quiet"]) == 0
    log = (out / "log.txt").read_text()
    assert "== step adapt" in log and "== step synthesize" in log and "== step learn" not in log
    info = json.loads((out / "classifier" / "classifier.json").read_text())
    assert info["backbone"]["name"] == "clip" and info["backbone"]["model"] == str(models["clip"].resolve())
    assert info["fit"]["synthetic"] == 6 and info["fit"]["uses_synthetic"] is True  # 2 per class, from SD
    assert info["leave_one_out"]["shots"] == 6  # the estimate a user gets without queries
    clf = load_classifier(out / "classifier")
    files = sorted(shots.rglob("*.png"))
    assert main(["predict", str(out / "classifier"), str(shots), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    images = torch.stack([read_image_file(f, clf.image_shape, clf.crops) for f in files])
    proba = clf.predict_proba(images)
    assert [r["file"] for r in rows] == [str(f) for f in files]
    assert all(abs(float(r["probability"]) - float(p.max())) <= 1e-6 for r, p in zip(rows, proba))
    # the run's own features of the same shots (its cache) through the exported head: the same scores
    from fewgen.app.cli import fit_config
    from fewgen.cache import ArtifactCache
    from fewgen.data.loading import load_data
    from fewgen.evaluation.features import cached_features
    from fewgen.pretrain import pretrain_backbone

    cfg = fit_config(shots, "photos", [f"generator.stable_diffusion.model={sd}", f"backbone.model={models['clip']}",
                                       f"cache_dir={tmp_path / 'cache'}"])
    data = load_data(cfg.data, cfg.backbone)
    pb = pretrain_backbone(cfg.backbone, cfg.pretrain, data, ArtifactCache(tmp_path / "cache"), "cpu", lambda *_: None, False)
    feats = cached_features(ArtifactCache(tmp_path / "cache"), pb.key, pb.backbone, data.novel, "cpu", lambda *_: None)
    own = clf._proba(clf._head(), feats[None])
    # the novel set is read class folder by class folder, files sorted: the order of `files`
    assert [data.novel.class_names[int(y)] for y in data.novel.labels] == [f.parent.name for f in files]
    assert torch.allclose(own, proba, atol=1e-5)


def test_run_photos_without_a_generator_gives_the_real_only_rows(models, tmp_path):
    """`fewgen run photos backbone.model=<CLIP>` on a CPU: the generative steps are left out (no
    generator.stable_diffusion.model) and so is fine-tuning (learner.cuda_only), each said in the log; the rows are
    CLIP zero-shot and the frozen logreg / proto, on the same episodes. With learner.cuda_only=false
    the CLIP + LoRA learner's real-only row joins them (its clip_path is the backbone's model)."""
    from fewgen.app.cli import main

    common = ["run", "photos", f"backbone.model={models['clip']}", "eval.episodes=6", "eval.n_shots=[1]",
              "learner.steps=2", "learner.batch_size=4", f"cache_dir={tmp_path / 'cache'}", "--no-progress", "--quiet"]
    assert main([*common, "--out", str(tmp_path / "a")]) == 0
    log = (tmp_path / "a" / "log.txt").read_text()
    assert "config: no generator.stable_diffusion.model: the generator, adapt and synthesize steps and the learner methods " \
           "datadream are left out" in log
    assert "config: learner.cuda_only and no CUDA device: the learn step (fine-tuning) is left out" in log
    rows = json.loads((tmp_path / "a" / "metrics.json").read_text())["rows"]
    assert {(r["method"], r["classifier"]) for r in rows} == {("clip", "logreg"), ("clip", "proto"),
                                                               ("clip-zero-shot", "prompts")}
    assert not any(r["uses_synthetic"] for r in rows)
    assert main([*common, "learner.cuda_only=false", "--out", str(tmp_path / "b")]) == 0
    rows = json.loads((tmp_path / "b" / "metrics.json").read_text())["rows"]
    assert ("real-only", "head") in {(r["method"], r["classifier"]) for r in rows}
    assert f"learner.clip_path: the backbone's CLIP, {models['clip']}" in (tmp_path / "b" / "log.txt").read_text()


@pytest.mark.slow
def test_two_processes_write_one_run_with_one_log(models, tmp_path):
    """`torchrun --nproc_per_node 2 -m fewgen.app.cli run photos ...` (gloo on CPU): the helper process
    computes its share and writes no run folder; the run's log has each line once."""
    import os
    import subprocess
    import sys

    from tests.tiny_sd import build_tiny_pipeline

    sd = build_tiny_pipeline(tmp_path / "sd")
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                           "fewgen.app.cli", "run", "photos", f"backbone.model={models['clip']}",
                           f"generator.stable_diffusion.model={sd}", "generator.datadream.steps_per_class=2", "synthesis.synthetic_per_class=2",
                           "synthesis.steps=2", "eval.episodes=5", "eval.n_shots=[1]", f"cache_dir={tmp_path / 'cache'}",
                           "--out", str(out), "--no-progress"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    log = (out / "log.txt").read_text()
    assert log.count("== step synthesize\n") == 1 and log.count("run finished") == 1
    assert proc.stdout.count("run finished") == 1  # printed by the main process alone
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no staging or lock left
    assert json.loads((out / "metrics.json").read_text())["rows"]


def test_exported_clip_lora_is_the_learner(models):
    """The classifier export.model=learner writes gives the CLIP + LoRA learner's own probabilities:
    its image tower's LoRA over a fresh copy of the base CLIP, its class-prompt head as cosine
    prototypes at CLIP's logit scale; saved and loaded, the same again."""
    import tempfile
    from pathlib import Path

    import torch.nn.functional as F

    from fewgen.backbones.pretrained import clip_lora_from_learner
    from fewgen.classifier import FewgenClassifier, load_classifier
    from fewgen.learners.clip import CLIPClassifier

    learner = CLIPClassifier.from_pretrained(models["clip"], ["apple", "pear", "plum"], rank=4)
    g = torch.Generator().manual_seed(0)
    for name, p in learner.clip.named_parameters():
        if "lora_B" in name:  # as if trained: LoRA's B starts at zero
            p.data = 0.2 * torch.randn(p.shape, generator=g)
    learner.head.residual.data = 0.1 * torch.randn(learner.head.residual.shape, generator=g)
    images = random_images(5, 3, 44, 52, seed=3)
    with torch.no_grad():
        want = learner(images.float() / 255).softmax(-1)
        w = F.normalize(learner.head.class_weights().float(), dim=-1)
    backbone = clip_lora_from_learner(learner, str(models["clip"]))
    clf = FewgenClassifier(backbone.eval(), "proto", {"prototypes": w}, ["apple", "pear", "plum"], (3, 44, 52),
                           {"backbone": backbone.spec()}, temperature=float(learner.head.scale))
    assert torch.allclose(clf.predict_proba(images), want, atol=1e-5)
    with tempfile.TemporaryDirectory() as tmp:
        loaded = load_classifier(clf.save(Path(tmp) / "classifier"))
        assert loaded.info["backbone"]["name"] == "clip-lora" and loaded.info["backbone"]["rank"] == 4
        assert torch.allclose(loaded.predict_proba(images), want, atol=1e-5)


def test_fit_exports_the_fine_tuned_clip_when_asked(models, tmp_path, capsys):
    """`fewgen fit --preset photos export.model=learner`: the CLIP + LoRA learner trained on the shots
    is the exported classifier (LoRA matrices in model.safetensors, the base CLIP by folder), and
    fewgen predict reads it as any other; a LoRA matrix of another shape is refused in one line."""
    from fewgen.app.cli import main
    from fewgen.checkpoint import load_tensors, save_tensors
    from fewgen.classifier import load_classifier, read_image_file

    shots = photo_folder(tmp_path / "my_photos", ["apple", "pear"], per_class=3, size=(52, 44), seed=4)
    out = tmp_path / "fit"
    assert main(["fit", str(shots), "--preset", "photos", f"backbone.model={models['clip']}", "export.model=learner",
                 "learner.steps=3", "learner.batch_size=4", f"cache_dir={tmp_path / 'cache'}", "--out", str(out),
                 "--no-progress", "--quiet"]) == 0
    info = json.loads((out / "classifier" / "classifier.json").read_text())
    assert info["backbone"]["name"] == "clip-lora" and info["fit"]["method"] == "real-only"
    tensors, _ = load_tensors(out / "classifier" / "model.safetensors")
    lora = {k: v for k, v in tensors.items() if k.startswith("backbone.")}
    assert lora and all("lora_" in k for k in lora) and any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)
    clf = load_classifier(out / "classifier")
    files = sorted(shots.rglob("*.png"))
    assert main(["predict", str(out / "classifier"), str(shots), "--out", str(tmp_path / "p.csv"),
                 "--no-progress"]) == 0
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    proba = clf.predict_proba(torch.stack([read_image_file(f, clf.image_shape, clf.crops) for f in files]))
    assert all(abs(float(r["probability"]) - float(p.max())) <= 1e-6 for r, p in zip(rows, proba))
    # a LoRA matrix of another rank, recorded consistently (as if re-exported by hand): refused at load
    bad = tmp_path / "bad"
    shutil.copytree(out / "classifier", bad)
    key = next(k for k in lora if "lora_A" in k)
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    from fewgen.checkpoint import load_tensors as lt
    _, meta = lt(bad / "model.safetensors")
    save_tensors(bad / "model.safetensors", tensors, meta)
    from fewgen.utils import sha256_file
    record = json.loads((bad / "classifier.json").read_text())
    record["files"]["model.safetensors"] = sha256_file(bad / "model.safetensors")
    (bad / "classifier.json").write_text(json.dumps(record))
    capsys.readouterr()
    assert main(["predict", str(bad), str(shots), "--out", str(tmp_path / "q.csv"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "does not hold the LoRA matrices of this CLIP at rank" in err and "\n" not in err


@pytest.mark.parametrize("name,make,processor_name,dim", BACKBONES)
def test_a_photo_is_read_as_its_processor_reads_it(name, make, processor_name, dim, models, tmp_path):
    """A non-square photo file read for a pretrained backbone (aspect kept, centre cut out) gives the
    model exactly the pixel values its image processor makes from the same file: never stretched."""
    from PIL import Image

    from fewgen.backbones.pretrained import load_pretrained
    from fewgen.classifier import read_image_file

    backbone = load_pretrained(name, str(models[name]))
    processor = pil_processor(processor_name, **json.loads((models[name] / "preprocessor_config.json").read_text()))
    size = backbone.preprocessing.read_size
    for w, h in [(97, 61), (50, 120), (40, 40), (33, 71)]:
        path = tmp_path / f"{w}x{h}.png"
        Image.fromarray(random_images(1, 3, h, w, seed=w).permute(0, 2, 3, 1).numpy()[0], "RGB").save(path)
        image = read_image_file(path, (3, size, size), crop=True)
        want = processor(images=[Image.open(path).convert("RGB")], return_tensors="pt")["pixel_values"]
        assert torch.allclose(backbone.preprocess(image[None]), want, atol=1e-6), (w, h)
