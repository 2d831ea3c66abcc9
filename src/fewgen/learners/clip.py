"""DataDream's classifier: CLIP fine-tuned with LoRA on both towers (Kim et al. 2024,
"DataDream: Few-shot Guided Dataset Generation", Sec. 3.3, following DISEF, da Costa et al. 2023).

The logits of an image x over classes c are

    logits_c = s * cos(E_img(x), E_txt(prompt_c) + r_c)

with E_img / E_txt the CLIP image and text towers (projected embeddings) carrying LoRA
adapters of rank 16 on every attention projection (q, k, v, out), ``r_c`` a learned
residual that starts at zero (so the head starts exactly at the zero-shot text classifier
of the class prompts) and ``s`` CLIP's logit scale. Training follows DataDream's loss
(:mod:`fewgen.learners.datadream_classifier`) through the shared loop (:mod:`fewgen.learners.finetune`).

Loads a local pretrained model (e.g. ViT-B/16) with ``from_pretrained``; tests build a tiny
random ``CLIPConfig`` in-process. Only the LoRA weights and the head are saved
(``save_lora``, safetensors).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.images import resize

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _embeds(out) -> torch.Tensor:
    """transformers 4.x returns a tensor from ``get_*_features``; 5.x an output with ``pooler_output``."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class TextHead(nn.Module):
    """Cosine logits against the (LoRA-adapted) text embeddings of the class prompts plus a
    zero-initialised residual; ``text_fn`` recomputes the text embeddings (C, D)."""

    def __init__(self, text_fn, n_classes: int, dim: int, scale: float):
        super().__init__()
        object.__setattr__(self, "_text_fn", text_fn)  # not a submodule: the towers belong to the classifier
        self.residual = nn.Parameter(torch.zeros(n_classes, dim))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def class_weights(self) -> torch.Tensor:
        return self._text_fn() + self.residual

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, D) -> logits (B, C)."""
        w = F.normalize(self.class_weights(), dim=-1)
        return self.scale * F.normalize(features, dim=-1) @ w.t()


def load_clip(path: str | Path):
    """A ``CLIPModel``, its tokenizer and its image processor's steps (None without a
    preprocessor_config.json) from a local folder or a hub id; one clear error otherwise."""
    from transformers import AutoTokenizer, CLIPModel

    from fewgen.errors import FewgenError

    try:
        model = CLIPModel.from_pretrained(str(path), use_safetensors=True)
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise FewgenError(f"cannot load a CLIP model with its text tower from {str(path)!r} "
                          f"({str(e).splitlines()[0]}); give learner.clip_path (or backbone.model) a local CLIPModel folder "
                          "holding config.json, weights and tokenizer files") from None
    prep = None
    if Path(path).is_dir() and (Path(path) / "preprocessor_config.json").is_file():
        from fewgen.backbones.pretrained import read_preprocessing

        prep = read_preprocessing(Path(path))
    return model, tokenizer, prep


@torch.no_grad()
def zero_shot_weights(path: str | Path, class_names: list[str], prompt: str = "a photo of a {}.") -> torch.Tensor:
    """CLIP's zero-shot classifier: the L2-normalised projected text embeddings (C, D) of
    ``prompt.format(name)`` for each class (underscores read as spaces), in the space of the
    ``clip`` backbone's image features."""
    model, tokenizer, _ = load_clip(path)
    tokens = tokenizer([prompt.format(n.replace("_", " ")) for n in class_names], padding=True, truncation=True,
                       return_tensors="pt")
    text = _embeds(model.eval().get_text_features(input_ids=tokens["input_ids"],
                                                  attention_mask=tokens["attention_mask"]))
    return F.normalize(text.float(), dim=-1)


