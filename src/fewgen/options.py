"""Config fields with their help and the values they admit, declared beside whatever reads them.

``opt`` makes a dataclass field; a method's options are a dataclass beside the method (e.g.
``DiffAlignOptions`` in ``fewgen/learners/diffalign.py``) that its config section inherits, so the
keys stay flat (``learner.w_mmd``) while each option is defined where it is used.
:func:`check_values` enforces every field's bounds and choices before a run writes anything.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import field
from typing import Any

from fewgen.errors import FewgenError

#: the largest value a count or size admits where its option declares no maximum of its own: an integer
#: option with a minimum is a count (steps, images, episodes, sizes); none of fewgen's is meaningful above it
COUNT_MAX = 1_000_000


def opt(default: Any, help: str, *, min: float | None = None, gt: float | None = None,  # noqa: A002
        max: float | None = None, choices: tuple | str | None = None, nonempty: bool = False,
        unique: bool = False) -> Any:
    """A dataclass field with a default (copied if mutable), help text and the values it admits.

    ``min`` / ``gt`` / ``max`` bound a number (each element of a list); ``choices`` is a tuple of
    values or the name of a vocabulary the runner resolves (a registry: ``"dataset"``, ...);
    ``nonempty`` asks a list for at least one element, ``unique`` for no repeated element. An integer
    with a minimum and no ``max`` is a count: at most :data:`COUNT_MAX`. ``None`` always passes where
    the type allows it. :func:`check_values` enforces them before a run writes anything.
    """
    meta = {"help": help, "min": min, "gt": gt, "max": max, "choices": choices, "nonempty": nonempty,
            "unique": unique}
    if isinstance(default, list | dict):
        return field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return field(default=default, metadata=meta)


def check_values(cfg: Any, vocabularies: dict[str, Any] | None = None, path: str = "") -> None:
    """Raise one clear :class:`FewgenError` for the first value outside what its field admits
    (``opt``'s bounds and choices). ``vocabularies`` maps a named choice (``"dataset"``) to the
    names it allows."""
    vocabularies = vocabularies or {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{path}{f.name}"
        if dataclasses.is_dataclass(value):
            check_values(value, vocabularies, f"{key}.")
            continue
        m = f.metadata
        if value is None:
            continue
        items = value if isinstance(value, list) else [value]
        if m.get("nonempty") and not items:
            raise FewgenError(f"config key '{key}' must list at least one value, got []")
        if m.get("unique"):
            repeated = sorted({str(v) for v in items if items.count(v) > 1})
            if repeated:
                raise FewgenError(f"config key '{key}' lists {', '.join(repeated)} more than once; give each value once "
                                  "(a repeated seed or setting would count the same episodes twice)")
        for v in items:
            number = isinstance(v, int | float) and not isinstance(v, bool)
            if (isinstance(v, int) and not isinstance(v, bool) and m.get("max") is None
                    and (m.get("min") is not None or m.get("gt") is not None) and v > COUNT_MAX):
                raise FewgenError(f"config key '{key}' must be at most {COUNT_MAX:,}, got {v:,}")
            if number and m.get("min") is not None and v < m["min"]:
                raise FewgenError(f"config key '{key}' must be at least {m['min']}, got {v}")
            if number and m.get("gt") is not None and v <= m["gt"]:
                raise FewgenError(f"config key '{key}' must be greater than {m['gt']}, got {v}")
            if number and m.get("max") is not None and v > m["max"]:
                raise FewgenError(f"config key '{key}' must be at most {m['max']}, got {v}")
            choices = m.get("choices")
            if choices is None:
                continue
            allowed = list(vocabularies[choices]) if isinstance(choices, str) else list(choices)
            if v not in allowed:
                close = difflib.get_close_matches(str(v), [str(a) for a in allowed], n=1)
                hint = f" Did you mean {close[0]!r}?" if close else ""
                what = f"{choices} " if isinstance(choices, str) else "value "
                raise FewgenError(f"config key '{key}': unknown {what}{v!r}.{hint} "
                                  f"Available: {', '.join(str(a) for a in allowed)}.")
