"""What the pixel diffusion models (``diffusion.py``, ``exemplar.py``) share: the UNet shape check,
the DDPM noise schedule and the samplers, pixel <-> model space, per-image noise, the sampling
precision, classifier-free guidance and the result of a training run."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fewgen.data.images import signed_to_uint8
from fewgen.errors import FewgenError
from fewgen.options import opt

#: ``dpmsolver++``: DPM-Solver++ (2M) on time-uniform steps, the default; ``dpmsolver++-logsnr``:
#: the same on steps uniform in log-SNR (Lu et al. 2022's choice for pixel-space models);
#: ``dpmsolver++-full``: time-uniform steps over the full noise range (no lambda clipping near t = T)
SAMPLERS = ("ddim", "dpmsolver++", "dpmsolver++-logsnr", "dpmsolver++-full")
PRECISIONS = ("float32", "bfloat16", "float16")


def check_unet_shape(image_size: int, block_out_channels: list[int], attention_levels: list[bool]) -> None:
    """One attention flag per UNet level, and an image size each level can halve."""
    if len(attention_levels) != len(block_out_channels):
        raise FewgenError(f"attention_levels has {len(attention_levels)} entries but block_out_channels "
                          f"has {len(block_out_channels)}; give one per level")
    down = 2 ** (len(block_out_channels) - 1)
    if image_size % down:
        raise FewgenError(f"image_size {image_size} is not divisible by {down} "
                          f"({len(block_out_channels)} UNet levels); use fewer levels or resize")


def build_noise_scheduler(cfg):
    """The DDPM training schedule of a pixel model config (``num_train_timesteps``, ``beta_schedule``)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_schedule=cfg.beta_schedule,
                         clip_sample=True, prediction_type="epsilon")


