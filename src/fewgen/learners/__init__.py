"""Learning with synthetic data: the fine-tuning methods of the learn step (registered in
``LEARNER_METHODS`` beside their definitions: ``finetune.py`` real-only / synthetic-only,
``datadream_loss.py``, ``diffalign.py``), the CLIP classifier, their losses as pure functions
(``losses.py``) and what judges and prepares synthetic sets (``synthetic.py``)."""

from fewgen.learners import datadream_classifier, diffalign, finetune  # noqa: F401  (registration)
from fewgen.learners.losses import (
    datadream_loss,
    hallucinate_labels,
    hallucination_kl,
    label_smoothed_ce,
    mmd,
)
from fewgen.learners.registry import (
    LEARNER_METHODS,
    LearnerMethod,
    MethodSpec,
    Sources,
    method_specs,
)

__all__ = ["LEARNER_METHODS", "LearnerMethod", "MethodSpec", "datadream_loss", "hallucinate_labels",
           "hallucination_kl", "label_smoothed_ce", "method_specs", "mmd", "Sources"]
