"""A fusion generator trained through the few-shot classifier: the shot fused patch-wise with
drawings of the base classes nearest to it.

Family (b) of issue 27, after IDeMe-Net (Chen et al., "Image Deformation Meta-Networks for One-Shot
Learning", CVPR 2019): a "probe" image (the shot) and a "gallery" image (a drawing of a base class)
are read by a small CNN that predicts a ``grid x grid`` lattice of weights ``w`` in (0, 1); the image is

    G(x, g) = W * x + (1 - W) * g,        W = w upsampled to (H, W) by nearest neighbour (patches)

so each patch is a blend of the shot's and the gallery drawing's pixels. The gallery drawing is the
randomness: a random image of one of the ``neighbours`` base classes whose mean feature is nearest
(cosine) the shot's, through the frozen backbone. On base episodes the episode's own classes are
never drawn, as on novel classes, where the gallery can never hold the shot's class.

It is trained like every family of :mod:`fewgen.generators.episodic`: through the frozen backbone,
by the query cross-entropy of prototypes that mix each shot with the mean of its fused images. The
weights start near the shot (``sigmoid(2) = 0.88`` everywhere).

    gen = FusionGenerator(1, FusionOptions(steps=1500)).fit(backbone, base)
    images = gen.generate(shots, per_shot=20, seed=0, backbone=backbone)   # uint8, shot-major
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.data.base import ArrayDataset
from fewgen.errors import FewgenError
from fewgen.generators.episodic import EpisodicGenerator, EpisodicOptions
from fewgen.options import opt


@dataclass
class FusionOptions(EpisodicOptions):
    """How the fusion generator is built and trained (``fewgen.generators.fusion``); the training
    fields are :class:`~fewgen.generators.episodic.EpisodicOptions`'."""

    grid: int = opt(3, "side of the patch lattice whose weights are predicted (IDeMe-Net: 3)", min=1)
    neighbours: int = opt(5, "base classes nearest the shot (mean feature, cosine) the gallery drawings come from",
                          min=1)
    width: int = opt(32, "channels of the weight network's CNN", min=1)
    start: float = opt(2.0, "initial logit of every patch weight (2.0: 88% shot)")


class FusionNet(nn.Module):
    """(probe, gallery) (B, C, H, W) each, in [0, 1] -> patch weights (B, 1, grid, grid) in (0, 1)."""

    def __init__(self, in_chans: int, o: FusionOptions):
        super().__init__()
        w = o.width
        self.encoder = nn.Sequential(
            nn.Conv2d(2 * in_chans, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(o.grid),
        )
        self.head = nn.Conv2d(w, 1, 1)
        nn.init.zeros_(self.head.weight)
        nn.init.constant_(self.head.bias, o.start)

    def forward(self, probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.head(self.encoder(torch.cat([probe, gallery], 1))))

    def fuse(self, probe: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
        weights = F.interpolate(self(probe, gallery), size=probe.shape[-2:], mode="nearest")
        return weights * probe + (1 - weights) * gallery


class FusionGenerator(EpisodicGenerator):
    """The trained fusion generator (module docstring). After :meth:`fit` (or, for a loaded one,
    :meth:`prepare` with the backbone and base set it was trained on), :meth:`generate` needs the
    backbone, which finds each shot's nearest base classes."""

    family = "fusion"
    options_class = FusionOptions

    def __init__(self, in_chans: int, options: FusionOptions | None = None):
        options = options or FusionOptions()
        super().__init__(in_chans, options, lambda: FusionNet(in_chans, options))
        self.gallery: ArrayDataset | None = None

    def prepare(self, backbone: nn.Module, base: ArrayDataset) -> None:
        """Read the base classes through the frozen backbone: their mean features (the neighbours)
        and their images (the gallery)."""
        from fewgen.evaluation.features import extract_features

        labels = base.labels
        classes = labels.unique()
        if not torch.equal(classes, torch.arange(len(classes))):
            raise FewgenError("the fusion generator's base classes must be labelled 0 .. C-1")
        if self.options.neighbours > len(classes) - self.options.n_way:
            raise FewgenError(f"fusion: neighbours={self.options.neighbours} base classes besides an episode's "
                              f"n_way={self.options.n_way}, but the base set has {len(classes)}; lower neighbours")
        feats = F.normalize(extract_features(backbone.eval(), base, device=next(backbone.parameters()).device), dim=-1)
        by_class = [torch.nonzero(labels == c).squeeze(1) for c in classes.tolist()]
        self.means = F.normalize(torch.stack([feats[ix].mean(0) for ix in by_class]), dim=-1)
        self.counts = torch.tensor([len(ix) for ix in by_class])
        self.table = nn.utils.rnn.pad_sequence(by_class, batch_first=True)
        self.gallery = base

    def noise(self, n_images: int, g: torch.Generator) -> torch.Tensor:
        # per image: which of the nearest classes, which of its drawings
        return torch.rand(n_images, 2, generator=g)

    def gallery_images(self, source_feats: torch.Tensor, exclude: torch.Tensor | None,
                       noise: torch.Tensor) -> torch.Tensor:
        """The gallery drawing (B, C, H, W) float of each row: of the ``neighbours`` base classes
        nearest its shot's features (the ``exclude`` classes left out), the one ``noise[:, 0]``
        picks, its image ``noise[:, 1]`` picks."""
        if self.gallery is None:
            raise FewgenError("the fusion generator reads the base classes first: fit it, or call prepare(backbone, "
                              "base) with the backbone and base set it was trained on")
        if source_feats is None:
            raise FewgenError("the fusion generator finds each shot's nearest base classes through the backbone: "
                              "pass backbone= to generate")
        sims = F.normalize(source_feats, dim=-1) @ self.means.T
        if exclude is not None:
            sims[:, exclude] = -2.0
        near = sims.topk(self.options.neighbours, dim=1).indices
        rows = torch.arange(len(near))
        cls = near[rows, (noise[:, 0] * self.options.neighbours).long().clamp(max=self.options.neighbours - 1)]
        pick = (noise[:, 1] * self.counts[cls]).long().clamp(max=self.counts[cls] - 1)
        return self.gallery.float_images(self.table[cls, pick])

    def make_images(self, sources, source_feats, exclude, noise):
        return self.net.fuse(sources, self.gallery_images(source_feats, exclude, noise)), {}


__all__ = ["FusionGenerator", "FusionNet", "FusionOptions"]
