"""DomainFusion: latent distillation and online img2img augmentation for domain generalization.

Paper: Yuyang Huang, Yabo Chen, Yuchen Liu, Xiaopeng Zhang, Wenrui Dai, Hongkai Xiong, Qi Tian.
"DomainFusion: Generalizing To Unseen Domains with Latent Diffusion Models", ECCV 2024.

One class-conditional diffusion model, trained once on the source domains and then frozen,
helps a classifier ``f_theta`` generalise to an unseen target domain in two ways.

**Latent distillation (LD).** The classifier's confidence in the true class scales its input,
the result is noised, and the frozen model predicts that noise conditioned on the true class::

    p      = softmax(f_theta(x))_y                       (confidence in the true class y)
    z_0    = E(p * x)                                    (E: the model's encoder; pixels -> [-1, 1] here,
                                                          the VAE for a latent diffusion model)
    z_t    = sqrt(abar_t) z_0 + sqrt(1 - abar_t) eps,    eps ~ N(0, I), t ~ U[t_min, t_max]
    L_LD   = || eps_phi(z_t, t, y) - eps ||^2            (phi frozen)
    L      = CE(f_theta(x), y) + lambda_LD * L_LD

Only ``p`` carries gradient, so ``L_LD`` reaches ``theta`` through the frozen denoiser and
never changes ``phi``. A doubtful classifier (small ``p``) hands the denoiser a darker image,
which it finds less plausible for class ``y`` and denoises worse; the classifier is pushed to
be confident exactly where the generator's class-conditional density agrees.

**Online lightweight augmentation.** A small synthetic set ``S`` (copies of M source images)
is refreshed every ``T`` epochs: each image ``s`` becomes ``N`` img2img candidates (noise to
strength ``s``, denoise conditioned on its class). With backbone feature maps ``F`` (C, H, W)::

    style(F)   = [mu_c(F), sigma_c(F)]_c                 (channel-wise mean and std, (2C,))
    content(F) = (F - mu(F)) / sigma(F)                  (instance-normalised map, (C*H*W,))
    score_n    = d_style(n) / mean d_style  -  w * d_content(n) / mean d_content

distances to the source (real) image of ``s``; the candidate with the highest score (style most
different, content closest) replaces ``s``. Every candidate counts as a generated image.

The frozen generator is anything with the :class:`DenoisingModel` interface;
``fewgen.generators.denoisers`` fits it to the pixel generator and to Stable Diffusion.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.errors import FewgenError
from fewgen.generators.denoisers import DenoisingModel
from fewgen.options import opt
from fewgen.utils import make_generator, seed_hash


@dataclass
class LatentDistillationOptions:
    """Latent distillation's options (``domainfusion.*`` keys)."""

    ld_weight: float = opt(1.0, "lambda of the latent distillation loss", min=0)
    ld_t_min: int = opt(50, "smallest timestep of latent distillation", min=0, max=999)
    ld_t_max: int = opt(400, "largest timestep of latent distillation", min=0, max=999)
    ld_batch: int = opt(16, "images of each batch that get the latent distillation term (cost control)", min=1)


