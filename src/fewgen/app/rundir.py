"""Run directories: config.yaml, env.json, log.txt, metrics.json, checkpoints/, done; built aside and
published when the run has finished."""

from __future__ import annotations

import dataclasses
import os
import platform
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
                    "transformers", "peft", "accelerate", "sentence-transformers")


def staging_dir(path: str | os.PathLike) -> Path:
    """Where a run into ``path`` is built: a hidden sibling, renamed into ``path`` when it finishes."""
    path = Path(path)
    return path.parent / f".{path.name}.incomplete"


def check_run_dir(path: Path, overwrite: bool) -> None:
    """Raise one clear error unless a run may be written to ``path``: absent or empty, an unfinished
    fewgen run (no ``done``), or, with ``overwrite``, a finished one. Also checks that the folder
    beside it can be written (the run is built there first)."""
    from fewgen.cache import check_writable_dir

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FewgenError(f"--out {path} is a file, not a folder; give a folder path for the run")
    if path.is_dir() and any(path.iterdir()):
        if not (path / "config.yaml").exists():
            raise FewgenError(f"{path} is not empty and holds no fewgen run (no config.yaml); refusing to replace it")
        if (path / "done").exists() and not overwrite:
            raise FewgenError(f"run directory {path} already exists; pass --overwrite to replace it or --out to choose another")
    check_writable_dir(path.parent if str(path.parent) else Path("."), "the folder of --out",
                       "choose a writable place with --out")


def prepare_staging(path: str | os.PathLike) -> Path:
    """A fresh staging folder for a run into ``path`` (an earlier interrupted attempt is cleared:
    what it computed lives in the cache)."""
    staging = staging_dir(path)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    (staging / "checkpoints").mkdir()
    return staging


def publish_run(staging: Path, path: str | os.PathLike) -> Path:
    """Move a finished staging folder to ``path``; an older run there is replaced only now."""
    path = Path(path)
    old = None
    if path.exists():
        old = path.parent / f".{path.name}.replaced"
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
    os.replace(staging, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return path


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
    write_json(path / "metrics.json", {"rows": rows, **(extra or {})})
