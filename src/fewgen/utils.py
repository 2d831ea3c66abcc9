"""Seeds, hashes and atomic file writes shared by every stage."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
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


def content_digest(*parts: Any, length: int = 16) -> str:
    """The content key of tensors, arrays, bytes, dicts of those and JSON-able values: sha256 over
    each part's type, dtype, shape and bytes (tensors, arrays, bytes), its sorted keys and values
    (dicts holding tensors, arrays or bytes) or canonical JSON (anything else), in order.

    The one content hash for data in cache keys: images and labels of a dataset, trained weights
    (a state dict), weight files.
    """
    h = hashlib.sha256()
    for part in parts:
        _digest_into(h, part)
    return h.hexdigest()[:length]


def _digest_into(h, part: Any) -> None:
    if isinstance(part, torch.Tensor):
        t = part.detach().cpu().contiguous()
        if t.dtype in (torch.bfloat16, torch.float16):  # numpy has no bfloat16: hash the raw bits
            t = t.view(torch.int16)
        h.update(f"tensor:{part.dtype}:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes())
    elif isinstance(part, np.ndarray):
        a = np.ascontiguousarray(part)
        h.update(f"array:{a.dtype}:{a.shape}:".encode())
        h.update(a.tobytes())
    elif isinstance(part, bytes | bytearray):
        h.update(f"bytes:{len(part)}:".encode())
        h.update(part)
    elif isinstance(part, dict) and any(isinstance(v, torch.Tensor | np.ndarray | bytes | bytearray)
                                        for v in part.values()):
        h.update(f"dict:{len(part)}:".encode())
        for k in sorted(part):
            h.update(f"key:{canonical_json(k)}:".encode())
            _digest_into(h, part[k])
    else:
        h.update(f"json:{canonical_json(part)}:".encode())


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


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def path_digest(path: str | os.PathLike) -> str:
    """Content key of a file, or of a folder (every file's relative name and sha256), for models a
    user points to by path (Stable Diffusion folders, checkpoints): the key follows the bytes, so
    other weights at the same path are never mistaken for the old ones. Each file's hash is
    remembered for the process by (path, size, modification time)."""
    path = Path(path)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        memo = (str(f.resolve()), st.st_size, st.st_mtime_ns)
        if memo not in _FILE_DIGESTS:
            _FILE_DIGESTS[memo] = sha256_file(f)
        h.update(f"{f.relative_to(path).as_posix() if f != path else f.name}:{_FILE_DIGESTS[memo]}\n".encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds.

    A crash or kill leaves the old file (or none), never a half-written one. The temporary name is
    unique (several processes may write the same file) and is created with the umask's usual
    permissions, not mkstemp's owner-only ones, so run folders stay readable to others.
    """
    import uuid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp_path = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
    os.close(os.open(tmp_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
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


def launched_processes() -> bool:
    """Whether a distributed launcher started this process (``accelerate launch``, ``torchrun``:
    ``WORLD_SIZE`` above 1 or ``LOCAL_RANK`` set)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or "LOCAL_RANK" in os.environ


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device of a ``device`` setting: ``auto`` is CUDA when there is one, else CPU.

    Under a distributed launcher with CUDA, ``auto`` and a bare ``cuda`` mean this process's own GPU
    (accelerate's ``PartialState().device``, ``cuda:<LOCAL_RANK>``, also made the current device), so
    every process does not pile onto cuda:0; an explicit ``cuda:N`` is kept as given, and CPU runs are
    unchanged.
    """
    if name in ("auto", "cuda") and torch.cuda.is_available():
        if launched_processes():
            try:  # accelerate's state: the process group synthesis/sharding.py uses too
                from accelerate import PartialState
            except ImportError:  # a core install without the gen extra: the launcher's local rank
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(device)
                return device
            return PartialState().device
        return torch.device("cuda")
    if name == "auto":
        return torch.device("cpu")
    return torch.device(name)


def is_main_process() -> bool:
    """Whether this is the main process of a launch (global rank 0; always, without a launcher):
    the one that logs and writes the run's files."""
    return int(os.environ.get("RANK", "0")) == 0


def memory_bytes() -> int | None:
    """This machine's physical memory in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(need: float, what: str, fix: str, share: float = 0.5) -> None:
    """One clear error before allocating ``need`` bytes for ``what`` when that exceeds ``share`` of the
    machine's memory (the rest is the models', the features' and the OS's)."""
    from fewgen.errors import FewgenError

    total = memory_bytes()
    if total is not None and need > share * total:
        raise FewgenError(f"{what} needs about {need / 2**30:,.1f} GiB of memory, more than {share:.0%} of this "
                          f"machine's {total / 2**30:,.1f} GiB; {fix}")
