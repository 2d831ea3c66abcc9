"""How many in-process streams sample in parallel."""

from __future__ import annotations

import torch

from fewgen.errors import FewgenError


def sampling_streams(streams: int | None, device) -> int:
    """Parallel sampling streams for the pixel generator: ``streams`` if given, else one per torch
    CPU thread (at most 8) on CPU and 1 on GPU."""
    if streams is not None:
        if streams < 1:
            raise FewgenError(f"synthesis.streams must be >= 1, got {streams}")
        return streams
    return 1 if torch.device(device).type != "cpu" else max(1, min(8, torch.get_num_threads()))
