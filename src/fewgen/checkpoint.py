"""Checkpoints as safetensors: model weights, and resumable training state.

Optimizer and scheduler state are split into tensors (stored as tensors) and everything
else (stored as JSON in the safetensors metadata). Nothing is ever unpickled.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from fewgen.errors import FewgenError
from fewgen.utils import atomic_path


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"fewgen": json.dumps(meta or {})})


def load_tensors(path: str | Path, fix: str = "delete it to retrain") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the fewgen metadata of a safetensors file; an unreadable one is a FewgenError
    ending with ``fix`` (a cache's file can be rebuilt; a file someone handed over cannot)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("fewgen", "{}"))
        return load_file(str(path)), meta
    except (SafetensorError, OSError, json.JSONDecodeError, ValueError) as e:
        raise FewgenError(f"cannot read checkpoint {path} ({e}); {fix}") from None


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any] | None = None) -> None:
    save_tensors(path, model.state_dict(), meta)


def load_model(path: str | Path, model: nn.Module, strict: bool = True) -> dict[str, Any]:
    tensors, meta = load_tensors(path)
    model.load_state_dict(tensors, strict=strict)
    return meta


def _split_state(prefix: str, state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace tensors inside a nested state by placeholders, collecting them in ``tensors``."""
    if isinstance(state, torch.Tensor):
        key = f"{prefix}"
        tensors[key] = state
        return {"__tensor__": key}
    if isinstance(state, dict):
        return {str(k): _split_state(f"{prefix}.{k}", v, tensors) for k, v in state.items()}
    if isinstance(state, list | tuple):
        return [_split_state(f"{prefix}.{i}", v, tensors) for i, v in enumerate(state)]
    return state


def _join_state(state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(state, dict):
        if set(state) == {"__tensor__"}:
            return tensors[state["__tensor__"]]
        return {k: _join_state(v, tensors) for k, v in state.items()}
    if isinstance(state, list):
        return [_join_state(v, tensors) for v in state]
    return state


def _int_keys(state: dict) -> dict:
    # optimizer.state_dict()["state"] is keyed by int parameter ids; JSON made them strings
    return {int(k): v for k, v in state.items()}


def save_training_state(path: str | Path, modules: dict[str, nn.Module], optimizer=None, scheduler=None,
                        extra: dict[str, Any] | None = None,
                        optimizers: dict[str, torch.optim.Optimizer] | None = None) -> None:
    """Save everything needed to resume: module weights, the optimizer (or several, by name, as a
    GAN's G and D optimizers), the scheduler and counters."""
    tensors: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        for k, v in m.state_dict().items():
            tensors[f"model.{name}.{k}"] = v
    meta: dict[str, Any] = {"extra": extra or {}}
    if optimizer is not None:
        meta["optimizer"] = _split_state("optim", optimizer.state_dict(), tensors)
    if optimizers:
        meta["optimizers"] = {n: _split_state(f"optim.{n}", o.state_dict(), tensors) for n, o in optimizers.items()}
    if scheduler is not None:
        meta["scheduler"] = _split_state("sched", scheduler.state_dict(), tensors)
    save_tensors(path, tensors, meta)


def load_training_state(path: str | Path, modules: dict[str, nn.Module], optimizer=None, scheduler=None,
                        optimizers: dict[str, torch.optim.Optimizer] | None = None) -> dict:
    """Restore what :func:`save_training_state` saved into ``modules`` and the optimizers; returns
    the counters (``extra``)."""
    tensors, meta = load_tensors(path)
    for name, m in modules.items():
        prefix = f"model.{name}."
        m.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
    if optimizer is not None and "optimizer" in meta:
        st = _join_state(meta["optimizer"], tensors)
        st["state"] = _int_keys(st["state"])
        optimizer.load_state_dict(st)
    for name, opt in (optimizers or {}).items():
        st = _join_state(meta["optimizers"][name], tensors)
        st["state"] = _int_keys(st["state"])
        opt.load_state_dict(st)
    if scheduler is not None and "scheduler" in meta:
        scheduler.load_state_dict(_join_state(meta["scheduler"], tensors))
    return meta.get("extra", {})
