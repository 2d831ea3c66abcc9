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
    """Where this process stands: its rank, the world size, and a barrier."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def gather_objects(self, obj):
        """Every process's ``obj``, as a list in rank order (``[obj]`` on one process)."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


def process_context() -> ProcessContext:
    """The current process group (initialised through accelerate when launched with several
    processes and not initialised yet); a single process otherwise."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return ProcessContext(dist.get_rank(), dist.get_world_size())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        try:
            from accelerate import PartialState

            PartialState()
            if dist.is_initialized():  # on CPU accelerate may report one process but start the group
                return ProcessContext(dist.get_rank(), dist.get_world_size())
        except Exception:  # accelerate missing or could not pick a backend: plain torch.distributed
            pass
        import torch

        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        return ProcessContext(dist.get_rank(), dist.get_world_size())
    return ProcessContext()
