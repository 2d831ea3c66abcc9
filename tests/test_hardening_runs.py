"""Issue 25, run folders and config: no run can destroy what is not its own, no two runs can mix,
no count or size ends in an out-of-memory traceback after the work. Each case: the command, its
exit code, the one line it prints, and that nothing outside the run folder changed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fewgen.app.cli import main
from tests.conftest import DIGITS

TINY = ["pretrain.epochs=1", "pretrain.max_steps_per_epoch=3", "pretrain.val_episodes=5", "eval.episodes=10",
        "seeds=[0]", "eval.n_shots=[1]", "pipeline=[pretrain,evaluate]", "--no-progress", "--quiet"]


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder under ``root`` with its size and mtime."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size if p.is_file() else -1, st.st_mtime_ns)
    return out


def _user_folder(tmp: Path) -> Path:
    """A folder of someone's work that happens to hold a config.yaml (issue 25, case 1)."""
    p = tmp / "P"
    (p / "src").mkdir(parents=True)
    (p / "config.yaml").write_text("model: bert\n")
    (p / "src" / "train.py").write_text("x\n")
    return p


def _empty_yaml(tmp: Path) -> Path:
    (tmp / "empty.yaml").write_text("# nothing yet\n")
    return tmp / "empty.yaml"


# (case, what to make first, arguments after `fewgen run`, the line's distinctive part)
CASES = [
    ("overwrite a folder that is not a run", _user_folder, ["{cfg}", "--out", "{tmp}/P", "--overwrite"],
     "is not a fewgen run (no .fewgen-run marker); refusing to replace it"),
    ("a folder that is not a run, without --overwrite", _user_folder, ["{cfg}", "--out", "{tmp}/P"],
     "is not a fewgen run"),
    ("a staging name taken by someone else's folder", lambda t: (t / ".R.incomplete" / "mine").mkdir(parents=True),
     ["{cfg}", "--out", "{tmp}/R"], "is not fewgen's (fewgen builds the run there)"),
    ("run name escapes runs/", None, ["{cfg}", "name=../../../escaped"], "is not a run name"),
    ("run name with a separator", None, ["{cfg}", "name=a/b"], "is not a run name"),
    ("run name ..", None, ["{cfg}", "name=.."], "is not a run name"),
    ("run name empty", None, ["{cfg}", "name="], "is not a run name"),
    ("huge episode count", None, ["{cfg}", "eval.episodes=100000000000"], "'eval.episodes' must be at most 1,000,000"),
    ("huge image size", None, ["{cfg}", "data.image_size=20000"], "'data.image_size' must be at most 1024"),
    ("huge steps", None, ["{cfg}", "pretrain.epochs=99999999999"], "'pretrain.epochs' must be at most 1,000,000"),
    ("duplicate seeds", None, ["{cfg}", "seeds=[0,0]"], "'seeds' lists 0 more than once"),
    ("duplicate ways", None, ["{cfg}", "eval.n_ways=[5,5]"], "'eval.n_ways' lists 5 more than once"),
    ("an empty config file", _empty_yaml, ["{tmp}/empty.yaml"], "is empty; give at least one key"),
]


@pytest.mark.parametrize("case,make,args,line", CASES, ids=[c[0] for c in CASES])
def test_refused_in_one_line_and_nothing_changes(tmp_path, monkeypatch, capsys, case, make, args, line):
    monkeypatch.chdir(tmp_path)
    if make is not None:
        make(tmp_path)
    before = snapshot(tmp_path)
    argv = [a.format(tmp=tmp_path, cfg=DIGITS) for a in args]
    code = main(["run", argv[0], f"cache_dir={tmp_path / 'cache'}", *TINY, *argv[1:]])  # the case's keys last
    err = capsys.readouterr().err
    assert code == 2, err
    assert line in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path) == before  # nothing written, deleted or touched, the cache included


