"""mbn: Momentum Batch Normalization and a small-batch normalization study framework.

Layers (``mbn.nn``) and models (``mbn.models``) depend on PyTorch only; ``mbn.train`` adds
Lightning; only ``mbn.cli`` composes Hydra configs.
"""

__version__ = "0.1.0"
