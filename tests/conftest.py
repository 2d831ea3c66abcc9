"""Shared fixtures: the real data root and tiny, fast settings."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the tests' base config (digits, pretraining and frozen evaluation); the demo preset is the README's job
DIGITS = str(Path(__file__).resolve().parent / "digits.yaml")
DATA_ROOT = Path(os.environ.get("FEWGEN_DATA") or REPO.parent / "shared" / "data")

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def requires_data(*parts: str):
    """Mark a test ``data`` and skip it unless ``<data root>/<parts...>`` exists (CI has
    ../shared/data beside the clone); ``pytest -m "not data"`` leaves them all out."""
    path = DATA_ROOT.joinpath(*parts)
    skip = pytest.mark.skipif(not path.exists(), reason=f"real data not found at {path} (set FEWGEN_DATA)")

    def mark(test):
        return pytest.mark.data(skip(test))

    return mark


@pytest.fixture
def data_root() -> Path:
    return DATA_ROOT


@pytest.fixture
def cache_dir(tmp_path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and do not stall when other work shares the cores
    (a module asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def digits():
    """The bundled digits (a module may define its own)."""
    from fewgen.data import load_dataset

    return load_dataset("digits")


@pytest.fixture(scope="module")
def digits_conv4():
    """A 16-channel Conv-4 fitted for a few steps on the base digits (features that separate classes a
    little), in eval mode: the frozen backbone the issue-27 generators are trained and steered through."""
    import torch
    import torch.nn.functional as F

    from fewgen.backbones import create_backbone
    from fewgen.data import load_dataset

    base = load_dataset("digits").base
    torch.manual_seed(0)
    net = create_backbone("conv4", in_chans=1, hidden=16, out_channels=16)
    head = torch.nn.Linear(16, base.num_classes)
    opt = torch.optim.Adam([*net.parameters(), *head.parameters()], 1e-2)
    x, y = base.float_images(), base.labels
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        idx = torch.randint(len(x), (64,), generator=g)
        loss = F.cross_entropy(head(net.forward_features(x[idx])), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval()
