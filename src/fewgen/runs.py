"""Run directories: config.yaml, env.json, log.txt, metrics.json, checkpoints/, done."""

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


def format_table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A plain-text table of metrics rows (accuracy +- ci95 merged)."""
    if not rows:
        return "(no results)"
    columns = columns or [c for c in ("method", "classifier", "domain", "n_way", "n_shot") if any(c in r for r in rows)]
    generated = any(r.get("uses_synthetic") for r in rows)
    header = [*columns, *(["generated"] if generated else []), "accuracy", "episodes"]
    lines = []
    for r in rows:
        if r.get("accuracy") is None:  # rows without an accuracy (e.g. generative metrics rows)
            acc = "-"
        else:
            acc = f"{r['accuracy']:.2f} +- {r['ci95']:.2f}" if r.get("ci95") == r.get("ci95") else f"{r['accuracy']:.2f}"
        cells = [str(r.get(c, "")) for c in columns]
        if r.get("all_way") and "n_way" in columns:
            cells[columns.index("n_way")] = f"all ({r['n_way']})"
        if generated:
            cells.append("yes" if r.get("uses_synthetic") else "no")
        lines.append(cells + [acc, str(r.get("episodes", ""))])
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*header), fmt.format(*["-" * w for w in widths])]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(out)


def best_of_each_kind(rows: list[dict]) -> list[dict]:
    """Per setting (N-way K-shot, all-way K-shot), the best row that uses no generated images and the
    best that does (sweep rows left out), the gain and whether their 95% CIs are apart."""
    best: dict[tuple, dict[bool, dict]] = {}
    for r in rows:
        if r.get("accuracy") is None or r.get("sweep") or "domain" in r or "uses_synthetic" not in r:
            continue
        key = (bool(r.get("all_way")), r["n_way"], r["n_shot"])
        kinds = best.setdefault(key, {})
        gen = bool(r["uses_synthetic"])
        if gen not in kinds or r["accuracy"] > kinds[gen]["accuracy"]:
            kinds[gen] = r
    out = []
    for (all_way, n_way, n_shot), kinds in sorted(best.items()):
        real, gen = kinds.get(False), kinds.get(True)
        row = {"setting": f"{'all (' + str(n_way) + ')' if all_way else str(n_way)}-way {n_shot}-shot",
               "real": real, "generated": gen}
        if real and gen:
            row["gain"] = round(gen["accuracy"] - real["accuracy"], 3)
            lo_gen, hi_real = gen["accuracy"] - gen["ci95"], real["accuracy"] + real["ci95"]
            lo_real, hi_gen = real["accuracy"] - real["ci95"], gen["accuracy"] + gen["ci95"]
            row["cis_apart"] = bool(lo_gen > hi_real or lo_real > hi_gen)
        out.append(row)
    return out


def format_best(summary: list[dict]) -> str:
    """The :func:`best_of_each_kind` table as text."""
    if not any(s["real"] and s["generated"] for s in summary):
        return ""

    def cell(r: dict | None) -> str:
        if r is None:
            return "-"
        name = f"{r['method']} [{r['classifier']}]" if r.get("classifier") else r["method"]
        return f"{r['accuracy']:.2f} +- {r['ci95']:.2f} {name}"

    lines = [(s["setting"], cell(s["real"]), cell(s["generated"]),
              "" if "gain" not in s else f"{s['gain']:+.2f}{' (CIs apart)' if s['cis_apart'] else ''}")
             for s in summary]
    header = ("setting", "best without generated images", "best with generated images", "gain")
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(header)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths]), *(fmt.format(*x) for x in lines)])
