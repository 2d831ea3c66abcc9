"""A content-addressed artifact store.

An entry's folder is named by the hash of the parts that produced it (``fewgen.keys`` derives
them from the config and the inputs' keys; DomainBed names sweep folders by ``md5(args)``),
holds ``key.json`` with those parts, and is complete only once its ``done`` marker exists.
Files inside are written under temporary names and renamed into place, so a killed step leaves
either a finished file or none, and the next run resumes or redoes it.

``done`` records the sha256 of every file of the entry. :meth:`ArtifactCache.ready` checks them
before an entry is used: a missing, changed or unreadable file is reported in one line and the
entry is cleared, so the caller rebuilds it instead of loading damaged weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from fewgen.errors import FewgenError
from fewgen.utils import atomic_path, canonical_json, sha256_file, stable_hash, write_json

T = TypeVar("T")

#: files of an entry that ``done`` does not checksum: the key, the marker itself
_UNRECORDED = ("key.json", "done")


def default_cache_dir() -> Path:
    return Path(os.environ.get("FEWGEN_CACHE") or Path.home() / ".cache" / "fewgen").expanduser()


def check_writable_dir(path: Path, what: str, fix: str) -> None:
    """Prove that ``path`` is, or can be made, a folder files can be written in, or raise one clear
    error. Creates nothing: a file is written and removed in the nearest folder that exists."""
    path = Path(path).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise FewgenError(f"{what} {path} is a file, not a folder; {fix}")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise FewgenError(f"{what} {path} cannot be made: {existing} is a file; {fix}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".fewgen-write-test-", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise FewgenError(f"{what} {path} is not writable ({e.strerror or e}); {fix}") from None


class ArtifactCache:
    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root).expanduser() if root else default_cache_dir()

    def check_writable(self) -> None:
        check_writable_dir(self.root, "cache folder", "set cache_dir=<folder> or FEWGEN_CACHE to a writable folder")

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
        """Whether the entry was marked done (its files are checked by :meth:`ready`)."""
        return (entry / "done").exists()

    @staticmethod
    def files(entry: Path) -> list[str]:
        """The entry's files, relative and sorted, without the key, the marker and temporary files."""
        out = []
        for p in entry.rglob("*"):
            rel = p.relative_to(entry).as_posix()
            if p.is_file() and rel not in _UNRECORDED and not p.name.endswith(".tmp"):
                out.append(rel)
        return sorted(out)

    @classmethod
    def mark_done(cls, entry: Path, info: dict[str, Any] | None = None, files: Iterable[str] | None = None) -> None:
        """Mark the entry complete, recording the sha256 of ``files`` (default: all of its files)."""
        names = sorted(files) if files is not None else cls.files(entry)
        write_json(entry / "done", {"info": info or {}, "files": {f: sha256_file(entry / f) for f in names}})

    @staticmethod
    def done_info(entry: Path) -> dict[str, Any]:
        """What was recorded with the marker (``info`` of :meth:`mark_done`)."""
        try:
            return json.loads((entry / "done").read_text()).get("info", {})
        except (OSError, ValueError, AttributeError):
            return {}

    def problem(self, entry: Path) -> str | None:
        """Why a done entry cannot be trusted (a missing, changed or unreadable file), or None."""
        try:
            record = json.loads((entry / "done").read_text())
            files = record["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return "its done marker is unreadable or has no checksums"
        for name, digest in files.items():
            path = entry / name
            if not path.is_file():
                return f"{name} is missing"
            try:
                if sha256_file(path) != digest:
                    return f"{name} does not match the checksum recorded when it was made (corrupt or changed)"
            except OSError as e:
                return f"{name} cannot be read ({e.strerror or e})"
        return None

    def build_or_load(self, kind: str, parts: dict[str, Any], build: Callable[[Path], T | None],
                      load: Callable[[Path], T], log: Callable[[str], None] | None = None,
                      what: str | None = None) -> T:
        """The artifact of ``kind`` for ``parts``: ``load(entry)`` when the entry is done and intact
        (with ``what``, a line ``"<what> from cache <entry>"`` in ``log``), else ``build(entry)``,
        which writes the entry's files and marks it done (:meth:`mark_done`). What ``build`` returns
        is the artifact (the model as training left it); when it returns None, ``load(entry)`` is.
        A damaged entry is reported in ``log`` and rebuilt (:meth:`ready`)."""
        entry = self.entry(kind, parts)
        if self.ready(entry, log):
            if log is not None and what is not None:
                log(f"{what} from cache {entry}")
            return load(entry)
        built = build(entry)
        return load(entry) if built is None else built

    def ready(self, entry: Path, log: Callable[[str], None] | None = None) -> bool:
        """True if the entry is done and intact. A done entry that is not intact is reported in one
        line and cleared (all but ``key.json``), and False is returned: the caller rebuilds it."""
        if not self.is_done(entry):
            return False
        why = self.problem(entry)
        if why is None:
            return True
        if log is not None:
            log(f"cache entry {entry}: {why}; rebuilding it")
        self.clear(entry)
        return False

    @staticmethod
    def clear(entry: Path) -> None:
        """Remove everything in the entry but ``key.json`` (the marker first)."""
        (entry / "done").unlink(missing_ok=True)
        for p in entry.iterdir():
            if p.name == "key.json":
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)  # another process may be clearing it too
            else:
                p.unlink(missing_ok=True)
