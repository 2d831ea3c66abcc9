"""The one module images change size and channels in: by default area averaging when shrinking,
bilinear (``align_corners=False``) when enlarging; where a model was trained on another resampling,
its own (``mode``): antialiased bilinear for Stable Diffusion's outputs and the metrics' feature
networks (as PIL resizes), bilinear to Stable Diffusion's resolution (as diffusers' processor),
bicubic for CLIP (as its processor). Gray -> RGB by repeating the channel, RGB -> gray by the
luminance ``0.299 R + 0.587 G + 0.114 B`` (ITU-R BT.601)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fewgen.errors import FewgenError

#: resampling modes of :func:`resize`
RESIZE_MODES = ("auto", "bilinear", "bicubic")


def resize(x: torch.Tensor, size: int | tuple[int, int], mode: str = "auto", antialias: bool = False) -> torch.Tensor:
    """Float images (n, C, H, W) -> (n, C, *size); unchanged when already that size. ``mode``:
    auto (area when shrinking, bilinear when enlarging), bilinear or bicubic (``align_corners=False``;
    ``antialias`` as PIL when shrinking)."""
    h, w = (size, size) if isinstance(size, int) else size
    if x.shape[-2:] == (h, w):
        return x
    if mode not in RESIZE_MODES:
        raise FewgenError(f"resize mode {mode!r} is not one of {', '.join(RESIZE_MODES)}")
    if mode == "auto":
        mode = "area" if x.shape[-1] > w else "bilinear"
    kw = {} if mode == "area" else {"align_corners": False, **({"antialias": True} if antialias else {})}
    return torch.cat([F.interpolate(chunk, size=(h, w), mode=mode, **kw) for chunk in torch.split(x, 2048)])


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [0, 1] -> uint8 (rounded, clamped)."""
    return (x.clamp(0, 1) * 255).round().to(torch.uint8)


def signed_to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] (the generators' space) -> uint8 (round half up, clamped)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def resize_uint8(images: torch.Tensor, size: int | tuple[int, int]) -> torch.Tensor:
    """uint8 images (n, C, H, W) -> uint8 at ``size``."""
    h, w = (size, size) if isinstance(size, int) else size
    if images.shape[-2:] == (h, w):
        return images
    return to_uint8(resize(images.float() / 255.0, (h, w)))


def to_gray(x: torch.Tensor) -> torch.Tensor:
    """Float RGB images (n, 3, H, W) -> (n, 1, H, W): the luminance 0.299 R + 0.587 G + 0.114 B."""
    return (x * torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)


def convert_images(images: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """uint8 (n, C, H, W) -> uint8 (n, *shape): channels converted, then resized."""
    c, h, w = shape
    x = images.float() / 255.0
    if x.shape[1] != c:
        if c == 3 and x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        elif c == 1 and x.shape[1] == 3:
            x = to_gray(x)
        else:
            raise FewgenError(f"cannot convert {x.shape[1]}-channel images to {c} channels")
    return to_uint8(resize(x, (h, w)))
