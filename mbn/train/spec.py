"""Plain descriptions of one training run: what ``mbn.cli`` builds from a Hydra config.

Nothing here knows about Hydra; tests and scripts can build a :class:`RunSpec` by hand.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class DataSpec:
    """Dataset and batching.

    Args:
        kind: dataset kind for :func:`mbn.data.load_dataset` (``cifar10_archive``, ``fake``, ...).
        source: keyword arguments for that kind (archive path, root, sizes, ...).
        batch_size: per-device (= normalization) batch size m.
        eval_batch_size: batch size for validation (does not affect results: eval uses running statistics).
        train_subset: use only this many training images (stratified); ``None`` = all.
        test_subset: use only this many test images; ``None`` = all.
        subset_seed: which images the subsets take.
        augment: random crop (with ``crop_padding``) and horizontal flip on training batches.
        crop_padding: zero padding before the random crop.
        cache_dir: decoded-dataset cache for kinds that take one (``None`` = :mod:`mbn.data`'s default).
    """

    kind: str
    source: dict[str, Any] = field(default_factory=dict)
    batch_size: int = 32
    eval_batch_size: int = 500
    train_subset: int | None = None
    test_subset: int | None = None
    subset_seed: int = 0
    augment: bool = True
    crop_padding: int = 4
    cache_dir: str | None = None


@dataclass
class ModelSpec:
    """Backbone (see :func:`mbn.models.build_model`).

    Args:
        name: one of :data:`mbn.models.MODEL_NAMES`.
        width: base channels.
        options: further keyword arguments for ``build_model`` (e.g. ``zero_init_residual``).
    """

    name: str
    width: int = 64
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class NormSpec:
    """Normalization layer (see :func:`mbn.nn.norm_layer`).

    Args:
        name: one of :data:`mbn.nn.NORM_NAMES`.
        options: keyword arguments for ``norm_layer`` (e.g. ``num_groups``, ``ideal_batch_size``).
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimSpec:
    """SGD with linear lr scaling and a step or cosine schedule over the whole run.

    Args:
        base_lr: lr at ``reference_batch_size``; the run uses ``base_lr * global_batch / reference_batch_size``.
        reference_batch_size: batch size at which ``base_lr`` applies.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty.
        decay_norm_params: apply weight decay to norm-layer parameters and biases too (the paper does).
        schedule: ``step`` (multiply by ``gamma`` at each milestone) or ``cosine`` (to zero).
        milestones: fractions of training, in (0, 1), at which the step schedule decays.
        gamma: step decay factor.
        warmup_epochs: linear warmup length in epochs (fractional allowed).
    """

    base_lr: float = 0.1
    reference_batch_size: int = 64
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    decay_norm_params: bool = True
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.3, 0.6, 0.9)
    gamma: float = 0.1
    warmup_epochs: float = 0.0

    def lr(self, global_batch_size: int) -> float:
        """Peak learning rate for a global batch size (linear scaling rule)."""
        return self.base_lr * global_batch_size / self.reference_batch_size


@dataclass
class TrainerSpec:
    """Lightning Trainer settings.

    Args:
        accelerator: ``cpu``, ``gpu``, ``auto``, ...
        devices: devices per node (DDP when > 1; ``data.batch_size`` stays per device).
        num_nodes: nodes.
        strategy: Lightning strategy name (``auto``, ``ddp``, ``ddp_spawn``, ...).
        precision: Lightning precision (``32-true``, ``bf16-mixed``, ...).
        benchmark: ``torch.backends.cudnn.benchmark``.
        num_threads: ``torch.set_num_threads`` when set.
        progress_bar: Lightning's progress bar; ``None`` = only when stdout is a terminal.
        check_finite_every_n_steps: how often (in steps) the summed training loss is checked for NaN/inf.
        compile: ``torch.compile`` the model in place (``nn.Module.compile``: state_dict keys and
            checkpoints stay the same). Pays a one-off compile time per run; at small batch sizes it
            removes most of MBN's per-op overhead (BENCHMARKS.md).
    """

    accelerator: str = "cpu"
    devices: int = 1
    num_nodes: int = 1
    strategy: str = "auto"
    precision: str = "32-true"
    benchmark: bool = False
    num_threads: int | None = None
    progress_bar: bool | None = None
    check_finite_every_n_steps: int = 25
    compile: bool = False

    @property
    def world_size(self) -> int:
        """Number of processes (devices x nodes)."""
        return self.devices * self.num_nodes


@dataclass
class WandbSpec:
    """Weights & Biases logging (one W&B run per training run).

    Args:
        project: W&B project.
        entity: W&B entity (team/user); ``None`` = the default one.
        offline: write runs locally only (``wandb sync`` uploads them later).
        job_type: W&B job type.
        tags: extra tags (norm, batch size, model and dataset tags are always added).
    """

    project: str = "mbn"
    entity: str | None = None
    offline: bool = True
    job_type: str = "train"
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerSpec:
    """Which metric loggers run (CSV always does).

    Args:
        wandb: W&B settings, or ``None`` for no W&B.
        tensorboard: write TensorBoard event files.
    """

    wandb: WandbSpec | None = None
    tensorboard: bool = False


@dataclass
class RunSpec:
    """Everything one training run needs.

    Args:
        data: dataset and batching.
        model: backbone.
        norm: normalization layer.
        optim: optimizer and schedule.
        trainer: Lightning trainer settings.
        loggers: metric loggers.
        seed: global seed (0 is valid).
        epochs: planned epochs T (schedules stretch over it).
        output_dir: the run's directory (checkpoints, logs, ``results.json``).
        run_name: short name (W&B run name, log lines).
        sweep_name: sweep this run belongs to (W&B group).
        config: the resolved config, recorded verbatim in ``results.json``.
        config_hash: :func:`mbn.results.config_hash` of ``config``.
        overrides: the command-line overrides of this run.
    """

    data: DataSpec
    model: ModelSpec
    norm: NormSpec
    optim: OptimSpec = field(default_factory=OptimSpec)
    trainer: TrainerSpec = field(default_factory=TrainerSpec)
    loggers: LoggerSpec = field(default_factory=LoggerSpec)
    seed: int = 0
    epochs: int = 1
    output_dir: Path = Path("outputs/run")
    run_name: str = "run"
    sweep_name: str = "default"
    config: dict[str, Any] = field(default_factory=dict)
    config_hash: str = ""
    overrides: list[str] = field(default_factory=list)

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all devices."""
        return self.data.batch_size * self.trainer.world_size
