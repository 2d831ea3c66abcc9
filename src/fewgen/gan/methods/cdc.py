"""CDC: "Few-shot Image Generation via Cross-domain Correspondence" (Ojha et al., CVPR 2021).

Cross-domain distance consistency (Eq. 3): for a batch of latents ``z_1..z_N`` and a
generator layer ``l`` (drawn at random each iteration), each sample's similarities to the
others form a distribution,

    y_i^{s,l}   = softmax_j( cos(G_s^l(z_i), G_s^l(z_j)) ),  j != i     (source generator)
    y_i^{s->t,l} = softmax_j( cos(G_t^l(z_i), G_t^l(z_j)) ),  j != i     (adapted generator)

and ``L_dist = E_i KL(y_i^{s,l} || y_i^{s->t,l})`` keeps the adapted generator's pairwise
structure that of the source (the paper writes the KL the other way round; the official
code, which produced its numbers, computes ``KLDivLoss(log y^{s->t}, y^s)``, i.e. this
direction, averaged over i). Total generator loss ``L_adv + lambda * L_dist``, lambda = 1000.

Anchor-based patch discriminator (Sec. 3.2): ``n_anchors`` fixed latents define small
anchor regions (``anchor + N(0, anchor_std^2)``). Every ``anchor_every``-th iteration the
latents come from the anchor regions and the image-level adversarial loss is used; in the
other iterations latents are free and only a patch-level discriminator (a 1x1 head on
D's first block) judges them, so only the anchors are pushed to look like whole training images.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from fewgen.gan.model import (
    GAN_METHODS,
    AdaptMethod,
    AdaptStep,
    Discriminator,
    ns_d_loss,
    ns_g_loss,
)
from fewgen.options import opt


def distance_consistency_loss(source_feats: torch.Tensor, adapted_feats: torch.Tensor) -> torch.Tensor:
    """CDC's L_dist for one layer.

    Args:
        source_feats: source-generator features of N latents, shape (N, ...).
        adapted_feats: adapted-generator features of the same latents, shape (N, ...).
    Returns:
        mean over i of KL(softmax_j!=i cos_s(i, j) || softmax_j!=i cos_t(i, j)), a scalar.
    """
    n = source_feats.shape[0]
    if n < 3:
        raise ValueError(f"distance consistency needs at least 3 latents, got {n}")
    off = ~torch.eye(n, dtype=torch.bool, device=source_feats.device)
    s = F.normalize(source_feats.flatten(1), dim=1)
    t = F.normalize(adapted_feats.flatten(1), dim=1)
    log_p_s = F.log_softmax((s @ s.T)[off].view(n, n - 1), dim=1)
    log_p_t = F.log_softmax((t @ t.T)[off].view(n, n - 1), dim=1)
    return (log_p_s.exp() * (log_p_s - log_p_t)).sum(1).mean()


@dataclass
class CDCOptions:
    """CDC's option (``gan.*`` keys)."""

    cdc_weight: float = opt(1000.0, "CDC: weight of the distance-consistency loss", min=0)


@GAN_METHODS.register("cdc")
@dataclass
class CDC(AdaptMethod):
    """Cross-domain correspondence: distance consistency + anchor-based patch discriminator."""

    weight: float = 1000.0
    anchor_every: int = 4
    anchor_std: float = 0.05
    n_anchors: int = 10
    anchor_seed: int = 0
    name = "cdc"
    options = {"weight": "cdc_weight"}

    def trainable_d_parameters(self, D: Discriminator) -> list[nn.Parameter]:
        return list(D.parameters())  # the patch head trains too

    def _latents(self, s: AdaptStep) -> tuple[torch.Tensor, bool]:
        """(z, from anchors?) for this iteration."""
        if s.step % self.anchor_every != 0:
            return s.z, False
        g = torch.Generator().manual_seed(self.anchor_seed)
        anchors = torch.randn(self.n_anchors, s.z.shape[1], generator=g).to(s.z.device)
        pick = torch.randint(0, self.n_anchors, (s.z.shape[0],), generator=s.rng)
        noise = torch.randn(s.z.shape, generator=s.rng).to(s.z.device)
        return anchors[pick] + self.anchor_std * noise, True

    def d_losses(self, s: AdaptStep) -> dict[str, torch.Tensor]:
        z, anchor = self._latents(s)
        with torch.no_grad():
            fake = s.G(z)
        real_logits, real_feats = s.D(s.real, return_features=True)
        fake_logits, fake_feats = s.D(fake, return_features=True)
        if anchor:
            return {"adv": ns_d_loss(real_logits, fake_logits)}
        return {"adv_patch": ns_d_loss(s.D.patch_logits(real_feats), s.D.patch_logits(fake_feats))}

    def g_losses(self, s: AdaptStep) -> dict[str, torch.Tensor]:
        z, anchor = self._latents(s)
        fake, feats_t = s.G(z, return_features=True)
        logits, d_feats = s.D(fake, return_features=True)
        adv = ns_g_loss(logits) if anchor else ns_g_loss(s.D.patch_logits(d_feats))
        layer = int(torch.randint(0, len(feats_t), (1,), generator=s.rng))
        with torch.no_grad():
            _, feats_s = s.G_src(z, return_features=True)
        return {"adv" if anchor else "adv_patch": adv,
                "dist": self.weight * distance_consistency_loss(feats_s[layer], feats_t[layer])}
