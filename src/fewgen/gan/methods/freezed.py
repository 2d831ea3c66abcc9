"""TGAN and FreezeD: fine-tuning a pretrained GAN on a few target images.

- TGAN, "Transferring GANs: generating images from limited data" (Wang et al., ECCV 2018):
  initialise G and D from the source GAN and fine-tune both with the adversarial loss only,
  ``min_G max_D E[log D(x)] + E[log(1 - D(G(z)))]`` (here its non-saturating form).
- FreezeD, "Freeze the Discriminator: a Simple Baseline for Fine-Tuning GANs"
  (Mo, Cho and Shin, CVPR-W 2020): the same, with the discriminator's first ``layers``
  blocks frozen (their lower-level features are kept from the source domain); only the
  upper blocks and the head are fine-tuned.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from fewgen.gan.model import GAN_METHODS, AdaptMethod, Discriminator
from fewgen.options import opt


@dataclass
class FreezeDOptions:
    """FreezeD's option (``gan.*`` keys)."""

    freezed_layers: int = opt(2, "FreezeD: discriminator blocks frozen from the input side", min=0)


@GAN_METHODS.register("tgan")
@dataclass
class TGAN(AdaptMethod):
    """Plain fine-tuning of G and D (Wang et al. 2018)."""

    name = "tgan"


@GAN_METHODS.register("freezed")
@dataclass
class FreezeD(AdaptMethod):
    """Fine-tuning with D's first ``layers`` blocks frozen (Mo et al. 2020).

    ``layers`` counts D's blocks from the input: ``from_image`` is block 0, then each
    downsampling block; the final head always trains.
    """

    layers: int = 2
    name = "freezed"
    options = {"layers": "freezed_layers"}

    def trainable_d_parameters(self, D: Discriminator) -> list[nn.Parameter]:
        blocks = D.layers()
        if not 0 <= self.layers < len(blocks):
            from fewgen.errors import FewgenError

            raise FewgenError(f"FreezeD layers={self.layers} must be in [0, {len(blocks) - 1}] for this discriminator")
        frozen = {id(p) for b in blocks[: self.layers] for p in b.parameters()}
        return [p for p in super().trainable_d_parameters(D) if id(p) not in frozen]
