"""Generators: pixel diffusion, DataDream LoRA, Stable Diffusion backend, GANs and their few-shot adaptations."""