def true_class_confidence(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """p_theta(y | x) of the true class, shape (B,), from logits (B, K) and labels (B,)."""
    return logits.softmax(1).gather(1, labels[:, None].long()).squeeze(1)


def latent_distillation_loss(model: DenoisingModel, images: torch.Tensor, labels: torch.Tensor,
                             logits: torch.Tensor, t_range: tuple[int, int],
                             generator: torch.Generator | None = None) -> torch.Tensor:
    """L_LD = ||eps_phi(z_t, t, y) - eps||^2 with z_0 = E(p_theta(y|x) * x).

    Args:
        model: the frozen denoiser (its parameters should not require grad).
        images: classifier inputs, float in [0, 1], shape (B, C, H, W).
        labels: true classes (B,).
        logits: the classifier's logits for ``images``, shape (B, K); gradient flows back through them.
        t_range: inclusive range [t_min, t_max] the timestep is drawn from.
        generator: CPU generator for t and eps (reproducible).
    Returns:
        scalar mean squared error over all elements.
    """
    t_min, t_max = t_range
    if not 0 <= t_min <= t_max < model.num_train_timesteps:
        raise FewgenError(f"latent distillation timesteps [{t_min}, {t_max}] must lie in "
                          f"[0, {model.num_train_timesteps - 1}] with t_min <= t_max")
    p = true_class_confidence(logits, labels)
    x0 = model.encode(images * p[:, None, None, None])
    b = x0.shape[0]
    t = torch.randint(t_min, t_max + 1, (b,), generator=generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0.device)
    eps_hat = model.predict_noise(model.add_noise(x0, noise, t), t, labels)
    return F.mse_loss(eps_hat, noise)


# ----------------------------------------------------------------------------- style / content


def style_content(maps: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Split feature maps (B, C, H, W) into style (B, 2C): channel means and stds, and content
    (B, C*H*W): the instance-normalised maps."""
    mu = maps.mean((2, 3), keepdim=True)
    sigma = (maps.var((2, 3), keepdim=True, unbiased=False) + eps).sqrt()
    style = torch.cat([mu.flatten(1), sigma.flatten(1)], 1)
    content = ((maps - mu) / sigma).flatten(1)
    return style, content


def select_candidates(source_style: torch.Tensor, source_content: torch.Tensor, cand_style: torch.Tensor,
                      cand_content: torch.Tensor, content_weight: float = 1.0) -> torch.Tensor:
    """Index (M,) of the best of N candidates for each of M source images.

    Args:
        source_style: (M, S); source_content: (M, D).
        cand_style: (M, N, S); cand_content: (M, N, D).
        content_weight: w in ``score = d_style / mean d_style - w * d_content / mean d_content``.
    """
    d_style = (cand_style - source_style[:, None]).norm(dim=2)  # (M, N)
    d_content = (cand_content - source_content[:, None]).norm(dim=2)
    # each distance divided by its mean over the whole refresh, so the two are unitless and comparable
    score = d_style / d_style.mean().clamp_min(1e-12) - content_weight * d_content / d_content.mean().clamp_min(1e-12)
    return score.argmax(1)


@torch.no_grad()
def image_style_content(backbone: nn.Module, images: torch.Tensor, level: int,
                        batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Style and content of uint8 images (n, C, H, W) from ``backbone.forward_maps(x)[level]``."""
    was = backbone.training
    backbone.eval()
    device = next(backbone.parameters()).device
    styles, contents = [], []
    for chunk in torch.split(images, batch_size):
        maps = backbone.forward_maps(chunk.to(device).float().div_(255.0))
        if not -len(maps) <= level < len(maps):
            raise FewgenError(f"feature level {level} does not exist: the backbone gives {len(maps)} maps")
        s, c = style_content(maps[level].float())
        styles.append(s.cpu())
        contents.append(c.cpu())
    backbone.train(was)
    return torch.cat(styles), torch.cat(contents)


# ----------------------------------------------------------------------------- augmentation


@dataclass
class OnlineAugmentationOptions:
    """Online augmentation's options (``domainfusion.*`` keys)."""

    aug_synthetic: int = opt(200, "size M of the online synthetic set (random source training images)", min=1)
    aug_every: int = opt(3, "refresh the synthetic set every T epochs", min=1)
    aug_candidates: int = opt(3, "img2img candidates N per synthetic image per refresh", min=1)
    aug_strength: float = opt(0.5, "img2img strength s (0: unchanged, 1: pure noise)", min=0, max=1)
    aug_feature_level: int = opt(1, "backbone block whose maps give style and content", min=0)
    aug_content_weight: float = opt(1.0, "weight of content closeness against style difference")


class OnlineAugmenter:
    """DomainFusion's online lightweight augmentation over a small synthetic set.

    Args:
        model: the frozen generator.
        images: uint8 source images the synthetic set starts from, shape (M, C, H, W).
        labels: their classes (M,).
        every: refresh every ``every`` epochs (epoch 0 included).
        candidates: N img2img candidates per image per refresh.
        strength, steps: img2img noise strength and sampler steps.
        feature_level: which ``forward_maps`` block gives style and content.
        content_weight: w of :func:`select_candidates`.
        seed: seeds every img2img call together with the round and candidate index.
    """

    def __init__(self, model: DenoisingModel, images: torch.Tensor, labels: torch.Tensor, every: int,
                 candidates: int, strength: float, steps: int, feature_level: int = 1,
                 content_weight: float = 1.0, seed: int = 0):
        if every < 1 or candidates < 1:
            raise FewgenError(f"augmentation needs every >= 1 and candidates >= 1, got {every} and {candidates}")
        self.model = model
        self.source_images = images.clone()
        self.images = images.clone()
        self.labels = labels.clone()
        self.every, self.candidates = every, candidates
        self.strength, self.steps = strength, steps
        self.feature_level, self.content_weight, self.seed = feature_level, content_weight, seed
        self.images_generated = 0
        self.rounds = 0

    @staticmethod
    def planned_images(epochs: int, every: int, synthetic: int, candidates: int) -> int:
        """Images an augmenter generates over ``epochs`` epochs (refreshes at 0, every, 2*every ...)."""
        return len(range(0, epochs, every)) * synthetic * candidates

    def maybe_refresh(self, epoch: int, backbone: nn.Module) -> bool:
        if epoch % self.every:
            return False
        self.refresh(backbone)
        return True

    def refresh(self, backbone: nn.Module) -> None:
        """Replace every synthetic image by its best img2img candidate."""
        m = len(self.images)
        cands = torch.stack([
            self.model.img2img(self.images, self.labels, self.strength, self.steps,
                               seed=seed_hash("domainfusion-online", self.seed, self.rounds, n))
            for n in range(self.candidates)
        ], 1)  # (M, N, C, H, W)
        self.images_generated += m * self.candidates
        src_style, src_content = image_style_content(backbone, self.source_images, self.feature_level)
        c_style, c_content = image_style_content(backbone, cands.flatten(0, 1), self.feature_level)
        pick = select_candidates(src_style, src_content, c_style.view(m, self.candidates, -1),
                                 c_content.view(m, self.candidates, -1), self.content_weight)
        self.images = cands[torch.arange(m), pick]
        self.rounds += 1


@dataclass
class SourceDiffusionOptions:
    """The pixel diffusion model DomainFusion trains on a target's source domains when no Stable
    Diffusion is given (the config section ``domainfusion.diffusion``): a class-token UNet without
    attention, at its own (smaller) side."""

    image_size: int = opt(16, "side the diffusion model works at (its 'latent' size; <= the image size)", min=4,
                          max=1024)
    block_out_channels: list[int] = opt([32, 64], "UNet channels per level", min=1, nonempty=True)
    steps: int = opt(1500, "diffusion training steps (once per target, on its source domains)", min=1)
    batch_size: int = opt(64, "diffusion training batch size", min=1)
    lr: float = opt(1e-3, "diffusion learning rate", gt=0)

    def model_config(self, channels: int):
        """The :class:`~fewgen.generators.diffusion.DiffusionConfig` of the model, for images of
        ``channels`` channels."""
        from fewgen.generators.diffusion import DiffusionConfig

        return DiffusionConfig(image_size=self.image_size, channels=channels,
                               block_out_channels=list(self.block_out_channels),
                               attention_levels=[False] * len(self.block_out_channels), cond_mode="class")


@dataclass
class OfflineOptions:
    """The offline baseline's option (``domainfusion.*`` keys)."""

    offline_factor: float = opt(2.0, "offline baseline images = factor x the images df-aug generates per run", min=0)


def offline_synthetic(model: DenoisingModel, images: torch.Tensor, labels: torch.Tensor, count: int,
                      strength: float, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The offline baseline: ``count`` img2img images of randomly drawn source images (uint8
    (n, C, H, W), labels (n,)), one candidate each, generated once before training."""
    idx = torch.randint(0, len(images), (count,), generator=make_generator("domainfusion-offline", seed))
    out = [model.img2img(images[c], labels[c], strength, steps, seed=seed_hash("domainfusion-offline", seed, i))
           for i, c in enumerate(torch.split(idx, 512))]
    return (torch.cat(out) if out else images[:0]), labels[idx]


# ----------------------------------------------------------------------------- generator adapter


