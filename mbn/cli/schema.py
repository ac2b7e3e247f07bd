"""The config's schema: :mod:`mbn.train.spec`'s dataclasses registered in Hydra's ConfigStore.

``configs/train.yaml`` extends :class:`TrainConfig` and every group option extends its schema
(``configs/norm/gn.yaml`` starts with ``defaults: [/schema/norm/gn@_here_]``), so the defaults
live in the dataclasses only and OmegaConf checks types, unknown keys and missing values while
Hydra composes. :func:`to_run_spec` then builds the :class:`~mbn.train.spec.RunSpec` with
``OmegaConf.to_object``, which runs every schema's own rules; a broken rule comes back as a
:class:`~mbn.cli.config.ConfigError` naming the full dotted key.

The group options' schemas are :data:`mbn.train.spec.GROUP_SCHEMAS`, registered by their classes;
nothing here lists them again.
"""

from __future__ import annotations

import os
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from mbn.cli.config import ConfigError, unknown_key_error
from mbn.results import METRIC_KEYS
from mbn.train import spec as specs

# Top-level keys that steer mbn-train itself (what to do with a job), not the run: they are taken out
# of the config before it is hashed and recorded, so they never make a finished run look different.
CONTROL_KEYS = ("dry_run", "rerun_diverged", "debug", "stack", "stack_key", "stack_values", "stack_path", "objective")
# The keys along which a sweep packs jobs into stacked models (the first one swept): a stack's members
# may differ in these only (mbn.train.run.check_stackable).
PACK_KEYS = ("seed", "optim.base_lr", "optim.weight_decay")
# stack=auto: the sweep probes which K to stack (mbn.cli.sweep.plan_auto_stack).
STACK_AUTO = "auto"
# stack_path: StackedConv2d's paths, or each layer's faster one from the probe.
STACK_PATHS = ("grouped", "dense", "auto")
# The metrics of results.json a sweep can optimize (``objective``); best_epoch says when, not how well.
OBJECTIVES = tuple(name for name in METRIC_KEYS if name != "best_epoch")


