"""Run directories: config.yaml, env.json, log.txt, metrics.json, checkpoints/, done; built aside and
published when the run has finished.

A folder is a fewgen run only if it holds fewgen's marker (:data:`MARKER`, written first into every
staging folder): ``--overwrite`` replaces nothing else. One process at a time writes a run: it holds
an exclusive lock (``fcntl``) on ``.<name>.lock`` beside the run from its first check to its publish,
and a second process on the same ``--out`` is refused in one line naming the first one's pid.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from fewgen.errors import FewgenError
from fewgen.utils import write_json

TRACKED_PACKAGES = ("torch", "numpy", "scikit-learn", "kornia", "torchmetrics", "safetensors", "diffusers",
                    "transformers", "peft", "accelerate", "sentence-transformers", "tensorboard")


#: the file that makes a folder a fewgen run (its content: fewgen's version and the run format)
MARKER = ".fewgen-run"
RUN_FORMAT = 1
#: a run name is one path component of these characters (no separators, no "..", no leading dot)
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_run_name(name: str, key: str = "name") -> None:
    """A run name is a single folder name under ``runs/``: letters, digits and ``-_.``, not starting
    with a dot, at most 128 characters; anything else is one clear error."""
    if not isinstance(name, str) or not RUN_NAME.fullmatch(name) or set(name) == {"."}:
        raise FewgenError(f"config key '{key}': {name!r} is not a run name; use one folder name of letters, digits "
                          "and -_. (not starting with a dot), or choose the folder itself with --out")


def is_run_dir(path: Path) -> bool:
    """Whether ``path`` holds fewgen's run marker (only such a folder may be replaced or resumed)."""
    return (Path(path) / MARKER).is_file()


def write_marker(folder: Path) -> None:
    import fewgen

    (folder / MARKER).write_text(json.dumps({"fewgen": fewgen.__version__, "format": RUN_FORMAT}) + "\n")


def staging_dir(path: str | os.PathLike) -> Path:
    """Where a run into ``path`` is built: a hidden sibling, renamed into ``path`` when it finishes."""
    path = Path(path)
    return path.parent / f".{path.name}.incomplete"


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Raise one clear error unless a run may be written to ``path``: absent or empty, an unfinished
    fewgen run (no ``done``), or, with ``overwrite``, a finished one; a folder without fewgen's
    marker is never replaced. The folders the run is built in and moved through beside it must be
    absent or fewgen's own. Also checks that the folder beside it can be written."""
    from fewgen.cache import check_writable_dir

    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise FewgenError(f"--out {path} is a {'link' if path.is_symlink() else 'file'}, not a folder; "
                          "give a folder path for the run")
    if path.is_dir() and any(path.iterdir()):
        if not is_run_dir(path):
            raise FewgenError(f"{path} is not empty and is not a fewgen run (no {MARKER} marker); refusing to "
                              "replace it: choose another --out (or move its files away yourself)")
        if (path / "done").exists() and not overwrite:
            raise FewgenError(f"run directory {path} already exists; pass --overwrite to replace it or --out to choose another")
    for aside in (staging_dir(path), replaced_dir(path)):
        if (aside.is_symlink() or aside.exists()) and not (aside.is_dir() and not aside.is_symlink()
                                                            and (is_run_dir(aside) or not any(aside.iterdir()))):
            raise FewgenError(f"{aside} exists and is not fewgen's (fewgen builds the run there); move it away "
                              "or choose another --out")
    check_writable_dir(path.parent if str(path.parent) else Path("."), "the folder of --out",
                       "choose a writable place with --out")


def replaced_dir(path: str | os.PathLike) -> Path:
    """Where the previous run at ``path`` waits while the new one is moved into place."""
    path = Path(path)
    return path.parent / f".{path.name}.replaced"


def _remove_own(folder: Path) -> None:
    """Delete ``folder`` only if it is fewgen's (its marker, or empty); :func:`check_run_dir` has
    refused anything else before the run started."""
    if folder.is_symlink() or not folder.exists():
        return
    if not (is_run_dir(folder) or not any(folder.iterdir())):
        raise FewgenError(f"{folder} is not fewgen's (no {MARKER} marker); refusing to delete it")
    shutil.rmtree(folder)


def prepare_staging(path: str | os.PathLike) -> Path:
    """A fresh staging folder for a run into ``path`` (an earlier interrupted attempt is cleared:
    what it computed lives in the cache); the marker is its first file."""
    staging = staging_dir(path)
    _remove_own(staging)
    staging.mkdir(parents=True)
    write_marker(staging)
    (staging / "checkpoints").mkdir()
    return staging


def publish_run(staging: Path, path: str | os.PathLike) -> Path:
    """Move a finished staging folder to ``path``; an older run there is replaced only now."""
    path = Path(path)
    old = None
    if path.exists():
        if any(path.iterdir()) and not is_run_dir(path):  # checked before the run; checked again before moving it
            raise FewgenError(f"{path} is not a fewgen run (no {MARKER} marker); refusing to replace it")
        old = replaced_dir(path)
        _remove_own(old)
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        _remove_own(old)
    return path


def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.parent / f".{path.name}.lock"


@contextlib.contextmanager
def run_lock(path: str | os.PathLike):
    """Hold the exclusive lock of the run at ``path`` (``.<name>.lock`` beside it, holding the pid)
    for the body; another process holding it is one clear error naming its pid. The lock file is
    removed on release (a lock taken on a file that was removed meanwhile is taken again)."""
    import fcntl

    lock = lock_path(path)
    made = [p for p in (lock.parent, *lock.parent.parents) if not p.exists()]
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            finally:
                os.close(fd)
            raise FewgenError(f"another fewgen process (pid {pid}) is writing the run {path}; wait for it to finish "
                              "or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)  # the holder removed the file between our open and our lock: take the new one
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield lock
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)
        for folder in made:  # the folders made for the lock, if the run left nothing in them
            with contextlib.suppress(OSError):
                folder.rmdir()


def git_sha() -> str | None:
    here = Path(__file__).resolve().parent
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment(device: str) -> dict[str, Any]:
    import torch

    import fewgen

    versions = {}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "fewgen": fewgen.__version__,
        "git_sha": git_sha(),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": device,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "packages": versions,
        "argv": sys.argv,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def write_config(path: Path, cfg: Any) -> None:
    from fewgen.utils import atomic_path

    with atomic_path(path / "config.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


class RunLog:
    """Prints a line and appends it to log.txt."""

    def __init__(self, path: Path | None, quiet: bool = False):
        self.path = path
        self.quiet = quiet

    def __call__(self, message: str) -> None:
        if not self.quiet:
            print(message, flush=True)
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(f"{time.strftime('%H:%M:%S')} {message}\n")


def write_metrics(path: Path, rows: list[dict], extra: dict | None = None) -> None:
    """``metrics.json``: the rows (without their in-memory ``_`` keys), the paired comparisons of
    rows that share their episodes, and ``extra``; each row's per-episode accuracies (percent) go to
    ``per_episode.npz`` as ``row<i>`` (i = the row's index in ``rows``)."""
    import numpy as np

    from fewgen.reports.tables import comparisons
    from fewgen.utils import atomic_path

    values = {f"row{i}": np.asarray(r["_values"], dtype=np.float64) for i, r in enumerate(rows) if "_values" in r}
    if values:
        with atomic_path(path / "per_episode.npz") as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **values)
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in rows]
    write_json(path / "metrics.json", {"rows": public, "comparisons": comparisons(rows), **(extra or {})})
