"""Run ``mbn-train`` in this process as its console script would run: with ``sys.argv`` set.

``hydra.main`` reads the command line from ``sys.argv`` and takes no argument list
(facebookresearch/hydra#2064), so the tests, not the product, stand in for the shell here.
"""

from __future__ import annotations

import sys
from typing import Sequence

from omegaconf import DictConfig

from mbn.cli import train
from mbn.cli.schema import load_job, to_run_spec
from mbn.results import config_hash


def mbn_train(argv: Sequence[str]) -> int:
    """``mbn-train ARGV...`` in this process; returns its exit code."""
    saved = sys.argv
    sys.argv = ["mbn-train", *argv]
    try:
        return train.main()
    finally:
        sys.argv = saved


def checked_config(cfg: DictConfig, output_dir: str = "/tmp/mbn-test-run") -> dict:
    """A composed task config (no ``hydra`` node) checked as ``mbn-train`` checks it: the recorded config."""
    job = load_job(cfg)
    to_run_spec(job, output_dir, [], config_hash(job.config))
    return job.config
