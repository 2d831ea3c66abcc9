"""Cross-entropy pretraining on base classes: the RFS / IER baseline (Tian et al. 2020).

loss = CE(f_Phi(backbone(x)), y), with standard augmentation and, for character data, the
90-degree rotations of each base class as extra classes.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from fewgen.pretrain.registry import RECIPES, PretrainContext


@RECIPES.register("ce")
def train_ce(ctx: PretrainContext):
    backbone = ctx.new_backbone()
    head = nn.Linear(backbone.num_features, ctx.num_classes)
    model = nn.ModuleDict({"backbone": backbone, "head": head})
    smoothing = ctx.options.label_smoothing

    def loss_fn(x, y, step):
        return {"ce": F.cross_entropy(head(backbone.forward_features(x)), y, label_smoothing=smoothing)}

    return ctx.train(model, backbone, loss_fn, stage="ce")
