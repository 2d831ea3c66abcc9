"""Conv-4 (Vinyals et al. 2016; Snell et al. 2017): four conv-BN-ReLU-maxpool blocks."""

from __future__ import annotations

import torch
from torch import nn

from fewgen.backbones.registry import BACKBONES


def conv_block(cin: int, cout: int, pool: bool = True) -> nn.Sequential:
    layers = [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Conv4(nn.Module):
    """Conv-4 with global average pooling at the end, so any input size >= 16 works.

    At 28x28 the map after four pools is 1x1, so this is the classic 64-d embedding.
    """

    def __init__(self, in_chans: int = 3, hidden: int = 64, out_channels: int = 64, depth: int = 4):
        super().__init__()
        chans = [in_chans] + [hidden] * (depth - 1) + [out_channels]
        self.blocks = nn.Sequential(*[conv_block(chans[i], chans[i + 1]) for i in range(depth)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = out_channels

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Feature maps after each block (for multi-level perceptual features)."""
        maps = []
        for b in self.blocks:
            x = b(x)
            maps.append(x)
        return maps

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: images (B, C, H, W) -> features (B, num_features)."""
        return self.pool(self.blocks(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(x)


@BACKBONES.register("conv4")
def conv4(in_chans: int = 3, **kwargs) -> Conv4:
    return Conv4(in_chans=in_chans, **kwargs)


@BACKBONES.register("conv4-wide")
def conv4_wide(in_chans: int = 3, **kwargs) -> Conv4:
    kwargs.setdefault("hidden", 128)
    kwargs.setdefault("out_channels", 256)
    return Conv4(in_chans=in_chans, **kwargs)
