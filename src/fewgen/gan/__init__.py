"""Few-shot GAN adaptation: a small GAN, its source pretraining and the adaptation loop
(``model.py``), and the adaptation methods, one file each, registered in ``GAN_METHODS`` beside
their definitions with their options (``methods/freezed.py``: TGAN, FreezeD; ``methods/cdc.py``;
``methods/dcl.py``)."""

from fewgen.gan import model  # noqa: F401
from fewgen.gan.methods import cdc, dcl, freezed  # noqa: F401  (registration)
from fewgen.gan.model import GAN_METHODS, create_adapter

__all__ = ["GAN_METHODS", "create_adapter"]
