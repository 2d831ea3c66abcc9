"""The generator kinds (``generator.kind``), each registered once with its class and what it is.

Everything that used to ask ``kind == "exemplar"`` asks the registered :class:`GeneratorKind` instead:
whether the novel classes come from a DataDream adapter of the shots, whether images are drawn from
the shots themselves (exemplar conditioning), whether the model is loaded from ``generator.model``
rather than trained on the base classes, and whether it reads exemplars through the pretrained
backbone. Adding a generator is its module (a class with the :class:`~fewgen.generators.protocol.
Generator` interface and the constructors below, and its options dataclass) plus one
:func:`register_generator` line here naming that section (``options``), and the section's line in
``fewgen.app.config.GeneratorConfig`` (``steered`` was added so).

The classes are named by import path and imported on first use, so that reading the registry (the
config check, the CLI's choices) needs no diffusers.

    >>> GENERATORS.get("exemplar").exemplar
    True
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fewgen.registry import Registry


@dataclass(frozen=True)
class GeneratorKind:
    """One value of ``generator.kind``.

    Attributes:
        name: the config value.
        target: ``"module:Class"`` of the generator class. A class trained on the base classes has
            ``from_options(generator_config, base, encoder, device)`` (untrained, ready for ``fit``)
            and ``load(folder, encoder, device)``; a pretrained one has ``from_options(generator_config,
            device)`` only.
        adapted: the novel classes are drawn from a DataDream adapter of the shots (or zero-shot
            from their names); otherwise from the shots directly.
        exemplar: each image is drawn from (conditioned on) one of its class's shots.
        pretrained: loaded from ``generator.model``, not trained on the base classes.
        prompted: prompted with ``generator.prompt`` (a text-to-image backend).
        reads_backbone: whether, under a generator config, it reads exemplars through the run's
            pretrained backbone (then the ``generator`` step needs ``backbone``).
        adaptable: whether a DataDream adapter can be fitted on top of it (the ``adapt`` step).
        options: the name of its own options section, ``generator.<options>``; a kind with one
            reads only ``generator.kind`` and that section (its key holds nothing else).
        description: one line for ``fewgen options`` and errors.
    """

    name: str
    target: str
    adapted: bool
    exemplar: bool = False
    pretrained: bool = False
    prompted: bool = False
    reads_backbone: Callable[[Any], bool] = field(default=lambda g: False, compare=False)
    adaptable: bool = True
    options: str | None = None
    description: str = ""

    def generator_class(self) -> type:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)


GENERATORS: Registry[GeneratorKind] = Registry("generator kind")


def register_generator(kind: GeneratorKind) -> GeneratorKind:
    GENERATORS.register(kind.name)(kind)
    return kind


def generator_kind(name: str) -> GeneratorKind:
    """The registered kind ``name`` (a FewgenError naming the known ones otherwise)."""
    return GENERATORS.get(name)


def option_sections() -> list[str]:
    """The ``generator.<section>`` names that belong to one kind each."""
    return [k.options for k in (GENERATORS.get(n) for n in GENERATORS.names()) if k.options]


def adapted_kinds() -> list[str]:
    """Kinds whose novel classes come from a DataDream adapter of the shots."""
    return [n for n in GENERATORS.names() if GENERATORS.get(n).adapted]


register_generator(GeneratorKind(
    "diffusion", "fewgen.generators.diffusion:DiffusionGenerator", adapted=True,
    description="pixel UNet with class tokens, trained on the base classes"))
register_generator(GeneratorKind(
    "exemplar", "fewgen.generators.exemplar:ExemplarDiffusion", adapted=False, exemplar=True,
    reads_backbone=lambda g: g.exemplar_cond != "channels",
    description="pixel UNet that draws another image of an exemplar's class, trained on pairs of base images"))
register_generator(GeneratorKind(
    "stable-diffusion", "fewgen.generators.stable_diffusion:StableDiffusionGenerator", adapted=True,
    pretrained=True, prompted=True, description="a Stable Diffusion pipeline (generator.model)"))
register_generator(GeneratorKind(
    "steered", "fewgen.generators.steered:SteeredGenerator", adapted=False, exemplar=True,
    reads_backbone=lambda g: True, adaptable=False, options="steered",
    description="affine redrawings of each shot, chosen so their mean feature lies where the class's other "
                "drawings are predicted to (generator.steered)"))
