"""The optional generative stack (diffusers, transformers, peft, accelerate, the MiniLM encoder).

``scripts/setup.sh`` installs the tested versions (``requirements-lock.txt``). Outside the lock a
package can be missing, or a pair can be incompatible (transformers 5.24 refuses peft below
0.22); :func:`check_generative_stack` turns either into one line that names the packages and the
fix, at the step that needs them, before anything is computed.
"""

from __future__ import annotations

import importlib.metadata as metadata

from fewgen.errors import FewgenError

#: the packages of the ``gen`` extra that the generator and DomainFusion steps import
GENERATIVE = ("diffusers", "transformers", "peft", "accelerate")

FIX = ("install the tested set: bash scripts/setup.sh, or "
       "pip install -c requirements-lock.txt -e '.[gen]' from the fewgen checkout")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _parse(version: str):
    from packaging.version import Version

    return Version(version)


def transformers_min_peft() -> str | None:
    """The lowest peft the installed transformers accepts (its own ``MIN_PEFT_VERSION``)."""
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:
        return None
    return MIN_PEFT_VERSION


def known_conflicts(versions: dict[str, str | None], min_peft: str | None = None) -> list[str]:
    """Incompatible pairs among the versions, each as a sentence (empty when compatible).
    ``min_peft``: transformers' floor on peft (default: read from the installed transformers)."""
    out = []
    tf, peft = versions.get("transformers"), versions.get("peft")
    if tf and peft:
        need = min_peft or transformers_min_peft()
        if need and _parse(peft) < _parse(need):
            out.append(f"transformers {tf} needs peft >= {need}, but peft {peft} is installed")
    return out


def check_generative_stack(step: str, versions: dict[str, str | None] | None = None,
                           min_peft: str | None = None) -> None:
    """Raise one clear :class:`FewgenError` if the packages ``step`` needs are missing or clash."""
    versions = versions if versions is not None else {n: _version(n) for n in GENERATIVE}
    missing = [n for n in GENERATIVE if not versions.get(n)]
    if missing:
        raise FewgenError(f"the {step} step needs {', '.join(missing)} (the gen extra), not installed; {FIX}")
    conflicts = known_conflicts(versions, min_peft)
    if conflicts:
        raise FewgenError(f"the {step} step cannot run: {'; '.join(conflicts)}; {FIX}")
