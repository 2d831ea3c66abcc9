"""Generators seen as frozen denoisers (DomainFusion's interface): the encoder to the model's
space, noise prediction conditioned on a class, img2img; for the pixel generator and for Stable
Diffusion's latent space."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from fewgen.data.images import resize
from fewgen.errors import FewgenError


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
        return resize(images, self.gen_size) * 2 - 1

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
        low = resize(x, self.gen_size)
        edited = self.generator.img2img(low * 2 - 1, labels, strength=strength, steps=steps, seed=seed,
                                        guidance=self.guidance, output="float")
        edited = (edited.cpu() + 1) / 2
        if self.gen_size == x.shape[-1]:
            out = edited
        else:
            out = x + resize(edited - low, x.shape[-1])
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
        out = resize(out.float(), images.shape[-1])
        return (out.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
