"""A content-addressed artifact store.

An entry's folder is named by the hash of the canonical config that produced it plus the
keys of its inputs (DomainBed names sweep folders by ``md5(args)``), holds ``key.json``
with those parts, and is complete only once its ``done`` marker exists. Files inside are
written under temporary names and renamed into place, so a killed step leaves either a
finished file or none, and the next run resumes or redoes it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fewgen.utils import atomic_path, canonical_json, stable_hash, write_json


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWGEN_CACHE") or Path.home() / ".cache" / "fewgen").expanduser()


class ArtifactCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def key(self, parts: dict[str, Any]) -> str:
        return stable_hash(parts)

    def path(self, kind: str, parts: dict[str, Any]) -> Path:
        return self.root / kind / self.key(parts)

    def entry(self, kind: str, parts: dict[str, Any]) -> Path:
        """The folder for ``parts`` (created, with ``key.json``)."""
        path = self.path(kind, parts)
        path.mkdir(parents=True, exist_ok=True)
        key_file = path / "key.json"
        if not key_file.exists() or key_file.read_text().strip() != canonical_json(parts):
            with atomic_path(key_file) as tmp:  # a unique temporary name: several processes may get here at once
                tmp.write_text(canonical_json(parts))
        return path

    @staticmethod
    def is_done(entry: Path) -> bool:
        return (entry / "done").exists()

    @staticmethod
    def mark_done(entry: Path, info: dict[str, Any] | None = None) -> None:
        write_json(entry / "done", info or {})
