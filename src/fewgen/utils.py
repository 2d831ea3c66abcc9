"""Seeds, hashes and atomic file writes shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch global generators (samplers get their own Generator)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def canonical_json(obj: Any) -> str:
    """JSON with sorted keys and no whitespace: the text content keys are hashed from."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of the canonical JSON of ``obj`` (a content key)."""
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()[:length]


def seed_hash(*parts: Any) -> int:
    """A derived seed from names and numbers, never from global state (DomainBed ``seed_hash``)."""
    return int(hashlib.md5(canonical_json(parts).encode()).hexdigest()[:8], 16)


def make_generator(*parts: Any) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded by :func:`seed_hash` of ``parts``."""
    g = torch.Generator()
    g.manual_seed(seed_hash(*parts))
    return g


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash or kill leaves the old file (or none), never a half-written one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    from fewgen.errors import FewgenError

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise FewgenError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); delete it and rerun to rebuild it"
        ) from None


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