def test_episode_memory_refused_before_pretraining(tmp_path, monkeypatch, capsys):
    """An episode count that fits the config's bound but not the machine's memory is refused with
    the estimate, after the data loads and before anything is trained or written."""
    import fewgen.utils

    monkeypatch.setattr(fewgen.utils, "memory_bytes", lambda: 2**30)  # a 1 GiB machine
    before = snapshot(tmp_path)
    code = main(["run", DIGITS, f"cache_dir={tmp_path / 'cache'}", *TINY, "eval.episodes=1000000",
                 "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2
    assert "eval.episodes=1,000,000 at 5-way 1-shot (the episodes' indices) needs about" in err
    assert "of this machine's 1.0 GiB; lower eval.episodes" in err and err.count("\n") == 1
    assert snapshot(tmp_path) == before


def test_overwrite_replaces_only_a_fewgen_run(tmp_path, capsys):
    out = tmp_path / "r"
    args = ["run", DIGITS, f"cache_dir={tmp_path / 'cache'}", *TINY, "pipeline=[pretrain,evaluate,report]",
            "--out", str(out)]
    assert main(args) == 0
    marker = json.loads((out / ".fewgen-run").read_text())
    assert marker["format"] == 1 and marker["fewgen"]
    assert main(args) == 2  # finished: not replaced without --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "r"]  # no staging, lock or replaced folder left
    # the report names the run, not its staging folder
    page = (out / "report" / "index.html").read_text()
    assert "<title>fewgen report: r</title>" in page and "incomplete" not in page
    # the run's backbone is its own file: it outlives the cache
    ckpt = out / "checkpoints" / "backbone.safetensors"
    assert ckpt.is_file() and not ckpt.is_symlink()
    data = ckpt.read_bytes()
    import shutil

    shutil.rmtree(tmp_path / "cache")
    assert ckpt.read_bytes() == data


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fewgen.app.cli", *args]


def test_two_processes_on_one_out(tmp_path):
    """Two `fewgen run` on one --out: the second exits 2 within seconds naming the first's pid, and
    the published run is entirely the first one's (issue 25, case 3)."""
    out, cache = tmp_path / "x", tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(_cli("run", DIGITS, f"cache_dir={cache}", "pretrain.epochs=3", "pretrain.val_episodes=5",
                                  "eval.episodes=200", "seeds=[0]", "pipeline=[pretrain,evaluate]", "num_threads=1",
                                  "--no-progress", "--quiet", "--out", str(out)),
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not (tmp_path / ".x.incomplete").exists():  # the first one holds the lock and is writing
            assert first.poll() is None and time.time() < deadline, first.communicate()
            time.sleep(0.05)
        t = time.time()
        second = subprocess.run(_cli("run", DIGITS, f"cache_dir={cache}", "pretrain.lr=0.01",
                                     "eval.classifiers=[proto]", "--no-progress", "--out", str(out)),
                                env=env, capture_output=True, text=True, timeout=120)
        took = time.time() - t
        assert first.poll() is None, "the first run must still be running while the second is refused"
        assert second.returncode == 2, second.stderr
        assert f"another fewgen process (pid {first.pid}) is writing the run {out}" in second.stderr
        assert second.stderr.count("\n") == 1 and took < 30
    finally:
        stdout, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr
    cfg = (out / "config.yaml").read_text()
    assert "lr: 0.05" in cfg and "lr: 0.01" not in cfg
    rows = json.loads((out / "metrics.json").read_text())["rows"]
    assert {r["classifier"] for r in rows} == {"logreg", "proto"}
    log = (out / "log.txt").read_text()
    assert log.count("== step pretrain\n") == 1 and "run finished" in log
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "x"]


def test_sigterm_stops_with_the_resume_line_and_keeps_the_old_run(tmp_path):
    """SIGTERM (a scheduler, `kill`) ends a run as Ctrl-C does: exit 143, one line with the command that
    resumes it, no published run, the lock released (the same command then runs)."""
    import signal

    out, cache = tmp_path / "t", tmp_path / "cache"
    args = _cli("run", DIGITS, f"cache_dir={cache}", "pretrain.epochs=30", "pretrain.val_episodes=5",
                "eval.episodes=10", "seeds=[0]", "num_threads=1", "--no-progress", "--quiet", "--out", str(out))
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (tmp_path / ".t.incomplete" / "log.txt").exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("terminated (SIGTERM); run the same command again to resume")
    assert "fewgen run" in lines[0] and f"--out {out}" in lines[0]
    assert not out.exists() and not (tmp_path / ".t.lock").exists()
