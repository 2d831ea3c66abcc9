"""A deformation generator trained through the few-shot classifier.

Family (a) of issue 27, in the spirit of IDeMe-Net (Chen et al., "Image Deformation Meta-Networks
for One-Shot Learning", CVPR 2019) and of hallucination trained through the meta-learner (Wang et
al., "Low-Shot Learning from Imaginary Data", CVPR 2018), with the deformation of a drawing as the
only freedom the generator has.

A small CNN reads the shot ``x`` (C, H, W) in [0, 1] and a noise vector ``z`` and predicts

* a coarse displacement field ``d`` on a ``grid x grid`` lattice, ``d = max_shift * tanh(.)`` in
  ``grid_sample``'s normalised coordinates, upsampled bicubically to (H, W), and
* optionally a stroke-width change, a softmax mix ``a`` of the image, its 3x3 dilation and its
  3x3 erosion.

The image is ``G(x, z) = mix_a(grid_sample(x, identity + d))``.

It is trained like every family of :mod:`fewgen.generators.episodic`: on base-class episodes
through a frozen backbone ``f``, by the query cross-entropy of prototypes that mix each shot with the
mean of its generated images, plus this family's penalties::

    L = CE(scale * cos(f(q), p), y_q) + w_smooth * |grad d / max_shift|^2 + w_magnitude * |d / max_shift|^2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.generators.episodic import EpisodicGenerator, EpisodicOptions
from fewgen.options import opt


@dataclass
class DeformOptions(EpisodicOptions):
    """How the deformation generator is built and trained (``fewgen.generators.deform``); the
    training fields are :class:`~fewgen.generators.episodic.EpisodicOptions`'."""

    max_shift: float = opt(0.2, "largest displacement, in grid_sample's [-1, 1] coordinates (0.2 = 10% of the side)",
                           gt=0, max=1)
    grid: int = opt(5, "side of the coarse displacement lattice", min=2)
    stroke: bool = opt(True, "also learn a stroke-width change (mix of the image, its dilation and its erosion)")
    noise_dim: int = opt(16, "size of the noise vector", min=1)
    width: int = opt(32, "channels of the generator's CNN", min=1)
    w_smooth: float = opt(0.1, "weight of the displacement smoothness penalty", min=0)
    w_magnitude: float = opt(0.01, "weight of the displacement magnitude penalty", min=0)


def warp(images: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Warp ``images`` (B, C, H, W) float by coarse ``offsets`` (B, 2, g, g) (x, y in grid_sample's
    normalised coordinates), upsampled bicubically to (H, W); the border pixels fill the outside."""
    b, _, h, w = images.shape
    flow = F.interpolate(offsets, size=(h, w), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    theta = torch.eye(2, 3, dtype=images.dtype, device=images.device).expand(b, 2, 3)
    identity = F.affine_grid(theta, [b, 1, h, w], align_corners=False)
    return F.grid_sample(images, identity + flow, mode="bilinear", padding_mode="border", align_corners=False)


def stroke_mix(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``weights`` (B, 3) mix of ``images`` (B, C, H, W), their 3x3 dilation and their 3x3 erosion."""
    dilated = F.max_pool2d(images, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-images, 3, stride=1, padding=1)
    w = weights[:, :, None, None, None]
    return w[:, 0] * images + w[:, 1] * dilated + w[:, 2] * eroded


def displacement_penalties(offsets: torch.Tensor, max_shift: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(smoothness, magnitude) of coarse ``offsets`` (B, 2, g, g), both in units of ``max_shift``:
    the mean squared difference of lattice neighbours and the mean squared offset."""
    d = offsets / max_shift
    smooth = (d[:, :, 1:] - d[:, :, :-1]).pow(2).mean() + (d[:, :, :, 1:] - d[:, :, :, :-1]).pow(2).mean()
    return smooth, d.pow(2).mean()


class DeformNet(nn.Module):
    """Shot (B, C, H, W) in [0, 1] and noise (B, noise_dim) -> offsets (B, 2, g, g) and stroke mix (B, 3).

    The last layers start at zero, so an untrained generator returns its shot unchanged (the stroke
    mix starts at 0.9 on the image itself)."""

    def __init__(self, in_chans: int, o: DeformOptions):
        super().__init__()
        w = o.width
        self.max_shift, self.use_stroke = o.max_shift, o.stroke
        self.encoder = nn.Sequential(
            nn.Conv2d(in_chans, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(o.grid),
        )
        self.noise = nn.Linear(o.noise_dim, w)
        self.head = nn.Sequential(nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.Conv2d(w, 2, 3, padding=1))
        self.stroke = nn.Linear(w, 3)
        for layer in (self.head[-1], self.stroke):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        with torch.no_grad():
            self.stroke.bias[0] = 3.0  # softmax(3, 0, 0) = 0.91 on the image itself

    def forward(self, shots: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = torch.relu(self.encoder(shots) + self.noise(noise)[:, :, None, None])
        offsets = self.max_shift * torch.tanh(self.head(h))
        mix = torch.softmax(self.stroke(h.mean((2, 3))), dim=1)
        return offsets, mix

    def deform(self, shots: torch.Tensor, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(images (B, C, H, W) in [0, 1], offsets (B, 2, g, g)) for float shots and noise."""
        offsets, mix = self(shots, noise)
        out = warp(shots, offsets)
        if self.use_stroke:
            out = stroke_mix(out, mix)
        return out.clamp(0, 1), offsets


class DeformGenerator(EpisodicGenerator):
    """The trained deformation generator: :meth:`fit` on base classes through a frozen backbone,
    then :meth:`generate` images of any shots (:class:`~fewgen.generators.episodic.EpisodicGenerator`)."""

    family = "deform"
    options_class = DeformOptions

    def __init__(self, in_chans: int, options: DeformOptions | None = None):
        options = options or DeformOptions()
        super().__init__(in_chans, options, lambda: DeformNet(in_chans, options))

    def noise(self, n_images: int, g: torch.Generator) -> torch.Tensor:
        return torch.randn(n_images, self.options.noise_dim, generator=g)

    def make_images(self, sources, source_feats, exclude, noise):
        o = self.options
        images, offsets = self.net.deform(sources, noise)
        smooth, magnitude = displacement_penalties(offsets, o.max_shift)
        return images, {"smooth": o.w_smooth * smooth, "magnitude": o.w_magnitude * magnitude}


__all__ = ["DeformGenerator", "DeformNet", "DeformOptions", "displacement_penalties", "stroke_mix", "warp"]