@dataclass
class DebugConfig:
    """Fault injection for tests of sweeps and interruptions.

    Args:
        fail_at_epoch: the run raises when this epoch starts (null = never).
        hold_at_epoch: the run waits when this epoch starts, until it is signalled (at most
            :data:`mbn.train.callbacks.HOLD_SECONDS`), so a test can stop it at a known point (null = never).
    """

    fail_at_epoch: int | None = None
    hold_at_epoch: int | None = None

    def __post_init__(self) -> None:
        for name in ("fail_at_epoch", "hold_at_epoch"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise specs.SpecError(name, f"must be a positive integer or null, got {value!r}")


@dataclass
class PathsConfig:
    """Where things live on this machine; left out of the config hash, so moving them reruns nothing.

    Args:
        data_root: the folder holding the datasets (default: ``$MBN_DATA_ROOT``, else ``../shared/data``
            beside a checkout, ``./data`` for an installed package: :func:`mbn.cli.config.default_data_root`).
        cache_dir: decoded-dataset cache; null = ``$MBN_CACHE_DIR`` or ``~/.cache/mbn``.
    """

    data_root: str = "${oc.env:MBN_DATA_ROOT,${mbn.default_data_root:}}"
    cache_dir: str | None = None


@dataclass
class TrainConfig:
    """The composed ``mbn-train`` config (``configs/train.yaml`` picks the group options).

    Args:
        data: dataset and batching (the ``data`` group).
        model: backbone (the ``model`` group).
        norm: normalization layer (the ``norm`` group).
        optim: optimizer and lr schedule (the ``optim`` group).
        trainer: Lightning trainer (the ``trainer`` group).
        logger: the selected loggers by name (the ``logger`` group, a list; csv is always on).
        seed: global seed.
        epochs: planned epochs T; the lr schedule and the MBN schedule are stretched over it.
        sweep_name: sweeps go to ``${output_root}/sweeps/${sweep_name}/<job overrides>``; W&B group.
        output_root: where runs and sweeps go.
        paths: machine-specific locations.
        dry_run: list what the command would start, resume, skip or replace, without training.
        rerun_diverged: a diverged run is final like a completed one (a rerun would diverge the
            same way); true restarts it.
        debug: fault injection.
        stack: in a sweep, train up to this many jobs that differ only in one swept key of
            :data:`PACK_KEYS` (the first swept: ``seed``, else ``optim.base_lr``, else
            ``optim.weight_decay``) as one stacked model in one process (:func:`mbn.train.train_stack`);
            1 = every job alone; ``auto`` = the sweep picks, per model shape (backbone, width, norm,
            m), the K (1, 2, 4, 8, at most the swept values) and each convolution's path that a
            short timed probe finds fastest on this machine (:mod:`mbn.models.stack_probe`; cached;
            ``dry_run=true`` shows it; :func:`mbn.cli.sweep.auto_stack`).
        stack_key, stack_values: set by the sweep for a stacked job (the key it packs along and
            that key's swept values, which it packs in chunks of ``stack``); not for the command line.
        stack_path: how a stacked job's convolutions compute (:class:`mbn.models.stacked_layers.StackedConv2d`):
            ``grouped``, ``dense`` (one convolution per member), or ``auto`` (each layer's faster
            one, from the probe, and the job's pack trained as stacks of the K its shape chose, one
            after another; ``stack=auto`` sets it).
        objective: the metric of ``results.json`` a job returns to Hydra's sweeper, which a tuning
            sweeper (``hydra/sweeper=optuna``) optimizes: minimized for a loss, else maximized.
    """

    data: specs.DataSpec = specs.MISSING
    model: specs.ModelSpec = specs.MISSING
    norm: specs.NormSpec = specs.MISSING
    optim: specs.OptimSpec = field(default_factory=specs.OptimSpec)
    trainer: specs.TrainerSpec = field(default_factory=specs.TrainerSpec)
    logger: dict[str, Any] = field(default_factory=dict)
    seed: int = 0
    epochs: int = 200
    sweep_name: str = "default"
    output_root: str = "${oc.env:MBN_OUTPUT_ROOT,outputs}"
    paths: PathsConfig = field(default_factory=PathsConfig)
    dry_run: bool = False
    rerun_diverged: bool = False
    debug: DebugConfig = field(default_factory=DebugConfig)
    stack: Any = 1  # a positive int or "auto" (checked below; OmegaConf types no such union)
    stack_key: str = "seed"
    stack_values: list[str] | None = None
    stack_path: str = "grouped"
    objective: str = "final_val_acc1"

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise specs.SpecError("objective", f"must be a metric of results.json, one of {', '.join(OBJECTIVES)}; "
                                  f"got {self.objective!r}")
        if self.stack != STACK_AUTO and (isinstance(self.stack, bool) or not isinstance(self.stack, int) or self.stack < 1):
            raise specs.SpecError("stack", f"must be a positive integer or {STACK_AUTO}, got {self.stack!r}")
        if self.stack_path not in STACK_PATHS:
            raise specs.SpecError("stack_path", f"must be one of {', '.join(STACK_PATHS)}, got {self.stack_path!r}")
        if self.stack != 1 and self.stack != STACK_AUTO:  # (auto on several devices: the sweep picks 1)
            if self.trainer.devices * self.trainer.num_nodes > 1:
                raise specs.SpecError("stack", "stacked runs train on one device: use stack=1 with trainer.devices > 1")

    def key_value(self, key: str) -> Any:
        """This job's value of ``key`` (a dotted key, e.g. ``optim.base_lr``)."""
        value: Any = self
        for part in key.split("."):
            value = getattr(value, part)
        return value

    def pack_values(self) -> list[str]:
        """The values of ``stack_key`` this job trains: its chunk of ``stack_values`` (just its own when not stacked)."""
        own = self.key_value(self.stack_key)
        same = [i for i, value in enumerate(self.stack_values or []) if _same_value(value, own)]
        if not isinstance(self.stack, int) or self.stack == 1 or not same:  # (auto: the sweep sets the K)
            return [str(own)]
        start = same[0] // self.stack * self.stack
        return list(self.stack_values[start : start + self.stack])


def _same_value(text: str, value: Any) -> bool:
    try:
        return float(text) == float(value)
    except (TypeError, ValueError):
        return str(text) == str(value)


def register_schemas() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent): ``train_schema`` and ``schema/<group>/<option>``."""
    store = ConfigStore.instance()
    store.store(name="train_schema", node=TrainConfig)
    for group, schemas in specs.GROUP_SCHEMAS.items():
        for option, schema in schemas.items():
            # A schema that serves several options (ResNetSpec) leaves its name open: each option sets it.
            node = schema(name=option) if getattr(schema, "name", None) == specs.MISSING else schema
            store.store(group=f"schema/{group}", name=option, node=node)
    store.store(group="schema/optim", name="sgd", node=specs.OptimSpec)
    store.store(group="schema/trainer", name="trainer", node=specs.TrainerSpec)


register_schemas()


@dataclass(frozen=True)
class Job:
    """A composed config taken apart: the run, mbn-train's control values, and the recorded config.

    Args:
        config: the resolved config without the control keys (what is hashed and recorded).
        train: the typed config (:class:`TrainConfig`, every rule checked).
    """

    config: dict[str, Any]
    train: TrainConfig

    @property
    def dry_run(self) -> bool:
        return self.train.dry_run

    @property
    def rerun_diverged(self) -> bool:
        return self.train.rerun_diverged

    @property
    def fail_at_epoch(self) -> int | None:
        return self.train.debug.fail_at_epoch

    @property
    def hold_at_epoch(self) -> int | None:
        return self.train.debug.hold_at_epoch

    def debug_callbacks(self) -> list[Any]:
        """The fault-injection callbacks ``debug.*`` asks for (tests of sweeps; Lightning imported only then)."""
        callbacks: list[Any] = []
        if self.fail_at_epoch is not None:
            from mbn.train.callbacks import FailAtEpoch

            callbacks.append(FailAtEpoch(self.fail_at_epoch))
        if self.hold_at_epoch is not None:
            from mbn.train.callbacks import HoldAtEpoch

            callbacks.append(HoldAtEpoch(self.hold_at_epoch))
        return callbacks


def load_job(cfg: DictConfig) -> Job:
    """Check a composed config against its schemas and rules (nothing heavy is imported).

    Args:
        cfg: the composed task config (without the ``hydra`` node).

    Raises:
        ConfigError: the first bad value, with its full dotted key.
    """
    _refuse_keys_outside_schema(cfg, "")
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True, enum_to_str=True)
        train = OmegaConf.to_object(cfg)
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(key, f"a value is required (set {key}=...)") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(exc.full_key or "config", str(exc).splitlines()[0]) from None
    except specs.SpecError:
        raise _locate(cfg, "") from None
    if not isinstance(train, TrainConfig):
        raise ConfigError("config", f"is not an mbn-train config (got {type(train).__name__})")
    for key in CONTROL_KEYS:
        config.pop(key, None)
    return Job(config=config, train=train)


def _refuse_keys_outside_schema(node: DictConfig, prefix: str) -> None:
    """Raise :class:`ConfigError` for the first key of ``node`` (recursively) that its schema lacks.

    Hydra's ``+key=value`` opens the config to add a key, and ``OmegaConf.to_object`` then sets it as a
    plain attribute that nothing reads: ``+trainer.sync_batchnorm=true`` would be recorded in the run's
    config while the trainer is built without it. The composed result is therefore checked here.
    """
    schema = OmegaConf.get_type(node)
    if dataclasses.is_dataclass(schema):
        known = [f.name for f in dataclasses.fields(schema)]
    elif prefix == "logger.":
        known = list(specs.LOGGER_SCHEMAS)
    else:
        known = None
    for key in node.keys():
        key = str(key)
        if known is not None and key not in known:
            raise unknown_key_error(f"{prefix}{key}", known)
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue  # a missing value is reported with the others below; nothing to walk into
        if isinstance(node[key], DictConfig):
            _refuse_keys_outside_schema(node[key], f"{prefix}{key}.")


def _locate(node: DictConfig, prefix: str) -> ConfigError:
    """The :class:`SpecError` that building ``node`` raises, with the dotted key of the object that raised it."""
    for key in node.keys():
        child = node[key]
        if isinstance(child, DictConfig) and OmegaConf.get_type(child) not in (dict, None):
            try:
                OmegaConf.to_object(child)
            except specs.SpecError:
                return _locate(child, f"{prefix}{key}.")
    try:
        OmegaConf.to_object(node)
    except specs.SpecError as exc:
        return ConfigError(f"{prefix}{exc.key}", exc.problem)
    return ConfigError(prefix.rstrip(".") or "config", "invalid value")


def to_run_spec(job: Job, output_dir: str | os.PathLike, overrides: Iterable[str], config_hash: str) -> specs.RunSpec:
    """The :class:`~mbn.train.spec.RunSpec` of a checked job (cross-group rules checked here).

    Args:
        job: :func:`load_job`'s result.
        output_dir: the run's directory (its name is the run's name).
        overrides: the job's command-line overrides.
        config_hash: :func:`mbn.results.config_hash` of ``job.config``.

    Raises:
        ConfigError: a rule spanning groups is broken (e.g. GN groups that do not divide the width).
    """
    train = job.train
    try:
        return specs.RunSpec(
            data=train.data,
            model=train.model,
            norm=train.norm,
            optim=train.optim,
            trainer=train.trainer,
            loggers=specs.LoggerSpec(selected=dict(train.logger)),
            seed=train.seed,
            epochs=train.epochs,
            output_dir=Path(output_dir),
            run_name=Path(output_dir).name,
            sweep_name=train.sweep_name,
            config=job.config,
            config_hash=config_hash,
            overrides=list(overrides),
            cache_dir=train.paths.cache_dir,
        )
    except specs.SpecError as exc:
        raise ConfigError(exc.key, exc.problem) from None
