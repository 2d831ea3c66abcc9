"""What every generator offers the pipeline (the class-token pixel generator, the exemplar
generator, Stable Diffusion): one interface, so the steps never ask which kind they hold.

    gen.state_key()                                   # content key: the synthesis cache's generator key
    gen.adapt(few_shot, datadream_cfg, cache, parts, ctx, log,   # a DataDream adapter, cached under parts
              progress=False, log_dir=None)                   # its bar and TensorBoard events while it trains
    gen.synthesis_sample_fn(spec, adapter, image_shape, sources)  # sample_fn(class, seeds, image indices)
    gen.parallel_sampling                             # whether in-process streams may each hold a copy

The DomainFusion step reads a generator through its denoiser interface instead
(``fewgen.generators.denoisers``: noise prediction, img2img in the model's own space).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Generator(Protocol):
    kind: str
    device: torch.device
    parallel_sampling: bool

    def state_key(self) -> str:
        """The key synthetic sets and adapters of this generator are cached under."""

    def adapt(self, few_shot, cfg, cache, parts: dict, ctx=None, log: Callable[[str], None] | None = None,
              progress: bool = False, log_dir: Path | None = None) -> Any:
        """DataDream adaptation to ``few_shot`` (``fewgen.generators.datadream.DataDreamConfig``): the
        ``adapters`` entry of ``cache`` for ``parts`` when it is ready, else trained on
        :func:`~fewgen.generators.datadream.run_datadream`'s schedule and saved there (with a progress
        bar when ``progress``, and TensorBoard events of its loss in ``log_dir``; a cached one writes
        none)."""

    def synthesis_sample_fn(self, spec, adapter: Any, image_shape: Sequence[int],
                            sources: list[torch.Tensor] | None = None) -> Callable:
        """``sample_fn(class index, seeds, image indices) -> uint8 images`` for the synthesis store;
        ``sources[c]`` are class c's shots (SDEdit, exemplar conditioning)."""
