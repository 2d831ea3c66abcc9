"""The generator kinds (``generator.kind``), each registered once with its class, its options
section and what it is.

Everything that used to ask ``kind == "exemplar"`` asks the registered :class:`GeneratorKind` instead:
whether the novel classes come from a DataDream adapter of the shots, whether images are drawn from
the shots themselves (exemplar conditioning), whether the model is loaded (``generator.stable_diffusion.
model``) rather than trained on the base classes, and whether it reads exemplars through the pretrained
backbone. Each kind reads ``generator.kind`` and its own options section only (its options
dataclass, beside its class), and its cache key holds nothing else. Adding a generator is its module
(a class with the :class:`~fewgen.generators.protocol.Generator` interface and the constructors
below, and its options dataclass) plus one :func:`register_generator` line here naming that section,
and the section's line in ``fewgen.app.config.GeneratorConfig`` (``steered`` was added so).

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
            ``from_options(options, base, encoder, device)`` (untrained, ready for
            ``fit(base, **options.fit_arguments(), ...)``) and ``load_trained(folder, encoder, device)``;
            a pretrained one has ``from_options(options, device)`` only.
        adapted: the novel classes are drawn from a DataDream adapter of the shots (or zero-shot
            from their names); otherwise from the shots directly.
        exemplar: each image is drawn from (conditioned on) one of its class's shots.
        options: the name of its options section, ``generator.<options>``: the only part of the
            generator config it reads besides ``generator.kind`` (and ``generator.datadream`` when
            adapted), and all its key holds.
        pretrained: loaded from its options' ``model``, not trained on the base classes.
        prompted: prompted with its options' ``prompt`` (a text-to-image backend).
        reads_backbone: whether, under its options, it reads exemplars through the run's pretrained
            backbone (then the ``generator`` step needs ``backbone``).
        adaptable: whether a DataDream adapter can be fitted on top of it (the ``adapt`` step).
        sampled: whether it draws by diffusion sampling (from noise or, with SDEdit, from the shots);
            otherwise its images come some other way and its name says how.
        description: one line for ``fewgen options`` and errors.
    """

    name: str
    target: str
    options: str
    adapted: bool
    exemplar: bool = False
    pretrained: bool = False
    prompted: bool = False
    reads_backbone: Callable[[Any], bool] = field(default=lambda o: False, compare=False)
    adaptable: bool = True
    sampled: bool = True
    description: str = ""

    def generator_class(self) -> type:
        module, cls = self.target.split(":")
        return getattr(importlib.import_module(module), cls)

    def section(self, generator_config) -> Any:
        """Its options: the section ``generator.<options>`` of a generator config."""
        return getattr(generator_config, self.options)

    def uses_backbone(self, generator_config) -> bool:
        """Whether, under this generator config, it reads exemplars through the pretrained backbone."""
        return self.reads_backbone(self.section(generator_config))


GENERATORS: Registry[GeneratorKind] = Registry("generator kind")


def register_generator(kind: GeneratorKind) -> GeneratorKind:
    GENERATORS.register(kind.name)(kind)
    return kind


def generator_kind(name: str) -> GeneratorKind:
    """The registered kind ``name`` (a FewgenError naming the known ones otherwise)."""
    return GENERATORS.get(name)


register_generator(GeneratorKind(
    "diffusion", "fewgen.generators.diffusion:DiffusionGenerator", "diffusion", adapted=True,
    description="pixel UNet with class tokens, trained on the base classes (generator.diffusion)"))
register_generator(GeneratorKind(
    "exemplar", "fewgen.generators.exemplar:ExemplarDiffusion", "exemplar", adapted=False, exemplar=True,
    reads_backbone=lambda o: o.cond != "channels",
    description="pixel UNet that draws another image of an exemplar's class, trained on pairs of base images "
                "(generator.exemplar)"))
register_generator(GeneratorKind(
    "stable-diffusion", "fewgen.generators.stable_diffusion:StableDiffusionGenerator", "stable_diffusion",
    adapted=True, pretrained=True, prompted=True,
    description="a Stable Diffusion pipeline (generator.stable_diffusion.model)"))
register_generator(GeneratorKind(
    "steered", "fewgen.generators.steered:SteeredGenerator", "steered", adapted=False, exemplar=True,
    reads_backbone=lambda o: True, adaptable=False, sampled=False,
    description="affine redrawings of each shot, chosen so their mean feature lies where the class's other "
                "drawings are predicted to (generator.steered)"))
