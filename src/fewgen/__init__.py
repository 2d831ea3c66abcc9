"""fewgen: few-shot image classification with generated training data.

``import fewgen`` stays light: it pulls in torch and NumPy, never diffusers, transformers,
the training loops or the CLI. The public API lives in the subpackages, which follow the
pipeline: ``fewgen.data`` -> ``fewgen.backbones`` / ``fewgen.pretrain`` ->
``fewgen.generators`` -> ``fewgen.synthesis`` -> ``fewgen.learners`` -> ``fewgen.evaluation``
-> ``fewgen.reports``. ``fewgen.app.runner.run`` runs a whole config, as ``fewgen run`` does.
"""

__version__ = "0.1.0"

from fewgen.errors import FewgenError  # noqa: E402


def load_classifier(path, device="cpu"):
    """An exported classifier folder (``<run>/classifier``): ``load_classifier(p).predict(images)``."""
    from fewgen.classifier import load_classifier as load

    return load(path, device)


__all__ = ["FewgenError", "__version__", "load_classifier"]
