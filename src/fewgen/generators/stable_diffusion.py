"""Stable Diffusion backend: the generator interface over diffusers' ``StableDiffusionPipeline``.

For users with the weights (a local folder or a hub id, e.g. SD 2.1) and a GPU; the papers'
setting. Text-to-image from the prompt ``"a photo of a {class}"`` (DiffAlign's generation from
the label name; DataDream's template), 50 steps and guidance 2.0 by default; img2img from a
real image at a strength (SDEdit, Meng et al., 2022; used by DomainFusion); and DataDream
adaptation (Kim et al., ECCV 2024): LoRA of rank 16 on the UNet attention (``to_q``, ``to_k``,
``to_v``, ``to_out.0``) and on the CLIP text encoder's attention (``q_proj``, ``k_proj``,
``v_proj``, ``out_proj``), AdamW at 1e-4 with a cosine schedule, the latent diffusion loss

    L = E || eps - eps_theta(sqrt(abar_t) z0 + sqrt(1 - abar_t) eps, t, tau(prompt)) ||^2,  z0 = s * E(x)

(or the v-prediction target when the scheduler says so), mode ``cls`` (one adapter per class)
or ``dset`` (one for all, same total steps). Adapters are written with the pipeline's own
``save_lora_weights`` and read back with ``load_lora_weights``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fewgen.data.base import ArrayDataset
from fewgen.data.images import resize, to_gray, to_uint8
from fewgen.errors import FewgenError
from fewgen.generators.datadream import LORA_WEIGHTS, DataDreamConfig
from fewgen.generators.pixels import SAMPLERS
from fewgen.options import opt
from fewgen.synthesis.sharding import ProcessContext
from fewgen.training import TrainingMonitor
from fewgen.utils import (
    content_digest,
    make_generator,
    path_digest,
    read_json,
    stable_hash,
    write_json,
)

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    try:
        return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]
    except KeyError:
        raise FewgenError(f"dtype {name!r} is not one of auto, float32, float16, bfloat16") from None


def to_uint8_rgb(x: torch.Tensor, shape: tuple[int, int, int] | None = None) -> torch.Tensor:
    """Pipeline output, float in [0, 1] (n, 3, H, W) -> uint8 (n, C, h, w) for a target shape."""
    x = x.float().clamp(0, 1)
    if shape is not None:
        c, h, w = shape
        x = resize(x, (h, w), mode="bilinear", antialias=True)
        if c == 1:
            x = to_gray(x)
    return to_uint8(x)


@dataclass
class StableDiffusionOptions:
    """Options of a Stable Diffusion pipeline (``generator.kind=stable-diffusion``; the config section
    ``generator.stable_diffusion``): which pipeline, how it is prompted, and how it runs."""

    model: str | None = opt(None, "the Stable Diffusion pipeline: a local diffusers folder or hub id")
    optional: bool = opt(False, "no model: false refuses the run; true leaves the generator, adapt and synthesize "
                         "steps and the learner methods that need generated images out, with a line in the log (the "
                         "photos preset: real-only rows on a CPU, DataDream's recipe once "
                         "generator.stable_diffusion.model names a Stable Diffusion)")
    prompt: str = opt("a photo of a {}", "prompt template ({} = class name)")
    resolution: int | None = opt(None, "generation size (default: the pipeline's)", min=8)
    dtype: str = opt("auto", "dtype: auto (fp16 on cuda), float32, float16, bfloat16",
                     choices=("auto", "float32", "float16", "bfloat16"))
    attention_slicing: bool = opt(False, "attention in slices (less GPU memory, a little slower; the same images up "
                                  "to rounding, so the same cache entries)")
    vae_slicing: bool = opt(False, "decode latents one image at a time (less GPU memory for large batches; the same "
                            "cache entries)")
    compile: bool = opt(False, "torch.compile the UNet for sampling (faster after a first slow batch; the same cache "
                        "entries; each switch of a cls adapter recompiles)")


@dataclass
class SDAdapter:
    """DataDream adapters for a Stable Diffusion pipeline: folders written by ``save_lora_weights``."""

    cfg: DataDreamConfig
    class_names: list[str]
    folder: Path
    generator_key: str
    history: list[dict] = field(default_factory=list)

    def class_folder(self, c: int) -> Path:
        return self.folder if self.cfg.mode == "dset" else self.folder / f"class_{c:04d}"

    @property
    def key(self) -> str:
        return content_digest(*[(self.class_folder(c) / LORA_WEIGHTS).read_bytes()
                                for c in range(1 if self.cfg.mode == "dset" else len(self.class_names))])

    @classmethod
    def load(cls, folder: str | Path) -> SDAdapter:
        info = read_json(Path(folder) / "adapter_config.json")
        return cls(DataDreamConfig(**info["datadream"]), info["class_names"], Path(folder), info["generator_key"],
                   info.get("history", []))


class StableDiffusionGenerator:
    """Text-to-image, img2img and DataDream LoRA on a Stable Diffusion pipeline.

    ``attention_slicing`` / ``vae_slicing`` trade speed for GPU memory (diffusers'
    ``enable_attention_slicing``, ``vae.enable_slicing``); ``compile`` runs the UNet through
    ``torch.compile`` from the first sampling call on (training the LoRA stays eager). None of the
    three changes what is drawn beyond rounding, so none enters :meth:`state_key` (``fewgen.keys``,
    ``_SD_RUNTIME``).
    """

    kind = "stable-diffusion"
    parallel_sampling = False  # one pipeline per process

    @classmethod
    def from_options(cls, g: StableDiffusionOptions, device: torch.device | str = "cpu") -> StableDiffusionGenerator:
        """The pipeline ``g.model`` of options ``g``."""
        return cls(g.model, device=device, dtype=g.dtype, prompt=g.prompt, resolution=g.resolution,
                   attention_slicing=g.attention_slicing, vae_slicing=g.vae_slicing, compile=g.compile)

    def __init__(self, model: str | Path, device: torch.device | str = "cpu", dtype: str = "auto",
                 prompt: str = "a photo of a {}", resolution: int | None = None, attention_slicing: bool = False,
                 vae_slicing: bool = False, compile: bool = False):
        from diffusers import StableDiffusionPipeline

        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.model = str(model)
        self.prompt = prompt
        try:
            self.pipe = StableDiffusionPipeline.from_pretrained(self.model, torch_dtype=self.dtype, safety_checker=None,
                                                                requires_safety_checker=False, use_safetensors=True)
        except (OSError, ValueError) as e:
            raise FewgenError(f"cannot load a Stable Diffusion pipeline from {self.model!r} ({str(e).splitlines()[0]}); "
                              "give a local folder saved with save_pretrained, or a hub id with HF access") from None
        self.pipe.to(self.device)
        self.pipe.set_progress_bar_config(disable=True)
        if attention_slicing:
            self.pipe.enable_attention_slicing()
        if vae_slicing:
            self.pipe.vae.enable_slicing()
        self.compile = compile
        self.resolution = resolution or self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self._train_scheduler = copy.deepcopy(self.pipe.scheduler)
        self._loaded_lora: str | None = None
        self._key: str | None = None

    def state_key(self) -> str:
        if self._key is None:
            parts = {"model": self.model, "dtype": str(self.dtype), "resolution": self.resolution}
            if (Path(self.model) / "model_index.json").exists():  # a local folder: key on its files' content
                parts["files"] = path_digest(self.model)
            self._key = stable_hash(parts)
        return self._key

    def prompts_for(self, class_names: Sequence[str]) -> list[str]:
        return [self.prompt.format(n) for n in class_names]

    def _set_sampler(self, sampler: str) -> None:
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        cfg = self._train_scheduler.config
        if sampler == "ddim":
            self.pipe.scheduler = DDIMScheduler.from_config(cfg)
        elif sampler in SAMPLERS[1:]:  # no lambda clipping to turn off ("-full"): SD's schedule keeps alpha_bar > 0
            self.pipe.scheduler = DPMSolverMultistepScheduler.from_config(
                cfg, algorithm_type="dpmsolver++", use_lu_lambdas=sampler == "dpmsolver++-logsnr")
        else:
            raise FewgenError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")

    def _generators(self, seeds: Sequence[int]) -> list[torch.Generator]:
        return [torch.Generator(self.device).manual_seed(int(s)) for s in seeds]

    def _compile_for_sampling(self) -> None:
        """``torch.compile`` the UNet in place (``nn.Module.compile``: LoRA loading still reaches the
        module), once, when sampling starts; the first batch pays the compilation."""
        if self.compile and not getattr(self, "_compiled", False):
            self.pipe.unet.compile()
            self._compiled = True

    @torch.no_grad()
    def sample(self, prompts: Sequence[str], seeds: Sequence[int], steps: int = 50, guidance: float = 2.0,
               sampler: str = "dpmsolver++", image_shape: tuple[int, int, int] | None = None) -> torch.Tensor:
        """One image per prompt, from its own seed: uint8 (n, C, H, W) (``image_shape`` resizes / greys)."""
        if len(prompts) != len(seeds):
            raise FewgenError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per image")
        self._set_sampler(sampler)
        self._compile_for_sampling()
        out = self.pipe(prompt=list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                        generator=self._generators(seeds), output_type="pt", height=self.resolution,
                        width=self.resolution).images
        return to_uint8_rgb(out.cpu(), image_shape)

    @torch.no_grad()
    def img2img(self, images: torch.Tensor, prompts: Sequence[str], strength: float = 0.5, steps: int = 50,
                seeds: Sequence[int] | None = None, guidance: float = 2.0, sampler: str = "dpmsolver++",
                seed: int = 0) -> torch.Tensor:
        """Real images uint8 (n, C, H, W) noised to ``strength`` and denoised toward the prompts;
        returns uint8 of the input shape."""
        from diffusers import StableDiffusionImg2ImgPipeline

        if not 0.0 < strength <= 1.0:
            raise FewgenError(f"strength must be in (0, 1], got {strength}")
        seeds = list(seeds) if seeds is not None else [int(make_generator("sd-img2img", seed, i).initial_seed())
                                                       for i in range(len(images))]
        self._set_sampler(sampler)
        self._compile_for_sampling()
        i2i = StableDiffusionImg2ImgPipeline(**self.pipe.components)
        i2i.set_progress_bar_config(disable=True)
        x = images.float() / 255.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = resize(x, self.resolution, mode="bilinear")
        out = i2i(prompt=list(prompts), image=x.to(self.device, self.dtype), strength=strength,
                  num_inference_steps=steps, guidance_scale=guidance, generator=self._generators(seeds),
                  output_type="pt").images
        return to_uint8_rgb(out.cpu(), tuple(images.shape[1:]))

    # ------------------------------------------------------------------ DataDream
    def _encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        tok = self.pipe.tokenizer(list(prompts), padding="max_length", max_length=self.pipe.tokenizer.model_max_length,
                                  truncation=True, return_tensors="pt")
        return self.pipe.text_encoder(tok.input_ids.to(self.device))[0]

    def _latents(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 127.5 - 1.0
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = resize(x, self.resolution, mode="bilinear")
        with torch.no_grad():
            dist = self.pipe.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return dist.mean * self.pipe.vae.config.scaling_factor

    def _inject(self, cfg: DataDreamConfig) -> None:
        from peft import LoraConfig

        unet, te = self.pipe.unet, self.pipe.text_encoder
        unet.requires_grad_(False)
        te.requires_grad_(False)
        self.pipe.vae.requires_grad_(False)
        if self._loaded_lora is not None:
            self.pipe.unload_lora_weights()
            self._loaded_lora = None
        self._remove_training_adapter()
        unet.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=UNET_TARGETS,
                                    init_lora_weights="gaussian"), adapter_name="datadream")
        te.add_adapter(LoraConfig(r=cfg.rank, lora_alpha=cfg.lora_alpha, target_modules=TEXT_TARGETS,
                                  init_lora_weights="gaussian"), adapter_name="datadream")
        if self.dtype != torch.float32:  # train the LoRA weights in fp32 (diffusers' cast_training_params)
            from diffusers.training_utils import cast_training_params

            for m in (unet, te):
                for n, p in m.named_parameters():
                    if "lora_" in n:
                        p.requires_grad_(True)
                cast_training_params(m, dtype=torch.float32)

    def _remove_training_adapter(self) -> None:
        for m in (self.pipe.unet, self.pipe.text_encoder):
            if getattr(m, "peft_config", None) and "datadream" in m.peft_config:
                # diffusers models call it delete_adapters, transformers models delete_adapter
                (m.delete_adapters if hasattr(m, "delete_adapters") else m.delete_adapter)("datadream")

    def _reset_lora(self, g: torch.Generator, rank: int) -> list[torch.nn.Parameter]:
        params = []
        with torch.no_grad():
            for m in (self.pipe.unet, self.pipe.text_encoder):
                for n, p in m.named_parameters():
                    if "lora_" in n:
                        if "lora_A" in n:
                            p.copy_(torch.randn(p.shape, generator=g) / rank)
                        else:
                            p.zero_()
                        p.requires_grad_(True)
                        params.append(p)
        return params

    def _train(self, images: torch.Tensor, prompts: list[str], steps: int, cfg: DataDreamConfig,
               seed_parts: tuple, monitor: TrainingMonitor | None = None) -> list[float]:
        from fewgen.generators.datadream import adapter_steps

        params = self._reset_lora(make_generator("sd-datadream-init", *seed_parts), cfg.rank)
        latents = self._latents(images)
        noise_sched = self._train_scheduler
        n_t = noise_sched.config.num_train_timesteps
        self.pipe.unet.train()
        self.pipe.text_encoder.train()

        def step_loss(step: int) -> torch.Tensor:
            g = make_generator("sd-datadream", *seed_parts, step)
            idx = torch.randint(0, len(latents), (cfg.batch_size,), generator=g)
            z0 = latents[idx]
            noise = torch.randn(z0.shape, generator=g).to(z0)
            t = torch.randint(0, n_t, (len(idx),), generator=g).to(self.device)
            z_t = noise_sched.add_noise(z0, noise, t)
            cond = self._encode_prompts([prompts[i] for i in idx.tolist()])
            pred = self.pipe.unet(z_t, t, encoder_hidden_states=cond).sample
            target = noise_sched.get_velocity(z0, noise, t) if noise_sched.config.prediction_type == "v_prediction" \
                else noise
            return F.mse_loss(pred.float(), target.float())

        losses = adapter_steps(step_loss, params, cfg, steps, monitor)
        self.pipe.unet.eval()
        self.pipe.text_encoder.eval()
        return losses

    def _save_lora(self, folder: Path) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        unet_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.unet, adapter_name="datadream"))
        te_sd = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.pipe.text_encoder,
                                                                          adapter_name="datadream"))
        StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet_sd, text_encoder_lora_layers=te_sd,
                                                  safe_serialization=True)

    def adapt(self, few_shot: ArrayDataset, cfg: DataDreamConfig, cache, parts: dict,
              ctx: ProcessContext | None = None, log: Callable[[str], None] | None = None, progress: bool = False,
              log_dir: str | Path | None = None) -> SDAdapter:
        """DataDream LoRA on the UNet's and the text encoder's attention for the few-shot set
        (:func:`fewgen.generators.datadream.run_datadream`'s schedule), cached under ``parts`` in
        ``cache``; while it trains, a bar with the ETA (``progress``) and TensorBoard events of the
        loss in ``log_dir``."""
        from fewgen.generators.datadream import cached_adaptation, images_of, run_datadream

        names = list(few_shot.class_names)
        prompts = self.prompts_for(names)

        def train(entry: Path) -> list[dict]:
            self._inject(cfg)

            def train_one(classes: list[int], name: str, steps: int, monitor) -> tuple[None, list[float]]:
                idx = images_of(few_shot, classes)
                losses = self._train(few_shot.images[idx], [prompts[y] for y in few_shot.labels[idx].tolist()], steps,
                                     cfg, (cfg.seed, name), monitor)
                self._save_lora(entry if cfg.mode == "dset" else entry / f"class_{classes[0]:04d}")
                return None, losses

            _, history = run_datadream(names, cfg, train_one, ctx, log, progress, log_dir,
                                       "datadream Stable Diffusion")
            self._remove_training_adapter()
            return history

        def save(history: list[dict], entry: Path) -> None:
            write_json(entry / "adapter_config.json", {"method": "datadream", "datadream": asdict(cfg),
                                                       "class_names": names, "generator_key": self.state_key(),
                                                       "lora": {"unet": UNET_TARGETS, "text_encoder": TEXT_TARGETS},
                                                       "history": history})

        return cached_adaptation(cache, parts, train, save, SDAdapter.load, ctx, log,
                                 f"Stable Diffusion DataDream {cfg.mode} adapter")

    def use_adapter(self, adapter: SDAdapter | None, c: int = 0) -> None:
        """Load class ``c``'s LoRA (``cls``) or the set's (``dset``) into the pipeline; None unloads."""
        folder = None if adapter is None else str(adapter.class_folder(c))
        if folder == self._loaded_lora:
            return
        if self._loaded_lora is not None:
            self.pipe.unload_lora_weights()
        if folder is not None:
            self.pipe.load_lora_weights(folder, use_safetensors=True)
        self._loaded_lora = folder

    def synthesis_sample_fn(self, spec, adapter: SDAdapter | None, image_shape: tuple[int, int, int],
                            sources: list[torch.Tensor] | None = None):
        """sample_fn for the synthesis cache: text-to-image, or img2img from class c's shots
        ``sources[c]`` when ``spec.strengths`` is set (DA-Fusion). Text-to-image without per-class
        adapters (zero-shot or ``dset``) ``mixes_classes``: the store may hand it several classes'
        chunks as one batch, ``c`` then being each image's class, one prompt per image."""
        from fewgen.synthesis.store import sdedit_or_sample

        mixes = not spec.strengths and (adapter is None or adapter.cfg.mode == "dset")

        def fn(c, seeds, indices):
            if not isinstance(c, int):  # a batch of several classes (mixes_classes): c[k] is image k's class
                self.use_adapter(adapter, 0)
                return self.sample([spec.prompts[k] for k in c], seeds, spec.steps, spec.guidance, spec.sampler,
                                   image_shape)
            self.use_adapter(adapter, c)
            prompt = spec.prompts[c]
            return sdedit_or_sample(
                spec, None if sources is None else sources[c], seeds, indices,
                sample=lambda s: self.sample([prompt] * len(s), s, spec.steps, spec.guidance, spec.sampler,
                                             image_shape),
                img2img=lambda x, strength, s: self.img2img(x, [prompt] * len(x), strength, spec.steps, seeds=s,
                                                            guidance=spec.guidance, sampler=spec.sampler))
        fn.mixes_classes = mixes
        return fn
