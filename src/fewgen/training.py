"""The training core every loop in fewgen shares: the learning-rate schedule (linear warmup, then
cosine decay to 0) and the optimiser step (backward, gradient clipping, step).

Pretraining (``pretrain/loop.py``), fine-tuning (``learners/finetune.py``), DG training
(``dg/protocol.py``) and the generators' training (pixel diffusion, the exemplar generator,
DataDream LoRA, Stable Diffusion LoRA) all use these, so a schedule means the same thing
everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch


def cosine_factor(progress: float) -> float:
    """LR multiplier at ``progress`` (fraction of training done, clipped to [0, 1]): 1 -> 0 along a
    half cosine."""
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def cosine_with_warmup(warmup: int, total: int) -> Callable[[int], float]:
    """LR multiplier per step for ``torch.optim.lr_scheduler.LambdaLR``: linear warmup over
    ``warmup`` steps, then cosine decay to 0 at ``total``."""
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return cosine_factor((step - warmup) / max(1, total - warmup))
    return fn


def cosine_schedule(opt: torch.optim.Optimizer, total: int, warmup: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """The ``LambdaLR`` of :func:`cosine_with_warmup` on ``opt``."""
    return torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(warmup, total))


def clipped_step(loss: torch.Tensor, opt: torch.optim.Optimizer, sched, params, max_norm: float | None = 1.0) -> float:
    """One optimiser step: zero the gradients, backward, clip the gradient norm to ``max_norm``
    (``None``: no clipping), step the optimiser and the schedule (``None``: none); returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_norm)
    opt.step()
    if sched is not None:
        sched.step()
    return loss.item()
