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
:class:`PixelDiffusionAdapter` fits it to ``fewgen.generators.diffusion.DiffusionGenerator``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.errors import FewgenError
from fewgen.utils import make_generator, seed_hash


@runtime_checkable
class DenoisingModel(Protocol):
    """What DomainFusion needs from a frozen class-conditional diffusion model."""

    num_train_timesteps: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Float images in [0, 1], shape (B, C, H, W) -> model space (B, C', H', W'); differentiable."""

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The forward process q(x_t | x_0): sqrt(abar_t) x0 + sqrt(1 - abar_t) noise; t (B,) long."""

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """eps_hat(x_t, t, y), same shape as x_t; differentiable in x_t."""

    def img2img(self, images: torch.Tensor, labels: torch.Tensor, strength: float, steps: int,
                seed: int) -> torch.Tensor:
        """uint8 images (n, C, H, W) -> uint8 images of the same shape, conditioned on labels (n,)."""

    def parameters(self) -> Iterable[nn.Parameter]:
        """Every weight of the model (frozen by :func:`freeze`)."""


def freeze(model: DenoisingModel) -> None:
    for p in model.parameters():
        p.requires_grad_(False)


# ----------------------------------------------------------------------------- latent distillation


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


def offline_synthetic(model: DenoisingModel, images: torch.Tensor, labels: torch.Tensor, count: int,
                      strength: float, steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The offline baseline: ``count`` img2img images of randomly drawn source images (uint8
    (n, C, H, W), labels (n,)), one candidate each, generated once before training."""
    idx = torch.randint(0, len(images), (count,), generator=make_generator("domainfusion-offline", seed))
    out = [model.img2img(images[c], labels[c], strength, steps, seed=seed_hash("domainfusion-offline", seed, i))
           for i, c in enumerate(torch.split(idx, 512))]
    return (torch.cat(out) if out else images[:0]), labels[idx]


# ----------------------------------------------------------------------------- generator adapter


def resize_images(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float images (B, C, H, W) -> (B, C, size, size): area when shrinking, bilinear when growing."""
    if x.shape[-1] == size and x.shape[-2] == size:
        return x
    mode = "area" if x.shape[-1] > size else "bilinear"
    return F.interpolate(x, size=(size, size), mode=mode, **({} if mode == "area" else {"align_corners": False}))


class PixelDiffusionAdapter:
    """:class:`DenoisingModel` over ``fewgen.generators.diffusion.DiffusionGenerator``.

    The generator may work at a smaller side than the classifier (a cheap stand-in for a latent
    model's encoder): ``encode`` resizes to the generator's side and maps [0, 1] -> [-1, 1];
    ``img2img`` edits the image at that side and adds back the detail the resize removed
    (``x + up(edit(down(x)) - down(x))``), so the generator changes colour, texture and layout
    while edges stay sharp.
    """

    def __init__(self, generator, image_size: int, guidance: float = 1.0):
        self.generator = generator
        self.image_size = image_size
        self.gen_size = generator.cfg.image_size
        self.guidance = guidance
        self.num_train_timesteps = int(generator.noise_scheduler.config.num_train_timesteps)

    def parameters(self) -> Iterable[nn.Parameter]:
        for m in self.generator.modules().values():
            yield from m.parameters()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return resize_images(images, self.gen_size) * 2 - 1

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        # the same q(x_t | x_0) as DDPMScheduler.add_noise, written out so it stays differentiable
        # in x0 on any device
        abar = self.generator.noise_scheduler.alphas_cumprod.to(x0.device, x0.dtype)[t.long()]
        abar = abar.view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.generator.predict_noise(x_t, t, labels)

    @torch.no_grad()
    def img2img(self, images: torch.Tensor, labels: torch.Tensor, strength: float, steps: int,
                seed: int) -> torch.Tensor:
        x = images.float() / 255.0
        low = resize_images(x, self.gen_size)
        edited = self.generator.img2img(low * 2 - 1, labels, strength=strength, steps=steps, seed=seed,
                                        guidance=self.guidance, output="float")
        edited = (edited.cpu() + 1) / 2
        if self.gen_size == x.shape[-1]:
            out = edited
        else:
            out = x + resize_images(edited - low, x.shape[-1])
        return (out.clamp(0, 1) * 255).round().to(torch.uint8)


class LatentDiffusionAdapter:
    """:class:`DenoisingModel` over Stable Diffusion components (the paper's latent space).

    ``encode`` is the VAE encoder (posterior mean times ``scaling_factor``), differentiable so the
    latent distillation gradient reaches the classifier through it; the condition of class ``k``
    is ``prompt_embeds[k]`` (the text encoder's output for e.g. "a photo of a dog"); img2img is
    SDEdit in latent space with DDIM and classifier-free guidance against ``null_embeds``.

    Args:
        unet: a diffusers ``UNet2DConditionModel``; vae: an ``AutoencoderKL``.
        noise_scheduler: the model's training scheduler (``DDPMScheduler`` config).
        prompt_embeds: class conditions, shape (K, L, D); null_embeds: the empty prompt, (1, L, D).
    """

    def __init__(self, unet, vae, noise_scheduler, prompt_embeds: torch.Tensor,
                 null_embeds: torch.Tensor | None = None, guidance: float = 1.0):
        self.unet, self.vae, self.noise_scheduler = unet, vae, noise_scheduler
        self.prompt_embeds = prompt_embeds
        self.null_embeds = null_embeds if null_embeds is not None else torch.zeros_like(prompt_embeds[:1])
        self.guidance = guidance
        self.scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)

    @classmethod
    def from_pretrained(cls, path: str, class_names: list[str], prompt: str = "a photo of a {}",
                        device: torch.device | str = "cpu", guidance: float = 1.0) -> LatentDiffusionAdapter:
        """Load a local Stable Diffusion folder (diffusers layout) and encode one prompt per class."""
        from diffusers import StableDiffusionPipeline

        try:
            pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise FewgenError(f"cannot load Stable Diffusion from {path!r} ({e}); give a local diffusers folder") from None
        pipe.to(device)
        with torch.no_grad():
            def embed(texts: list[str]) -> torch.Tensor:
                tok = pipe.tokenizer(texts, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                                     truncation=True, return_tensors="pt")
                return pipe.text_encoder(tok.input_ids.to(device))[0]

            prompts = embed([prompt.format(n.replace("_", " ")) for n in class_names])
            null = embed([""])
        from diffusers import DDPMScheduler

        return cls(pipe.unet, pipe.vae, DDPMScheduler.from_config(pipe.scheduler.config), prompts, null, guidance)

    def parameters(self) -> Iterable[nn.Parameter]:
        yield from self.unet.parameters()
        yield from self.vae.parameters()

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.vae.encode(images * 2 - 1).latent_dist.mean * self.scaling

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        abar = self.noise_scheduler.alphas_cumprod.to(x0.device, x0.dtype)[t.long()]
        abar = abar.view(-1, *([1] * (x0.dim() - 1)))
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def _cond(self, labels: torch.Tensor, device) -> torch.Tensor:
        return self.prompt_embeds.to(device)[labels.long().to(device)]

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, device=x_t.device).long().expand(x_t.shape[0])
        return self.unet(x_t, t, encoder_hidden_states=self._cond(labels, x_t.device)).sample

    @torch.no_grad()
    def img2img(self, images: torch.Tensor, labels: torch.Tensor, strength: float, steps: int,
                seed: int) -> torch.Tensor:
        from diffusers import DDIMScheduler

        device = next(self.unet.parameters()).device
        x = images.to(device).float() / 255.0
        z = self.encode(x)
        sch = DDIMScheduler.from_config(self.noise_scheduler.config)
        sch.set_timesteps(steps)
        n_run = min(int(round(steps * strength)), steps)
        if n_run == 0:
            return images.clone()
        timesteps = sch.timesteps[steps - n_run:]
        g = torch.Generator().manual_seed(int(seed))
        z = self.add_noise(z, torch.randn(z.shape, generator=g).to(device), timesteps[:1].repeat(len(z)).to(device))
        cond = self._cond(labels, device)
        null = self.null_embeds.to(device).expand_as(cond)
        for t in timesteps:
            tt = t.to(device).expand(len(z))
            if self.guidance == 1.0:
                eps = self.unet(z, tt, encoder_hidden_states=cond).sample
            else:
                e = self.unet(torch.cat([z, z]), torch.cat([tt, tt]), encoder_hidden_states=torch.cat([cond, null])).sample
                eps = e[len(z):] + self.guidance * (e[:len(z)] - e[len(z):])
            z = sch.step(eps, t, z).prev_sample
        out = (self.vae.decode(z / self.scaling).sample + 1) / 2
        out = resize_images(out.float(), images.shape[-1])
        return (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
