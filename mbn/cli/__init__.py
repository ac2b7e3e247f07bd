"""Command-line entry points: ``mbn-train`` (Hydra configs -> Lightning runs) and ``mbn-compare``."""