class CLIPClassifier(nn.Module):
    """CLIP + LoRA (both towers) + text-initialised head, with the fewgen learner interface:
    ``forward_features(x)`` on float images in [0, 1] of any size and channel count,
    ``head(features)``, ``param_groups(lr_backbone, lr_head)``.

    Args:
        clip_model: a transformers ``CLIPModel`` (pretrained or random).
        tokenizer: its tokenizer (called on the class prompts once).
        class_names: one name per class; the prompt is ``prompt.format(name)``.
        rank: LoRA rank (DataDream: 16); ``alpha`` defaults to the rank.
    """

    def __init__(self, clip_model, tokenizer, class_names: list[str], rank: int = 16, alpha: float | None = None,
                 prompt: str = "a photo of a {}.", dropout: float = 0.0):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        for p in clip_model.parameters():
            p.requires_grad_(False)
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=dropout, target_modules=list(LORA_TARGETS))
        self.clip = get_peft_model(clip_model, config)
        self.class_names = list(class_names)
        tokens = tokenizer([prompt.format(n.replace("_", " ")) for n in class_names], padding=True,
                           truncation=True, return_tensors="pt")
        self.register_buffer("input_ids", tokens["input_ids"], persistent=False)
        self.register_buffer("attention_mask", tokens["attention_mask"], persistent=False)
        self.register_buffer("mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.image_size = int(clip_model.config.vision_config.image_size)
        dim = int(clip_model.config.projection_dim)
        scale = float(clip_model.logit_scale.detach().exp().clamp(max=100))
        self.head = TextHead(self.text_embeddings, len(class_names), dim, scale)
        self.num_features = dim

    @classmethod
    def from_pretrained(cls, path: str | Path, class_names: list[str], rank: int = 16,
                        prompt: str = "a photo of a {}.", **kwargs) -> CLIPClassifier:
        """Load CLIP and its tokenizer from a local folder (or a hub id when online)."""


        model, tokenizer, prep = load_clip(path)
        out = cls(model, tokenizer, class_names, rank=rank, prompt=prompt, **kwargs)
        out.preprocessing = prep
        return out

    def text_embeddings(self) -> torch.Tensor:
        """Projected text embeddings of the class prompts, shape (C, D)."""
        return _embeds(self.clip.get_text_features(input_ids=self.input_ids, attention_mask=self.attention_mask))

    #: the model's image processor steps (:mod:`fewgen.backbones.pretrained`) when its folder has a
    #: preprocessor_config.json; else a plain bicubic resize to the vision tower's size
    preprocessing = None

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Float images (B, 1 or 3, H, W) in [0, 1] -> CLIP pixel values (B, 3, S, S): as the model's
        image processor makes them (shorter side, centre crop, normalisation; the frozen ``clip``
        backbone's :func:`~fewgen.backbones.pretrained.preprocess`) when the model has one."""
        if self.preprocessing is not None:
            from fewgen.backbones.pretrained import preprocess

            return preprocess(x, self.preprocessing).to(x.device)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = resize(x, self.image_size, mode="bicubic")
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: images (B, C, H, W) in [0, 1] -> image embeddings (B, D)."""
        return _embeds(self.clip.get_image_features(pixel_values=self.preprocess(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))

    def param_groups(self, lr_backbone: float, lr_head: float) -> list[dict]:
        lora = [p for n, p in self.clip.named_parameters() if p.requires_grad and "lora_" in n]
        return [{"params": lora, "lr": lr_backbone}, {"params": list(self.head.parameters()), "lr": lr_head}]

    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained weights only: LoRA matrices of both towers and the head residual."""
        from peft import get_peft_model_state_dict

        state = {f"lora.{k}": v.detach().cpu() for k, v in get_peft_model_state_dict(self.clip).items()}
        state["head.residual"] = self.head.residual.detach().cpu()
        return state

    def save_lora(self, path: str | Path, meta: dict | None = None) -> None:
        """Write :meth:`lora_state_dict` as safetensors (plus class names and rank in the metadata)."""
        from fewgen.checkpoint import save_tensors

        save_tensors(path, self.lora_state_dict(),
                     {"class_names": self.class_names, "rank": self.clip.peft_config["default"].r, **(meta or {})})

    def load_lora(self, path: str | Path) -> dict:
        from peft import set_peft_model_state_dict

        from fewgen.checkpoint import load_tensors

        tensors, meta = load_tensors(path)
        set_peft_model_state_dict(self.clip, {k[5:]: v for k, v in tensors.items() if k.startswith("lora.")})
        with torch.no_grad():
            self.head.residual.copy_(tensors["head.residual"])
        return meta
