"""Feedback on long work and the GPU settings: TensorBoard events and time estimates from the
training loops (the same weights with and without them), device resolution under a launcher,
the fine-tuning precision, Stable Diffusion's memory switches and its batches across classes."""

from __future__ import annotations

import pytest
import torch

from fewgen.app.config import load_config, pretrain_options
from fewgen.cache import ArtifactCache
from fewgen.data import load_dataset
from fewgen.errors import FewgenError
from fewgen.training import TrainingMonitor, format_duration, format_rate
from tests.conftest import DIGITS

QUIET = {"log": lambda m: None, "progress": False}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def scalar_tags(folder) -> dict[str, list[float]]:
    """Every scalar tag in the TensorBoard events under ``folder`` (one run) and its values."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(folder))
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def event_files(folder) -> list:
    return sorted(p for p in folder.rglob("events.out.tfevents.*") if p.stat().st_size > 0)


# ----------------------------------------------------------------------------- the monitor


def test_monitor_logs_one_estimate_after_the_warmup_and_writes_scalars(tmp_path):
    lines = []
    with TrainingMonitor("generator", 20, log=lines.append, log_dir=tmp_path / "tb", estimate_min_s=0) as monitor:
        for step in range(20):
            monitor.step({"loss": 1.0 / (step + 1), "lr": 0.1})
    assert len(lines) == 1 and lines[0].startswith("generator: 20 steps, ~") and "at the measured" in lines[0]
    tags = scalar_tags(tmp_path / "tb")
    assert set(tags) == {"loss", "lr"} and len(tags["loss"]) == 20 and tags["loss"][0] == 1.0


def test_monitor_is_silent_for_short_loops_and_resumes_count_what_is_left(tmp_path):
    lines = []
    with TrainingMonitor("short", 10, log=lines.append) as monitor:  # far below estimate_min_s
        for _ in range(10):
            monitor.step({"loss": 0.5})
    assert lines == [] and monitor.writer is None
    with TrainingMonitor("resumed", 100, start=40, log=lines.append, estimate_min_s=0) as monitor:
        for _ in range(10):
            monitor.step()
    assert lines and lines[0].startswith("resumed: 60 of 100 steps to go, ~")
    assert not list(tmp_path.iterdir())  # no log dir: no files


def test_durations_and_rates_read_as_a_person_says_them():
    assert format_duration(45) == "45 s" and format_duration(720) == "12 min" and format_duration(3 * 3600) == "3.0 h"
    assert format_rate(4.12) == "4.1 steps/s" and format_rate(0.4, "batch") == "2.5 s/batch"


# ----------------------------------------------------------------------------- the loops


def _pretrain_cfg():
    return load_config(DIGITS, ["pretrain.epochs=2", "pretrain.val_episodes=10", "pretrain.max_steps_per_epoch=4"])


def test_pretraining_writes_loss_events_and_the_same_weights(tmp_path):
    from fewgen.pretrain import pretrain_backbone

    data = load_dataset("digits")
    plain = pretrain_backbone(*pretrain_options(_pretrain_cfg()), data, ArtifactCache(tmp_path / "a"), **QUIET)
    tb = tmp_path / "run" / "tensorboard" / "pretrain"
    watched = pretrain_backbone(*pretrain_options(_pretrain_cfg()), data, ArtifactCache(tmp_path / "b"), log=lambda m: None,
                                progress=True, log_dir=tb)
    a, b = plain.backbone.state_dict(), watched.backbone.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [h["loss/ce"] for h in plain.history] == [h["loss/ce"] for h in watched.history]
    tags = scalar_tags(tb / "ce")  # one folder per stage (recipe ce: stage "ce")
    assert len(tags["loss/ce"]) == 8 and {"lr", "val_acc"} <= set(tags)
    # a backbone from the cache writes nothing
    again = tmp_path / "run2" / "tensorboard" / "pretrain"
    pretrain_backbone(*pretrain_options(_pretrain_cfg()), data, ArtifactCache(tmp_path / "b"), log=lambda m: None, progress=False,
                      log_dir=again)
    assert not again.exists()


def _tiny_generator():
    from tests.synth_worker import tiny_generator

    return tiny_generator()


def _toy_set(n_classes: int = 3, per_class: int = 4, size: int = 8):
    from fewgen.data.base import ArrayDataset

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_classes * per_class, 1, size, size), generator=g, dtype=torch.uint8)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    return ArrayDataset(images, labels, [f"class{i}" for i in range(n_classes)])


def test_generator_training_writes_loss_events_and_the_same_weights(tmp_path):
    data = _toy_set()
    plain, watched = _tiny_generator(), _tiny_generator()
    a = plain.fit(data, steps=6, batch_size=4, warmup=2)
    b = watched.fit(data, steps=6, batch_size=4, warmup=2, progress=True, log_dir=tmp_path / "generator")
    assert a.losses == b.losses
    for name, m in plain.modules().items():
        other = watched.modules()[name].state_dict()
        assert all(torch.equal(v, other[k]) for k, v in m.state_dict().items())
    tags = scalar_tags(tmp_path / "generator")
    assert tags["loss"] == pytest.approx(a.losses) and len(tags["lr"]) == 6


@pytest.mark.parametrize("mode", ["cls", "dset"])
def test_datadream_adaptation_writes_one_curve_over_its_classes(tmp_path, mode):
    from fewgen.generators.datadream import DataDreamConfig, train_datadream

    cfg = DataDreamConfig(mode=mode, rank=2, alpha=2.0, steps_per_class=3, batch_size=2, warmup=1)
    few = _toy_set(per_class=1)
    plain = train_datadream(_tiny_generator(), few, cfg)
    watched = train_datadream(_tiny_generator(), few, cfg, log_dir=tmp_path / "adapt")
    assert all(torch.equal(x, y) for la, lb in zip(plain.lora, watched.lora) for x, y in zip(la.values(), lb.values()))
    assert len(scalar_tags(tmp_path / "adapt")["loss"]) == 9  # 3 classes x 3 steps, either mode


def test_finetuning_precision_and_events(tmp_path):
    from fewgen.backbones import create_backbone
    from fewgen.learners.finetune import (
        BackboneClassifier,
        FinetuneSettings,
        ce_batches,
        ce_loss,
        finetune,
    )

    data = _toy_set(size=16)

    def model():
        torch.manual_seed(0)
        return BackboneClassifier(create_backbone("conv4", in_chans=1), 3)

    s = FinetuneSettings(steps=4, augment=["flip"], log_every=2)
    plain, watched = model(), model()
    h1 = finetune(plain, ce_batches(data, 4, "t"), ce_loss, s, (1, 16, 16))
    h2 = finetune(watched, ce_batches(data, 4, "t"), ce_loss, s, (1, 16, 16), progress=True, log_dir=tmp_path / "ft")
    assert h1 == [{**h, "seconds": h1[i]["seconds"]} for i, h in enumerate(h2)]
    assert all(torch.equal(v, watched.state_dict()[k]) for k, v in plain.state_dict().items())
    assert {"loss", "loss/ce", "lr"} <= set(scalar_tags(tmp_path / "ft"))
    bf16 = model()
    hb = finetune(bf16, ce_batches(data, 4, "t"), ce_loss, FinetuneSettings(steps=4, augment=["flip"],
                                                                            precision="bfloat16"), (1, 16, 16))
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in hb)
    with pytest.raises(FewgenError, match="float16 needs a CUDA device"):
        finetune(model(), ce_batches(data, 4, "t"), ce_loss, FinetuneSettings(steps=1, precision="float16"),
                 (1, 16, 16))


def test_gan_training_and_adaptation_write_their_loss_terms(tmp_path):
    from fewgen.gan.model import (
        AdaptSettings,
        GANArch,
        GANTrainSettings,
        adapt_gan,
        create_adapter,
        train_source_gan,
    )

    arch = GANArch(image_size=8, channels=1, z_dim=8, width=4)
    images = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    settings = GANTrainSettings(iters=3, batch_size=4, checkpoint_every=2)
    plain = train_source_gan(images, arch, settings, log=lambda m: None)
    src = train_source_gan(images, arch, settings, log=lambda m: None, log_dir=tmp_path / "source")
    assert all(torch.equal(v, src.generator.state_dict()[k]) for k, v in plain.generator.state_dict().items())
    assert {"loss/d", "loss/g"} <= set(scalar_tags(tmp_path / "source"))
    adapt_gan(create_adapter("cdc"), src, images[:4], AdaptSettings(iters=2, batch_size=4), log=lambda m: None,
              track=lambda G: {"mean": 0.5}, log_dir=tmp_path / "adapt")
    tags = scalar_tags(tmp_path / "adapt")
    assert {"loss/d_adv", "loss/g_adv", "loss/g_dist", "track/mean"} <= set(tags) and len(tags["loss/g_dist"]) == 2


def test_dg_training_writes_epoch_and_step_scalars(tmp_path):
    from fewgen.backbones import create_backbone
    from fewgen.data.base import ArrayDataset
    from fewgen.dg.protocol import (
        DGClassifier,
        DGTrainSettings,
        leave_one_domain_out,
        train_dg_classifier,
    )

    g = torch.Generator().manual_seed(0)
    full = ArrayDataset(torch.randint(0, 256, (24, 1, 16, 16), dtype=torch.uint8, generator=g),
                        torch.arange(2).repeat(12), ["a", "b"], domains=torch.arange(3).repeat_interleave(8),
                        domain_names=["x", "y", "z"], name="toy")
    split = leave_one_domain_out(full, "z", 0.25)

    def model():
        torch.manual_seed(0)
        return DGClassifier(create_backbone("conv4", in_chans=1), 2)

    s = DGTrainSettings(epochs=2, batch_size=4, augment=["flip"])
    a = train_dg_classifier(split, model(), s, log=lambda m: None)
    b = train_dg_classifier(split, model(), s, log=lambda m: None, progress=True, log_dir=tmp_path / "dg")
    assert a.history == [{**h, "seconds": a.history[i]["seconds"]} for i, h in enumerate(b.history)]
    tags = scalar_tags(tmp_path / "dg")
    assert len(tags["val_acc"]) == 2 and len(tags["loss/ce"]) == 2 * (len(split.train) // 4)


def test_learner_precision_is_checked_with_the_config():
    from fewgen.app.runner import import_steps, vocabularies
    from fewgen.options import check_values

    import_steps()  # the pipeline's step names are a vocabulary too
    for value in ("float32", "bfloat16", "float16"):
        check_values(load_config(DIGITS, [f"learner.precision={value}"]), vocabularies())
    with pytest.raises(FewgenError, match="'learner.precision': unknown value 'fp16'. Available: float32, bfloat16"):
        check_values(load_config(DIGITS, ["learner.precision=fp16"]), vocabularies())
    from fewgen.app.checks import check_combinations

    on_cpu = load_config(DIGITS, ["learner.precision=float16", "device=cpu", "pipeline=[pretrain,learn]"])
    with pytest.raises(FewgenError, match="learner.precision=float16 needs a CUDA device"):
        check_combinations(on_cpu)
    check_combinations(load_config(DIGITS, ["learner.precision=bfloat16", "device=cpu", "pipeline=[pretrain,learn]"]))


# ----------------------------------------------------------------------------- devices


def test_resolve_device_without_a_launcher_is_unchanged(monkeypatch):
    from fewgen.utils import is_main_process, resolve_device

    for var in ("WORLD_SIZE", "LOCAL_RANK", "RANK"):
        monkeypatch.delenv(var, raising=False)
    expected = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("auto") == expected and resolve_device("cpu") == torch.device("cpu")
    assert is_main_process()
    monkeypatch.setenv("WORLD_SIZE", "2")  # CPU processes under a launcher stay on the CPU
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu") and not is_main_process()


def test_resolve_device_under_a_launcher_takes_this_process_gpu(monkeypatch):
    import accelerate

    from fewgen.utils import resolve_device

    class FakeState:  # accelerate's PartialState on rank 1 of a 2-GPU launch
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(accelerate, "PartialState", FakeState)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert resolve_device("auto") == torch.device("cuda", 1)
    assert resolve_device("cuda") == torch.device("cuda", 1)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)  # an explicit index is kept
    assert resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("WORLD_SIZE")
    monkeypatch.delenv("LOCAL_RANK")
    assert resolve_device("auto") == torch.device("cuda")  # one process: as before


# ----------------------------------------------------------------------------- Stable Diffusion


def test_batches_pack_consecutive_classes_up_to_the_chunk():
    from fewgen.synthesis.store import SynthesisSpec

    spec = SynthesisSpec("g", ["a", "b", "c", "d", "e"], list("abcde"), per_class=3, image_shape=(3, 8, 8), chunk=8)
    assert spec.batches() == [[cj] for cj in spec.chunks()]
    assert spec.batches(mix_classes=True) == [[(0, 0), (1, 0)], [(2, 0), (3, 0)], [(4, 0)]]
    wide = SynthesisSpec("g", ["a", "b"], ["a", "b"], per_class=5, image_shape=(3, 8, 8), chunk=4)
    assert wide.batches(mix_classes=True) == [[(0, 0)], [(0, 1)], [(1, 0)], [(1, 1)]]  # only what fits


@pytest.fixture(scope="module")
def tiny_pipeline_dir(tmp_path_factory):
    pytest.importorskip("diffusers")
    from tests.tiny_sd import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def test_stable_diffusion_slicing_draws_the_same_images(tiny_pipeline_dir):
    from fewgen.generators.stable_diffusion import StableDiffusionGenerator

    prompts, seeds = ["a photo of a cat", "a photo of a dog"], [1, 2]
    plain = StableDiffusionGenerator(tiny_pipeline_dir).sample(prompts, seeds, steps=2)
    sliced = StableDiffusionGenerator(tiny_pipeline_dir, attention_slicing=True, vae_slicing=True)
    assert torch.equal(sliced.sample(prompts, seeds, steps=2), plain)


def test_stable_diffusion_synthesis_batches_classes_together(tiny_pipeline_dir, tmp_path):
    from fewgen.generators.stable_diffusion import StableDiffusionGenerator
    from fewgen.synthesis.store import SynthesisCache, SynthesisSpec

    gen = StableDiffusionGenerator(tiny_pipeline_dir)
    names = ["cat", "dog", "fox"]
    spec = SynthesisSpec(gen.state_key(), names, gen.prompts_for(names), per_class=2, image_shape=(3, 16, 16),
                         steps=2, chunk=4)
    fn = gen.synthesis_sample_fn(spec, None, (3, 16, 16))
    assert fn.mixes_classes
    calls = []
    gen_sample = gen.sample
    gen.sample = lambda prompts, *a, **k: calls.append(list(prompts)) or gen_sample(prompts, *a, **k)
    ds = SynthesisCache(tmp_path / "mixed").synthesize(spec, fn)
    assert [len(c) for c in calls] == [4, 2] and calls[0] == gen.prompts_for(["cat", "cat", "dog", "dog"])
    one_class = SynthesisSpec(**{**spec.__dict__, "chunk": 2})  # the same images, one class per batch
    alone = SynthesisCache(tmp_path / "alone").synthesize(one_class, gen.synthesis_sample_fn(one_class, None,
                                                                                              (3, 16, 16)))
    assert ds.labels.tolist() == alone.labels.tolist() == [0, 0, 1, 1, 2, 2]
    assert (ds.images.int() - alone.images.int()).abs().max() <= 1  # the same images up to rounding
