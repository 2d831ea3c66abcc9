"""Shared fixtures: the real data root and tiny, fast settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA_ROOT = Path(os.environ.get("FEWGEN_DATA") or REPO.parent / "shared" / "data")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def requires_data(*parts: str):
    """Skip unless ``<data root>/<parts...>`` exists (CI has ../shared/data beside the clone)."""
    path = DATA_ROOT.joinpath(*parts)
    return pytest.mark.skipif(not path.exists(), reason=f"real data not found at {path} (set FEWGEN_DATA)")


@pytest.fixture
def data_root() -> Path:
    return DATA_ROOT


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"