def build_sampler(noise_scheduler, sampler: str):
    """A fresh inference scheduler sharing the training noise schedule."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    if sampler == "ddim":
        # no clip_sample: DDIM recomputes eps from the clipped x0, and with the cosine schedule the
        # early (high-noise) clips saturate strokes
        return DDIMScheduler.from_config(noise_scheduler.config, clip_sample=False)
    if sampler in SAMPLERS[1:]:
        # pixel space: the data prediction is clipped to [-1, 1] (as DDIM's clip_sample); the
        # default clips lambda near t = T, where the cosine schedule's alpha_bar -> 0 (diffusers'
        # advice for cosine schedules); "-full" does not; "-logsnr" spaces steps uniformly in log-SNR
        return DPMSolverMultistepScheduler.from_config(noise_scheduler.config, algorithm_type="dpmsolver++",
                                                       solver_order=2, thresholding=True, sample_max_value=1.0,
                                                       lambda_min_clipped=-float("inf") if sampler.endswith("full")
                                                       else -5.1,
                                                       use_lu_lambdas=sampler == "dpmsolver++-logsnr")
    raise FewgenError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")


def to_model_space(images: torch.Tensor) -> torch.Tensor:
    """uint8 (n, C, H, W) -> float in [-1, 1]."""
    return images.float() / 127.5 - 1.0


to_uint8 = signed_to_uint8  # float in [-1, 1] -> uint8 (fewgen.data.images)


def guided_noise(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, guidance: float) -> torch.Tensor:
    """Classifier-free guidance: eps_u + w (eps_c - eps_u); w = 1 is the plain conditional model."""
    return eps_uncond + guidance * (eps_cond - eps_uncond)


def autocast(device: torch.device, precision: str):
    """The context the UNet runs in while sampling: ``float32`` (exact, the default), or
    ``bfloat16`` / ``float16`` autocast (matmuls and convolutions in half precision; the sampler's
    state stays float32). ``bfloat16`` is faster on CPUs with native bf16 (AVX512-BF16,
    AMX); ``float16`` needs a GPU."""
    import contextlib

    if precision not in PRECISIONS:
        raise FewgenError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "float32":
        return contextlib.nullcontext()
    if precision == "float16" and device.type != "cuda":
        raise FewgenError("precision float16 needs a GPU; use bfloat16 on CPU")
    return torch.autocast(device.type, dtype=getattr(torch, precision))


def per_image_noise(seeds: Sequence[int], shape: tuple[int, int, int]) -> torch.Tensor:
    """Initial noise, one generator per image, shape (len(seeds), *shape): an image's noise depends
    only on its own seed, so a set can be generated in any order or on any number of processes."""
    out = torch.empty(len(seeds), *shape)
    for i, s in enumerate(seeds):
        g = torch.Generator().manual_seed(int(s))
        out[i] = torch.randn(shape, generator=g)
    return out


@dataclass
class PixelUNetConfig:
    """What both pixel UNets save with themselves (``generator.json``), made from their options and
    the images' shape: the UNet's shape and its noise schedule."""

    image_size: int = 28
    channels: int = 1
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    attention_levels: list[bool] = field(default_factory=lambda: [False, False, True])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    attention_head_dim: int = 8
    cond_dim: int = 64
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    p_uncond: float = 0.1

    def __post_init__(self) -> None:
        check_unet_shape(self.image_size, self.block_out_channels, self.attention_levels)


def build_conditional_unet(cfg: PixelUNetConfig, in_channels: int, pooled_dim: int):
    """The diffusers ``UNet2DConditionModel`` of both pixel generators: cross-attention on condition
    tokens of width ``cond_dim`` at the levels ``attention_levels`` marks, and a pooled condition
    (``pooled_dim`` wide) projected into the time embedding."""
    from diffusers import UNet2DConditionModel

    down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention_levels)
    up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cfg.attention_levels))
    return UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=in_channels, out_channels=cfg.channels, down_block_types=down,
        up_block_types=up, block_out_channels=tuple(cfg.block_out_channels), layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, cross_attention_dim=cfg.cond_dim,
        attention_head_dim=cfg.attention_head_dim, class_embed_type="projection",
        projection_class_embeddings_input_dim=pooled_dim,
    )


def save_modules(folder: str | Path, modules: dict, meta: dict | None, info: dict) -> None:
    """``generator.safetensors`` (every module's state under its name) and ``generator.json`` (``info``)."""
    from fewgen.checkpoint import save_tensors
    from fewgen.utils import write_json

    folder = Path(folder)
    tensors = {f"{name}.{k}": v for name, m in modules.items() for k, v in m.state_dict().items()}
    save_tensors(folder / "generator.safetensors", tensors, meta)
    write_json(folder / "generator.json", info)


def load_modules(modules: dict, tensors: dict) -> None:
    """Each module's state from the tensors under its name (as :func:`save_modules` wrote them); eval mode."""
    for name, m in modules.items():
        m.load_state_dict({k[len(name) + 1:]: v for k, v in tensors.items() if k.startswith(name + ".")})
        m.eval()


@dataclass
class PixelUNetOptions:
    """What the options of both pixel generators hold (``generator.diffusion``, ``generator.exemplar``):
    the UNet's shape and its training on the base classes."""

    block_out_channels: list[int] = opt([32, 64, 64], "UNet channels per level (each level after the first halves "
                                        "the size)", min=1, nonempty=True)
    attention_levels: list[bool] = opt([False, False, True], "cross-attention blocks per UNet level (one per entry of "
                                       "block_out_channels)")
    cond_dim: int = opt(64, "condition token width (cross-attention dim)", min=1)
    train_steps: int = opt(1500, "DDPM training steps on the base classes", min=1)
    batch_size: int = opt(48, "base training batch size", min=1)
    lr: float = opt(1e-3, "base training peak learning rate (AdamW, warmup + cosine)", gt=0)
    seed: int = opt(0, "seed of base training (the adapters': generator.datadream.seed)")

    def fit_arguments(self) -> dict:
        """The arguments of the generator's ``fit`` that these options set."""
        return {"steps": self.train_steps, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed}

    def check_shape(self, image_size: int, section: str) -> None:
        """One attention flag per UNet level, and images of side ``image_size`` that each level can
        halve; errors name the options as ``<section>.<field>``."""
        levels = len(self.block_out_channels)
        if len(self.attention_levels) != levels:
            raise FewgenError(f"{section}.attention_levels has {len(self.attention_levels)} entries but "
                              f"{section}.block_out_channels has {levels}; give one per UNet level")
        down = 2 ** (levels - 1)
        if image_size % down:
            raise FewgenError(f"the {image_size}px images cannot be halved by {levels} UNet levels "
                              f"({section}.block_out_channels); use images whose side is divisible by {down} "
                              "(data.image_size), or fewer levels")


@dataclass
class FitResult:
    steps: int
    losses: list[float]
    seconds: float
    images_per_s: float
