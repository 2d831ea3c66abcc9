"""Every preset x {fewgen run, fewgen fit} x {learner.model backbone, clip} x generator kind: the check
``run()`` makes before its first step (``fewgen.app.runner.check_config``) accepts the combination or
refuses it in one ``FewgenError`` line, and writes nothing. The refused combinations are printed as a
table (``pytest -s``) and written to ``refused.json`` in the test's tmp folder.

Also: a bare name is the preset even beside a folder or file of that name; a single validation
class skips validation instead of stopping pretraining; what the data decides is refused right
after loading, before the first step."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fewgen.app.cli import fit_config, main
from fewgen.app.config import load_config, preset_names
from fewgen.app.runner import check_config
from fewgen.errors import FewgenError
from fewgen.generators.registry import GENERATORS

GENERATOR_KINDS = GENERATORS.names()

pytest.importorskip("transformers")
pytest.importorskip("diffusers")

MODELS = ("backbone", "clip")
COMMANDS = ("run", "fit")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """A tiny random CLIP folder (learner.clip_path) and Stable Diffusion folder (generator.stable_diffusion.model)."""
    from tests.test_clip import tiny_clip_folder
    from tests.tiny_sd import build_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny-models")
    return {"clip": tiny_clip_folder(root / "clip"), "sd": build_tiny_pipeline(root / "sd")}


def combination_overrides(model: str, kind: str, tiny: dict[str, Path], command: str = "run") -> list[str]:
    """``model``: backbone (the preset's backbone and learner) or clip (the frozen CLIP backbone, and
    in ``run`` the CLIP + LoRA learner too; ``fit`` trains no learner and refuses learner.* keys)."""
    out = [f"generator.kind={kind}"]
    if model == "clip":
        out += ["backbone.name=clip", f"backbone.model={tiny['clip']}"]
    if command == "run":
        out.append(f"learner.model={model}")
        if model == "clip":
            out.append(f"learner.clip_path={tiny['clip']}")
    if kind == "stable-diffusion":
        out.append(f"generator.stable_diffusion.model={tiny['sd']}")
    return out


def config_for(command: str, preset: str, overrides: list[str], shots: Path):
    """The RunConfig the command builds (``fewgen fit`` through the CLI's own :func:`fit_config`)."""
    if command == "fit":
        return fit_config(shots, preset, overrides)
    return load_config(preset, overrides)


def snapshot(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_every_combination_is_accepted_or_refused_in_one_line(tiny_models, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    cache = tmp_path / "cache"
    before = snapshot(tmp_path)
    results = []
    for preset in preset_names():
        for command in COMMANDS:
            for model in MODELS:
                for kind in GENERATOR_KINDS:
                    overrides = [*combination_overrides(model, kind, tiny_models, command), f"cache_dir={cache}"]
                    line = None
                    try:
                        check_config(config_for(command, preset, overrides, tmp_path / "shots"))
                    except FewgenError as e:
                        line = str(e)
                    except Exception as e:  # noqa: BLE001  (anything else is a bug: name the combination)
                        pytest.fail(f"{preset} {command} learner.model={model} generator.kind={kind}: "
                                    f"{type(e).__name__}: {e}")
                    assert line is None or (line and "\n" not in line), (preset, command, model, kind, line)
                    results.append({"preset": preset, "command": command, "learner.model": model,
                                    "generator.kind": kind, "refused": line})
    assert snapshot(tmp_path) == before  # nothing computed or written: no cache, no run folder
    assert len(results) == len(preset_names()) * len(COMMANDS) * len(MODELS) * len(GENERATOR_KINDS)

    def refused(preset, command, model, kind):
        return next(r["refused"] for r in results if (r["preset"], r["command"], r["learner.model"],
                                                       r["generator.kind"]) == (preset, command, model, kind))

    for preset in preset_names():  # each preset as shipped runs, and fits where it pretrains a backbone
        kind = load_config(preset).generator.kind
        assert refused(preset, "run", "backbone", kind) is None, preset
        if "pretrain" in load_config(preset).pipeline:
            assert refused(preset, "fit", "backbone", kind) is None, preset
    for kind in GENERATOR_KINDS:  # the defaults of the DataDream presets work with the CLIP learner
        if not GENERATORS.get(kind).adaptable:  # their pipeline adapts the generator: refused up front
            assert "drop 'adapt' from pipeline" in refused("datadream", "run", "clip", kind)
            continue
        assert refused("datadream", "run", "clip", kind) is None
        assert refused("diffalign", "run", "clip", kind) is None
        # fit exports the frozen CLIP backbone's classifier
        assert refused("datadream", "fit", "clip", kind) is None
    # fit trains no learner: a learner setting would be dropped, so it is refused up front, naming the alternative
    with pytest.raises(FewgenError, match="backbone.name=clip"):
        fit_config(tmp_path / "shots", "demo", ["learner.model=clip", f"learner.clip_path={tiny_models['clip']}"])
    # Stable Diffusion in fit is adapted to the shots (DataDream), not drawn from the class names alone
    assert "adapt" in fit_config(tmp_path / "shots", "demo", combination_overrides(
        "backbone", "stable-diffusion", tiny_models, "fit")).pipeline
    assert "no 'adapt' step" in refused("demo", "run", "backbone", "stable-diffusion")

    rows = [r for r in results if r["refused"]]
    (tmp_path / "refused.json").write_text(json.dumps(rows, indent=1))
    print(f"\n{len(rows)} of {len(results)} combinations refused before the first step:")
    print(f"{'preset':<20}{'command':<8}{'learner.model':<15}{'generator.kind':<18}line")
    for r in rows:
        print(f"{r['preset']:<20}{r['command']:<8}{r['learner.model']:<15}{r['generator.kind']:<18}{r['refused']}")


def test_datadream_on_digits_with_clip_passes_the_check(tiny_models, tmp_path):
    """The user's command of issue 26: no workaround needed, nothing refused mid-run for a default."""
    for kind in (k for k in GENERATOR_KINDS if GENERATORS.get(k).adaptable):  # the preset adapts its generator
        cfg = load_config("datadream", ["data.dataset=digits", "data.image_size=null", "eval.n_ways=[5]",
                                        *combination_overrides("clip", kind, tiny_models),
                                        f"cache_dir={tmp_path / 'cache'}"])
        assert cfg.learner.frozen_synthetic and cfg.learner.head_init == "prototypes"  # the defaults, untouched
        check_config(cfg)
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("overrides, message", [
    (["learner.model=clip"], "learner.model=clip needs learner.clip_path"),
    (["learner.model=clip", "learner.clip_path=./no-such-clip"], "learner.clip_path=./no-such-clip does not exist"),
    (["learner.model=clip", "learner.clip_path={clip}", "learner.synthetic_keep=0.5"], "synthetic_keep=0.5 needs"),
    (["learner.model=clip", "learner.clip_path={clip}", "learner.sweep_method=frozen"], "sweep_method=frozen"),
    (["learner.model=clip", "learner.clip_path={clip}", "pipeline=[pretrain,generator,adapt,synthesize,learn,export]"],
     "set export.model=learner to export that"),
    (["learner.methods=[diffalign]", "learner.w_real=0", "learner.w_synthetic=0", "learner.w_mmd=0",
      "learner.ablations=[hallucination]"], "every loss weight of diffalign-no-hallucination is zero"),
    (["generator.kind=stable-diffusion"], "needs generator.stable_diffusion.model"),
    (["synthesis.zero_shot=true"], "leaving the adapt step's adapters unused"),
    (["synthesis.zero_shot=true", "generator.diffusion.cond_mode=class", "pipeline=[pretrain,generator,synthesize]"],
     "zero-shot generation needs the class names"),
    (["generator.kind=stable-diffusion", "generator.stable_diffusion.model={sd}", "synthesis.sdedit_strengths=[0,0.5]"],
     "img2img needs strengths in (0, 1]"),
    (["generator.diffusion.attention_levels=[false,true]"], "generator.diffusion.attention_levels has 2 entries"),
    (["data.image_size=30"], "cannot be halved by 3 UNet levels"),
    (["export.n_shot=3", "pipeline=[pretrain,generator,adapt,synthesize,export]"], "export.n_shot=3 and export.seed=0"),
    (["pretrain.recipe=ier", "pretrain.ier.num_views=9"], "pretrain.ier.num_views=9 must be between 2 and 4"),
    (["pretrain.recipe=ier-distill", "pretrain.ier.generations=0"], "ier-distill needs at least 1"),
    (["pipeline=[pretrain,import-synthetic,learn]", "learner.methods=[datadream]"], "needs synthesis.import_dir"),
    (["pipeline=[domainfusion]"], "needs a domain dataset"),
    (["pipeline=[pretrain,gan-source,gan-adapt]", "gan.feature_net=clip:{clip}"], "gan.lpips_weights"),
], ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_combinations_a_step_would_refuse_are_refused_before_it(tiny_models, tmp_path, overrides, message):
    """A check that needs only the config is made before the first step (the datadream preset on digits)."""
    overrides = [o.format(clip=tiny_models["clip"], sd=tiny_models["sd"]) for o in overrides]
    cfg = load_config("datadream", ["data.dataset=digits", "data.image_size=null", "eval.n_ways=[5]", *overrides,
                                    f"cache_dir={tmp_path / 'cache'}"])
    with pytest.raises(FewgenError) as e:
        check_config(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_bare_name_is_the_preset_beside_a_folder_or_file_of_that_name(tmp_path, monkeypatch, capsys):
    import fewgen.app.runner as runner

    monkeypatch.chdir(tmp_path)
    (tmp_path / "demo").mkdir()  # a folder is never a config
    ran = []
    monkeypatch.setattr(runner, "run", lambda cfg, **kw: ran.append(cfg))
    assert main(["run", "demo", "--out", str(tmp_path / "out")]) == 0
    assert ran[0].name == "demo" and ran[0].generator.kind == "exemplar"  # the preset, not the folder
    assert "note:" not in capsys.readouterr().err
    (tmp_path / "demo.yaml").write_text("base: omniglot\nname: mine\n")
    assert load_config("demo").name == "demo"  # the preset; the file beside it is named, not read
    assert "the file demo.yaml here is not read (write ./demo.yaml to run it)" in capsys.readouterr().err
    assert load_config("demo.yaml").name == "mine" and load_config("./demo.yaml").name == "mine"
    with pytest.raises(FewgenError, match="is a folder, not a config"):
        load_config("./demo")
    (tmp_path / "mine").write_text("base: demo\nname: mine\n")
    assert load_config("mine").name == "mine"  # a bare name that is no preset: the file
    with pytest.raises(FewgenError, match="unknown preset 'dmeo'"):
        load_config("dmeo")


def test_one_validation_class_skips_validation_and_keeps_the_last_epoch(tmp_path):
    """PACS has one validation class: pretraining runs without validation instead of stopping."""
    from fewgen.app.checks import check_data
    from fewgen.cache import ArtifactCache
    from fewgen.data.loading import load_data
    from fewgen.pretrain import pretrain_backbone

    cfg = load_config("demo", ["data.base_classes=['0','1','2']", "data.val_classes=['3']",
                               "data.novel_classes=['4','5','6','7','8','9']", "pretrain.epochs=2",
                               "pretrain.max_steps_per_epoch=1", "pipeline=[pretrain,evaluate]"])
    data = load_data(cfg.data, cfg.backbone)
    check_data(cfg, data)
    logs: list[str] = []
    pb = pretrain_backbone(cfg.backbone, cfg.pretrain, data, ArtifactCache(tmp_path / "cache"), log=logs.append, progress=False)
    assert pb.best_epoch == 2 and pb.best_val is None
    assert all("val_acc" not in h for h in pb.history)
    assert any("validation skipped: 1 validation class(es)" in m and "data.val_classes" in m for m in logs)
    # a shot and a query per validation class, or one line right after the data loads
    two = load_config("demo", ["pretrain.val_n_shot=500"])
    with pytest.raises(FewgenError, match="validation class '[34]' has .* lower pretrain.val_n_shot"):
        check_data(two, load_data(two.data, two.backbone))
