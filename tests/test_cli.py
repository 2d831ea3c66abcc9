"""The CLI end to end on digits, and bad input: one clear line, exit code 2, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from fewgen.app.cli import main

TINY = ["pretrain.epochs=2", "pretrain.val_episodes=20", "eval.episodes=30", "seeds=[0,1]", "generator.exemplar.train_steps=10",
        "synthesis.synthetic_per_class=4", "synthesis.steps=4", "learner.augmented_copies_per_class=4", "--no-progress",
        "--quiet"]


def _run(tmp_path, out="run", extra=(), cache="cache"):
    return main(["run", "demo", f"cache_dir={tmp_path / cache}", *TINY, *extra, "--out", str(tmp_path / out)])


def test_run_demo_writes_a_complete_run(tmp_path, capsys):
    assert _run(tmp_path) == 0
    run = tmp_path / "run"
    for name in ("config.yaml", "env.json", "log.txt", "metrics.json", "done", "splits.json", "pretrain_history.json"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "backbone.safetensors").exists()
    with open(run / "checkpoints" / "backbone.safetensors", "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(header_len))  # a safetensors header, not a pickle
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["pretrain"]["epochs"] == 2 and cfg["data"]["dataset"] == "digits"
    env = json.loads((run / "env.json").read_text())
    assert env["packages"]["torch"] and env["device"] == "cpu"
    rows = json.loads((run / "metrics.json").read_text())["rows"]
    settings = {(r["classifier"], r["n_way"], r["n_shot"], bool(r.get("all_way"))) for r in rows}
    assert ("logreg", 5, 1, False) in settings and ("proto", 5, 5, False) in settings
    # the whole path: real shots alone, the generator-free control, and real + generated images
    kinds = {(r["method"], r["uses_synthetic"]) for r in rows}
    assert {("ce", False), ("frozen+augmented-copies", False), ("frozen+synthetic", True)} <= kinds
    assert (run / "grids" / "seed0_1shot" / "overview.png").exists()
    for r in rows:
        assert {"method", "n_way", "n_shot", "accuracy", "ci95", "episodes", "seeds"} <= set(r)
        assert 0 <= r["accuracy"] <= 100 and r["seeds"] == [0, 1]
        if not r.get("all_way"):
            assert r["episodes"] == 60 and r["accuracy"] > 20 + r["ci95"]  # above 5-way chance
    assert len(list((run / "episodes").glob("*.npz"))) == 4
    # every generated row against the best real-only row of its setting, paired on the shared episodes
    import numpy as np

    comparisons = json.loads((run / "metrics.json").read_text())["comparisons"]
    per_episode = np.load(run / "per_episode.npz")
    assert len(per_episode.files) == len(rows)
    gen = [i for i, r in enumerate(rows) if r["uses_synthetic"] and not r.get("all_way") and r["n_shot"] == 1
           and r["classifier"] == "proto"]
    real = max((i for i, r in enumerate(rows) if not r["uses_synthetic"] and not r.get("all_way")
                and r["n_shot"] == 1), key=lambda i: rows[i]["accuracy"])
    c = next(c for c in comparisons if c["row"] == f"{rows[gen[0]]['method']} [proto]" and c["setting"] == "5-way 1-shot")
    d = per_episode[f"row{gen[0]}"] - per_episode[f"row{real}"]
    assert c["n"] == 60 and c["difference"] == pytest.approx(d.mean(), abs=1e-3)
    assert c["ci95"] > 0 and c["reference"].startswith(rows[real]["method"])
    assert capsys.readouterr().out == ""  # --quiet: nothing printed, everything in the log
    log = (run / "log.txt").read_text()
    assert "accuracy" in log and "run finished" in log and str(run) in log
    assert "real images only against real + generated images" in log
    assert not list(tmp_path.glob(".run.*"))  # the staging folder became the run


@pytest.mark.slow
def test_same_seed_same_metrics_with_fresh_caches(tmp_path):
    assert _run(tmp_path, out="a", cache="cache_a") == 0
    assert _run(tmp_path, out="b", cache="cache_b") == 0
    a = json.loads((tmp_path / "a" / "metrics.json").read_text())["rows"]
    b = json.loads((tmp_path / "b" / "metrics.json").read_text())["rows"]
    assert a == b


@pytest.mark.slow
def test_refuses_to_overwrite_then_overwrites(tmp_path, capsys):
    assert _run(tmp_path) == 0
    capsys.readouterr()
    assert _run(tmp_path) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and "--overwrite" in err[0]
    assert _run(tmp_path, extra=["--overwrite"]) == 0


NOT_UTF8 = "name: latin\npretrain:\n  epochs: 1\n# caf\xe9\n".encode("latin-1")


def _bad_cases():
    import torch

    cases = [
        (["data.dataset=nosuch"], "unknown dataset 'nosuch'"),
        (["pretrain.epoch=3"], "unknown config key 'pretrain.epoch'. Did you mean 'pretrain.epochs'?"),
        (["pretrain.epochs=many"], "config key 'pretrain.epochs' expects int"),
        (["eval.n_ways=[7]"], "n_way=7 is larger than the number of novel classes (5)"),
        (["eval.n_shots=[0]"], "eval.n_shots has 0 (every image of a class as a shot), which leaves no query images"),
        (["eval.n_shots=[-1]"], "config key 'eval.n_shots' must be at least 0, got -1"),
        (["eval.n_shots=[175]"], "fewer than n_shot + n_query"),
        (["pipeline=[pretrain,nosuchstep]"], "unknown pipeline step 'nosuchstep'"),
        (["device=tpu"], "unknown device 'tpu'; use auto, cpu, cuda or cuda:N"),
        (["eval.episodes=0"], "config key 'eval.episodes' must be at least 1, got 0"),
        (["eval.episodes=-5"], "config key 'eval.episodes' must be at least 1, got -5"),
        (["seeds=[]"], "config key 'seeds' must list at least one value, got []"),
        (["pretrain.batch_size=0"], "config key 'pretrain.batch_size' must be at least 1, got 0"),
        (["pretrain.epochs=0"], "config key 'pretrain.epochs' must be at least 1, got 0"),
        (["num_threads=-2"], "config key 'num_threads' must be at least 1, got -2"),
        (["data.channels=2"], "config key 'data.channels': unknown value 2"),
        (["pretrain.recipe=cee"], "unknown recipe 'cee'. Did you mean 'ce'?"),
        (["cache_dir=/sys/fewgen-cache"], "cache folder /sys/fewgen-cache is not writable"),
        (["--out", "/sys/fewgen-run"], "the folder of --out /sys is not writable"),
        (["--out", "{tmp}/a-file"], "is a file, not a folder"),
        (["--config-file", "{tmp}/latin1.yaml"], "is not UTF-8 text"),
        (["--config-file", "{tmp}/missing.yaml"], "config file {tmp}/missing.yaml does not exist"),
        (["--preset", "dmeo"], "unknown preset 'dmeo'. Did you mean 'demo'?"),
    ]
    if not torch.cuda.is_available():
        cases.append((["device=cuda"], "device=cuda but no CUDA device is available"))
    return cases


@pytest.mark.parametrize("extra, message", _bad_cases(), ids=lambda v: v if isinstance(v, str) else " ".join(v))
def test_bad_input_is_one_clear_line(tmp_path, capsys, extra, message):
    (tmp_path / "a-file").write_text("not a run")
    (tmp_path / "latin1.yaml").write_bytes(NOT_UTF8)
    extra = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    preset = "demo"
    if extra[0] == "--config-file":
        preset, extra = extra[1], extra[2:]
    elif extra[0] == "--preset":
        preset, extra = extra[1], extra[2:]
    out_dir = tmp_path / "r"
    if "--out" not in extra:
        extra = [*extra, "--out", str(out_dir)]
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["run", preset, f"cache_dir={tmp_path / 'cache'}", *extra] if "cache_dir=" not in " ".join(extra)
                else ["run", preset, *extra])
    out = capsys.readouterr()
    assert code == 2
    lines = out.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in lines[0], \
        out.err
    assert "Traceback" not in out.err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written: no run, staging or cache


@pytest.mark.slow
def test_a_failing_overwrite_keeps_the_finished_run(tmp_path, capsys):
    assert _run(tmp_path) == 0
    metrics = (tmp_path / "run" / "metrics.json").read_text()
    assert _run(tmp_path, extra=["pretrain.recipe=cee", "--overwrite"]) == 2
    assert "unknown recipe 'cee'" in capsys.readouterr().err
    assert (tmp_path / "run" / "metrics.json").read_text() == metrics and (tmp_path / "run" / "done").exists()


def _break_step(monkeypatch, name, exc):
    """Make pipeline step ``name`` raise ``exc`` (``monkeypatch.undo()`` restores it)."""
    from fewgen.app import runner

    def boom(run):
        raise exc

    monkeypatch.setitem(runner.STEPS._items, name, boom)


@pytest.mark.slow
def test_interrupted_run_resumes_with_the_printed_command(tmp_path, capsys, monkeypatch):
    """Ctrl-C mid-run: the old run is intact, the CLI prints the command, and that command works."""
    assert _run(tmp_path) == 0
    old = (tmp_path / "run" / "metrics.json").read_text()
    _break_step(monkeypatch, "evaluate", KeyboardInterrupt())
    argv = ["run", "demo", f"cache_dir={tmp_path / 'cache'}", *TINY, "pretrain.seed=1", "--out", str(tmp_path / "run"),
            "--overwrite"]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("interrupted; run the same command again to resume") and "--overwrite" in err
    assert (tmp_path / "run" / "metrics.json").read_text() == old  # the finished run is untouched
    monkeypatch.undo()
    import shlex

    assert main(shlex.split(err.split(": ", 1)[1])[1:]) == 0  # the printed command, as typed
    cfg = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert cfg["pretrain"]["seed"] == 1 and (tmp_path / "run" / "done").exists()
    assert "pretrained backbone from cache" in (tmp_path / "run" / "log.txt").read_text()  # resumed, not redone


@pytest.mark.slow
def test_a_failed_run_leaves_no_folder_and_does_not_block_a_rerun(tmp_path, capsys, monkeypatch):
    from fewgen.errors import FewgenError

    _break_step(monkeypatch, "evaluate", FewgenError("something the user must fix"))
    assert _run(tmp_path) == 2
    assert "error: something the user must fix" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    assert _run(tmp_path) == 0 and (tmp_path / "run" / "done").exists()


def test_overrides_may_follow_the_options(tmp_path, capsys):
    # `fewgen run demo --out r key=value`: the override is applied (here: rejected by name), not dropped
    assert main(["run", "demo", "--out", str(tmp_path / "r"), "--quiet", "pretrain.epoch=3"]) == 2
    assert "unknown config key 'pretrain.epoch'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # a stray word is still an argparse error
        main(["run", "demo", "--out", str(tmp_path / "r"), "stray"])
    assert e.value.code == 2 and "unrecognized arguments: stray" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_process_exit_code_and_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fewgen.app.cli", "run", "demo", "data.dataset=nosuch",
                           "--out", str(tmp_path / "r")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("error: config key 'data.dataset': unknown dataset")
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_datasets_and_presets_commands(capsys):
    assert main(["datasets"]) == 0
    out = capsys.readouterr().out
    for name in ("digits", "omniglot", "mnist", "pacs", "imagefolder"):
        assert name in out
    assert main(["datasets", "digits"]) == 0
    assert "novel" in capsys.readouterr().out
    assert main(["presets", "--keys"]) == 0
    assert "pretrain.epochs" in capsys.readouterr().out


def test_user_yaml_with_base_preset(tmp_path):
    cfg = tmp_path / "mine.yaml"
    cfg.write_text("base: demo\nname: mine\npretrain:\n  epochs: 1\n")
    from fewgen.app.config import load_config

    c = load_config(str(cfg), ["eval.episodes=5"])
    assert c.name == "mine" and c.pretrain.epochs == 1 and c.eval.episodes == 5 and c.data.dataset == "digits"


def test_import_fewgen_is_light():
    code = "import sys, fewgen, fewgen.app.config, fewgen.data; print(sorted(m for m in ('diffusers','transformers','peft','accelerate') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
