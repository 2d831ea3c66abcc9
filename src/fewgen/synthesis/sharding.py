"""Scale-out of generation and adaptation over processes (accelerate / torch.distributed).

Work is a list of units (a class's chunk of images, a class's adapter) in a fixed global
order; process ``rank`` of ``world`` takes the units with ``index % world == rank``. Every
unit's randomness comes from its own seed (class, image index), never from the process, so
the files written are the same bytes whatever the number of processes. Launch with
``accelerate launch --num_processes N -m fewgen.app.cli generate ...`` or ``torchrun``; on CPU the
process group uses gloo.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")


def shard(items: list[T], rank: int, world: int) -> list[T]:
    """The items process ``rank`` of ``world`` handles: every ``world``-th, starting at ``rank``."""
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in [0, {world})")
    return items[rank::world]


@dataclass
class ProcessContext:
    """Where this process stands: its rank and the world size (accelerate's ``PartialState`` when
    there are several processes), with its barrier and object gather."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            _state().wait_for_everyone()

    def gather_objects(self, obj):
        """Every process's ``obj``, as a list in rank order (``[obj]`` on one process)."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])


def _state():
    import torch
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())  # cpu=True: gloo across CPU processes


def process_context() -> ProcessContext:
    """This process's place in the launch (``accelerate launch`` or ``torchrun``): accelerate's
    ``PartialState`` when several processes were started, a single process otherwise."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        state = _state()
        return ProcessContext(state.process_index, state.num_processes)
    return ProcessContext()
