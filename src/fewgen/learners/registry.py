"""The fine-tuning methods of the ``learn`` step, registered beside their definitions.

A method is a :class:`LearnerMethod` subclass registered with ``@LEARNER_METHODS.register(name)``
(as peft's ``register_peft_method``) in the file that defines it, with its options as a dataclass
beside it that ``LearnerConfig`` inherits (``fewgen.options``). It says which sources it trains on
(the real shots, the synthetic images, the base images) and builds the batches and the loss of
:func:`fewgen.learners.finetune.finetune`. :func:`method_specs` turns ``learner.methods`` into the
rows a run makes (DiffAlign adds its ablations).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fewgen.registry import Registry

LEARNER_METHODS: Registry = Registry("learner method")


@dataclass
class MethodSpec:
    """One row's method: ``kind`` names the registered method, ``weights`` its resolved options
    where they vary between rows (DiffAlign's ablations)."""

    name: str
    kind: str
    weights: Any = None

    @property
    def method(self) -> LearnerMethod:
        return LEARNER_METHODS.get(self.kind)()

    @property
    def uses_real(self) -> bool:
        return self.method.uses_real(self)

    @property
    def uses_synthetic(self) -> bool:
        return self.method.uses_synthetic(self)

    @property
    def hallucinates(self) -> bool:
        return self.method.hallucinates(self)

    def key(self) -> dict:
        return {"name": self.name, "kind": self.kind,
                "weights": None if self.weights is None else
                self.weights.key() if hasattr(self.weights, "key") else dataclasses.asdict(self.weights)}


@dataclass
class Sources:
    """What a method can train on: the shots, the synthetic images, the base images with their
    hallucinated soft labels (a function, computed only if the method asks), the batch size and
    the stream's seed parts."""

    real: Any
    synthetic: Any
    base_images: Any
    base_soft: Callable[[], Any]
    batch_size: int
    seed_parts: tuple


class LearnerMethod:
    """A way of fine-tuning the classifier; subclasses override what differs."""

    def specs(self, lc) -> list[MethodSpec]:
        """The rows this method makes for ``learner.*`` options ``lc``."""
        name = next(n for n in LEARNER_METHODS.names() if LEARNER_METHODS.get(n) is type(self))
        return [MethodSpec(name, name)]

    def uses_real(self, spec: MethodSpec) -> bool:
        return True

    def uses_synthetic(self, spec: MethodSpec) -> bool:
        return False

    def hallucinates(self, spec: MethodSpec) -> bool:
        return False

    def objective(self, spec: MethodSpec, lc, src: Sources) -> tuple[Callable, Callable]:
        """(batch_fn(step) -> batch, loss_fn(model, batch) -> named loss terms)."""
        raise NotImplementedError


def method_specs(lc) -> list[MethodSpec]:
    """The rows of ``learner.methods``, in order (DiffAlign followed by its ablations). The methods
    register when ``fewgen.learners`` is imported, which importing this module does first."""
    return [spec for name in lc.methods for spec in LEARNER_METHODS.get(name)().specs(lc)]
