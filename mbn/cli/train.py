"""``mbn-train [overrides]``: one training run, or a sweep with ``-m`` (Hydra multirun).

Examples::

    mbn-train norm=mbn data.batch_size=2 epochs=30
    mbn-train -m norm=bn,gn,brn,mbn data.batch_size=2,4,8,16,32 seed=0,1,2
    mbn-train -m experiment=demo

Each job runs in a deterministic dir (``<output_root>/runs/<overrides>`` or
``<output_root>/sweeps/<sweep_name>/<overrides>``). Rerunning a command skips jobs whose
``results.json`` says ``completed`` for the same config hash, and resumes the others from their
``last.ckpt``. Exit code: 0 when every job completed (or was skipped), 1 if one failed, 2 for an
invalid config, 3 if one diverged, 130 when interrupted.
"""

from __future__ import annotations

import logging
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from mbn.cli.config import CONFIG_DIR, ConfigError, resolve, run_spec, validate
from mbn.results import RESULTS_FILENAME, config_hash, read_results

log = logging.getLogger("mbn.cli")

EXIT_CODES = {"completed": 0, "skipped": 0, "failed": 1, "config_error": 2, "diverged": 3, "interrupted": 130}
# Run artifacts moved aside (to .replaced/<old hash>/) when a dir holds a run of another config.
_RUN_ARTIFACTS = (RESULTS_FILENAME, "checkpoints", "csv", "tensorboard", "wandb")

# Statuses of the jobs run in this process (Hydra's basic launcher runs a sweep's jobs in-process).
_job_statuses: list[tuple[str, str]] = []


def prepare_output_dir(output_dir: Path, new_hash: str) -> str | None:
    """Decide what a (re)run in ``output_dir`` does, before anything heavy is imported.

    Returns ``"completed"`` when the dir already holds a completed run of this config (skip it).
    A run of a different config (older defaults, edited experiment) is moved to
    ``.replaced/<its hash>/`` so it can neither be resumed nor be mistaken for this run's result.
    Otherwise returns the earlier status (``running``/``failed``/...: resumed from ``last.ckpt``)
    or None for a fresh dir.

    Args:
        output_dir: the job's dir.
        new_hash: config hash of this job.
    """
    results_path = output_dir / RESULTS_FILENAME
    if not results_path.exists():
        return None
    try:
        previous = read_results(results_path)
        old_hash, status = previous.get("config_hash"), previous.get("status")
    except (OSError, ValueError):
        old_hash, status = "unreadable", None
    if old_hash == new_hash:
        return status
    target = output_dir / ".replaced" / str(old_hash)
    target.mkdir(parents=True, exist_ok=True)
    for name in _RUN_ARTIFACTS:
        if (output_dir / name).exists():
            shutil.move(str(output_dir / name), str(target / name))
    log.warning("%s held a run of another config (hash %s); moved it to %s", output_dir, old_hash, target)
    return None


def run_job(cfg: DictConfig) -> str:
    """Validate, then skip, resume or start one job; returns its final status.

    Raises:
        ConfigError: invalid config (before any heavy import).
    """
    hydra_cfg = HydraConfig.get()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    overrides = list(hydra_cfg.overrides.task)
    config = resolve(cfg)
    validate(config)
    digest = config_hash(config)
    previous = prepare_output_dir(output_dir, digest)
    if previous == "completed":
        print(f"mbn-train: skipped {output_dir} (already completed, config hash {digest})", flush=True)
        return "skipped"

    spec = run_spec(config, output_dir, output_dir.name, overrides, digest)
    _check_buildable(spec)

    from mbn.train.run import train  # Lightning import: only once the config is known to be good

    _quiet_lightning()
    results = train(spec)
    status = results["status"]
    metrics = results.get("metrics") or {}
    summary = f"mbn-train: {status} {output_dir}"
    if metrics.get("final_val_acc1") is not None:
        summary += f": final val acc1 {metrics['final_val_acc1']:.4f}, best {metrics['best_val_acc1']:.4f} (epoch {metrics['best_epoch']})"
    summary += f", {results.get('wall_time_s', 0):.1f} s"
    if results.get("error"):
        summary += f" - {results['error']}"
    print(summary, flush=True)
    return status


def _quiet_lightning() -> None:
    """Drop Lightning messages that are noise for these runs (the metrics are logged per epoch on purpose)."""
    warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\)` is deprecated.*")
    # Expected when resuming: last.ckpt and best.ckpt are already there.
    warnings.filterwarnings("ignore", message=r"Checkpoint directory .* exists and is not empty")
    rank_zero_logger = logging.getLogger("pytorch_lightning.utilities.rank_zero")
    if not any(isinstance(f, _DropAdverts) for f in rank_zero_logger.filters):
        rank_zero_logger.addFilter(_DropAdverts())


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def _check_buildable(spec: Any) -> None:
    """Build the norm factory and the model once on the CPU to turn bad knobs into a ConfigError."""
    from mbn.models import build_model
    from mbn.nn import norm_layer

    try:
        factory = norm_layer(spec.norm.name, **spec.norm.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError("norm", str(exc)) from None
    try:
        build_model(spec.model.name, num_classes=2, norm_layer=factory, width=spec.model.width, **spec.model.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError("model/norm", str(exc)) from None


def _remove_if_only_bookkeeping(output_dir: Path) -> None:
    # Hydra creates the job dir (.hydra/, <job>.log) before the config is checked; an invalid
    # config should not leave an empty run dir behind.
    entries = list(output_dir.iterdir()) if output_dir.is_dir() else []
    if entries and all(p.name == ".hydra" or (p.suffix == ".log" and p.is_file()) for p in entries):
        shutil.rmtree(output_dir, ignore_errors=True)


@hydra.main(config_path=str(CONFIG_DIR), config_name="train", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    try:
        status = run_job(cfg)
    except ConfigError as exc:
        print(f"mbn-train: invalid config: {exc}", file=sys.stderr, flush=True)
        _remove_if_only_bookkeeping(Path(HydraConfig.get().runtime.output_dir))
        raise SystemExit(EXIT_CODES["config_error"]) from None
    _job_statuses.append((status, HydraConfig.get().runtime.output_dir))
    if status == "interrupted":
        # Stop the whole sweep: the user (or the scheduler) asked to stop.
        raise SystemExit(EXIT_CODES["interrupted"])


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point (``mbn-train``).

    Args:
        argv: command-line arguments without the program name; None = ``sys.argv[1:]``.

    Returns:
        The exit code (see the module docstring).
    """
    _job_statuses.clear()
    saved_argv = sys.argv
    if argv is not None:
        sys.argv = [saved_argv[0] if saved_argv else "mbn-train", *argv]
    try:
        _hydra_main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if code != 0:
            return code
    finally:
        sys.argv = saved_argv
    if len(_job_statuses) > 1:
        counts: dict[str, int] = {}
        for status, _ in _job_statuses:
            counts[status] = counts.get(status, 0) + 1
        print("mbn-train: sweep done: " + ", ".join(f"{n} {status}" for status, n in sorted(counts.items())), flush=True)
        for status, output_dir in _job_statuses:
            if status not in ("completed", "skipped"):
                print(f"mbn-train:   {status}: {output_dir}", flush=True)
    return max((EXIT_CODES.get(status, 1) for status, _ in _job_statuses), default=0)


if __name__ == "__main__":
    sys.exit(main())
