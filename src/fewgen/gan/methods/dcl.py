"""DCL: "A Closer Look at Few-shot Image Generation" (Zhao, Ding, Huang and Cheung, CVPR 2022).

Dual contrastive learning keeps the adapted generator G_t's samples tied to the source
generator G_s's, which slows the loss of diversity while quality converges. With
``sim(u, v) = u.v / (|u||v|)`` on flattened features and temperature ``tau = 0.07``:

Generator side (Eq. 2), at a generator layer ``l`` drawn at random each iteration, for a
batch of latents ``z_1..z_N``: the positive of ``G_t^l(z_i)`` is ``G_s^l(z_i)`` (the same z
through the source generator), the negatives are ``G_s^l(z_j), j != i``:

    L_CL1 = -1/N sum_i log( exp(sim(G_t^l(z_i), G_s^l(z_i))/tau) / sum_j exp(sim(G_t^l(z_i), G_s^l(z_j))/tau) )

Discriminator side (Eq. 3), on D's features at a layer ``m`` drawn at random: the positive
of ``D^m(G_t(z_i))`` is ``D^m(G_s(z_i))``, the negatives are the real target images ``x_k``:

    L_CL2 = -1/N sum_i log( exp(s_ii^+/tau) / (exp(s_ii^+/tau) + sum_k exp(sim(D^m(G_t(z_i)), D^m(x_k))/tau)) )

Total (Eq. 4): ``L_adv + lambda1 L_CL1 + lambda2 L_CL2`` with lambda1 = 2, lambda2 = 0.5.
Our reading of who minimises what: G minimises ``L_adv^G + lambda1 L_CL1 + lambda2 L_CL2``
(CL2 reaches G through G_t(z_i)); D minimises ``L_adv^D + lambda2 L_CL2`` on detached
samples (CL2 shapes its feature space); G_s is frozen.

Two variants isolate the parts, for the ablation the paper's analysis calls for:

* ``dcl-g``: D does *not* minimise L_CL2 (it is a loss for G only, measured in D's
  adversarially trained feature space);
* ``dcl-cl1``: the generator-side term alone (lambda2 = 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fewgen.gan.model import GAN_METHODS, AdaptMethod, AdaptStep, ns_d_loss, ns_g_loss
from fewgen.options import opt


@dataclass
class DCLOptions:
    """DCL's options (``gan.*`` keys)."""

    dcl_lambda1: float = opt(2.0, "DCL: weight of the generator-side contrastive loss", min=0)
    dcl_lambda2: float = opt(0.5, "DCL: weight of the discriminator-side contrastive loss", min=0)
    dcl_temperature: float = opt(0.07, "DCL: contrastive temperature", gt=0)


def generator_contrastive_loss(adapted_feats: torch.Tensor, source_feats: torch.Tensor,
                               temperature: float = 0.07) -> torch.Tensor:
    """L_CL1: InfoNCE with the same latent through G_s as positive, other latents' G_s features as negatives.

    Args:
        adapted_feats: G_t features of N latents, shape (N, ...).
        source_feats: G_s features of the same latents, shape (N, ...).
    Returns:
        cross-entropy of the (N, N) cosine-similarity / temperature matrix with the diagonal as targets.
    """
    a = F.normalize(adapted_feats.flatten(1), dim=1)
    s = F.normalize(source_feats.flatten(1), dim=1)
    logits = a @ s.T / temperature
    return F.cross_entropy(logits, torch.arange(len(a), device=a.device))


def discriminator_contrastive_loss(adapted_feats: torch.Tensor, source_feats: torch.Tensor, real_feats: torch.Tensor,
                                   temperature: float = 0.07) -> torch.Tensor:
    """L_CL2: InfoNCE with D's features of the source image of the same latent as positive, real images as negatives.

    Args:
        adapted_feats: D features of G_t(z_i), shape (N, ...).
        source_feats: D features of G_s(z_i), shape (N, ...).
        real_feats: D features of M real target images, shape (M, ...).
    Returns:
        mean over i of -log softmax([s(a_i, s_i), s(a_i, r_1..r_M)] / temperature)[0].
    """
    a = F.normalize(adapted_feats.flatten(1), dim=1)
    s = F.normalize(source_feats.flatten(1), dim=1)
    r = F.normalize(real_feats.flatten(1), dim=1)
    logits = torch.cat([(a * s).sum(1, keepdim=True), a @ r.T], dim=1) / temperature
    return F.cross_entropy(logits, torch.zeros(len(a), dtype=torch.long, device=a.device))


@GAN_METHODS.register("dcl")
@dataclass
class DCL(AdaptMethod):
    """Dual contrastive learning on top of fine-tuning (Zhao et al. 2022)."""

    lambda1: float = 2.0
    lambda2: float = 0.5
    temperature: float = 0.07
    d_side: bool = True  # D minimises lambda2 * L_CL2 as well
    name = "dcl"
    options = {"lambda1": "dcl_lambda1", "lambda2": "dcl_lambda2", "temperature": "dcl_temperature"}

    def _d_layer(self, s: AdaptStep) -> int:
        return int(torch.randint(0, len(s.D.blocks), (1,), generator=s.rng))

    def _cl2(self, s: AdaptStep, fake: torch.Tensor, source: torch.Tensor, layer: int,
             real_feats: list[torch.Tensor] | None = None) -> torch.Tensor:
        """L_CL2 at D layer ``layer``; without ``real_feats`` (the G step) only the anchor carries gradients."""
        if real_feats is None:
            with torch.no_grad():
                real_feats = s.D.features(s.real)
                source_feats = s.D.features(source)
        else:
            source_feats = s.D.features(source)
        return discriminator_contrastive_loss(s.D.features(fake)[layer], source_feats[layer],
                                              real_feats[layer], self.temperature)

    def d_losses(self, s: AdaptStep) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            fake, source = s.G(s.z), s.G_src(s.z)
        real_logits, real_feats = s.D(s.real, return_features=True)
        adv = ns_d_loss(real_logits, s.D(fake))
        if not self.d_side or self.lambda2 == 0:
            return {"adv": adv}
        return {"adv": adv, "cl2": self.lambda2 * self._cl2(s, fake, source, self._d_layer(s), real_feats)}

    def g_losses(self, s: AdaptStep) -> dict[str, torch.Tensor]:
        fake, feats_t = s.G(s.z, return_features=True)
        with torch.no_grad():
            source, feats_s = s.G_src(s.z, return_features=True)
        layer = int(torch.randint(0, len(feats_t), (1,), generator=s.rng))
        cl1 = generator_contrastive_loss(feats_t[layer], feats_s[layer], self.temperature)
        losses = {"adv": ns_g_loss(s.D(fake)), "cl1": self.lambda1 * cl1}
        if self.lambda2 != 0:
            losses["cl2"] = self.lambda2 * self._cl2(s, fake, source, self._d_layer(s))
        return losses


@GAN_METHODS.register("dcl-g")
@dataclass
class DCLGeneratorOnly(DCL):
    """DCL with L_CL2 minimised by G only; D trains on the adversarial loss alone."""

    d_side: bool = False
    name = "dcl-g"


@GAN_METHODS.register("dcl-cl1")
@dataclass
class DCLGeneratorSide(DCL):
    """DCL's generator-side term alone (lambda2 = 0): fine-tuning plus L_CL1."""

    lambda2: float = 0.0
    name = "dcl-cl1"
    options = {"lambda1": "dcl_lambda1", "temperature": "dcl_temperature"}
