"""Learning with synthetic data: DataDream and DiffAlign fine-tuning, the CLIP classifier,
and their losses as pure functions (``losses.py``). Pipeline steps live in ``steps.py``."""

from fewgen.learners.losses import (
    datadream_loss,
    hallucinate_labels,
    hallucination_kl,
    label_smoothed_ce,
    mmd,
)

__all__ = ["datadream_loss", "hallucinate_labels", "hallucination_kl", "label_smoothed_ce", "mmd"]
