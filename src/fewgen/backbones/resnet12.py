"""ResNet-12 as in TADAM / MetaOptNet / RFS: four residual stages of three 3x3 convs,
widths 64-160-320-640, each followed by 2x2 max-pooling, leaky ReLU 0.1."""

from __future__ import annotations

import torch
from torch import nn

from fewgen.backbones.registry import BACKBONES


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, drop_rate: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.act = nn.LeakyReLU(0.1)
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.pool(self.act(self.body(x) + self.shortcut(x))))


class ResNet12(nn.Module):
    def __init__(self, in_chans: int = 3, widths: tuple[int, ...] = (64, 160, 320, 640), drop_rate: float = 0.0):
        super().__init__()
        chans = [in_chans, *widths]
        self.blocks = nn.Sequential(*[BasicBlock(chans[i], chans[i + 1], drop_rate) for i in range(len(widths))])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = widths[-1]

    def forward_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
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


@BACKBONES.register("resnet12")
def resnet12(in_chans: int = 3, **kwargs) -> ResNet12:
    return ResNet12(in_chans=in_chans, **kwargs)


@BACKBONES.register("resnet12-small")
def resnet12_small(in_chans: int = 3, **kwargs) -> ResNet12:
    kwargs.setdefault("widths", (32, 64, 128, 256))
    return ResNet12(in_chans=in_chans, **kwargs)
