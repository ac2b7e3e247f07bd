"""From a composed Hydra config to a validated :class:`mbn.train.RunSpec`, checked in the first second.

Validation runs on the resolved config before torch or Lightning is imported, so a typo or an
impossible value fails at once with one line that names the key (:class:`ConfigError`).
Also home of the OmegaConf resolvers the configs use (``mbn.project_root``, ``mbn.job_dirname``).
"""

from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError, MissingMandatoryValue, OmegaConfBaseException

if TYPE_CHECKING:
    from mbn.train.spec import RunSpec

PROJECT_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = PROJECT_ROOT / "configs"

# Values checked here without importing torch; tests keep them equal to the library's registries
# (mbn.nn.NORM_NAMES, mbn.models.MODEL_NAMES, mbn.data.DATASET_KINDS) and to the config groups.
NORM_NAMES = ("bn", "gn", "brn", "mbn", "none")
MBN_SCHEDULES = ("epoch", "iteration", "fixed")
LR_SCHEDULES = ("step", "cosine")
LOGGER_NAMES = ("csv", "wandb", "tensorboard")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
PRECISIONS = ("64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine")
MAX_DIRNAME = 200
# Top-level keys that steer mbn-train itself (what to do with a job), not the run: they are taken out
# of the config before it is hashed and recorded, so they never make a finished run look different.
CONTROL_KEYS = ("dry_run", "rerun_diverged", "debug")


class ConfigError(ValueError):
    """An invalid config value; ``str()`` is the one-line message shown to the user.

    Args:
        key: dotted config key, e.g. ``data.batch_size``.
        problem: what is wrong, e.g. ``must be a positive integer, got 0``.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


# --- resolvers ------------------------------------------------------------------------------------


def job_dirname(overrides: Iterable[str], exclude: Iterable[str] = ()) -> str:
    """Deterministic directory name of a job from its command-line overrides.

    ``key=value`` pairs sorted by key and joined with commas (``data.batch_size=2,norm=mbn``);
    overrides of keys in ``exclude`` (or below them, e.g. ``logger.wandb.offline`` for ``logger``)
    and of ``hydra`` are left out; ``/`` becomes ``_``; no overrides gives ``default``; names
    longer than 200 characters are cut and end with a hash of the full name, so distinct jobs never
    share a dir.

    Args:
        overrides: Hydra override strings (``hydra.overrides.task``).
        exclude: keys (or group names) that do not identify the job (output location, loggers, ...).
    """
    excluded = tuple(exclude) + ("hydra",)
    kept: list[tuple[str, str]] = []
    for override in overrides:
        key, _, value = str(override).partition("=")
        key = key.lstrip("+")
        bare = key.lstrip("~")
        if any(bare == name or bare.startswith((f"{name}.", f"{name}/")) for name in excluded):
            continue
        kept.append((key, f"{key}={value}" if _ else key))
    name = ",".join(text for _, text in sorted(kept)).replace("/", "_") or "default"
    if len(name) > MAX_DIRNAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[: MAX_DIRNAME - 11]}-{digest}"
    return name


def register_resolvers() -> None:
    """Register the ``mbn.*`` resolvers the configs use (idempotent)."""
    if not OmegaConf.has_resolver("mbn.project_root"):
        OmegaConf.register_new_resolver("mbn.project_root", lambda: str(PROJECT_ROOT))
    if not OmegaConf.has_resolver("mbn.job_dirname"):
        OmegaConf.register_new_resolver(
            "mbn.job_dirname", lambda overrides, exclude=(): job_dirname(list(overrides), list(exclude))
        )


register_resolvers()


# --- validation -----------------------------------------------------------------------------------


def resolve(cfg: DictConfig) -> dict[str, Any]:
    """The config as plain nested containers with every interpolation resolved.

    Raises:
        ConfigError: a required value (``???``) is missing or an interpolation fails.
    """
    try:
        return OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)  # type: ignore[return-value]
    except MissingMandatoryValue as exc:
        key = exc.full_key or "?"
        raise ConfigError(key, f"a value is required (set {key}=...)") from None
    except (InterpolationResolutionError, OmegaConfBaseException) as exc:
        key = getattr(exc, "full_key", None) or "config"
        raise ConfigError(key, str(exc).splitlines()[0]) from None


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> tuple[str, ...]:
    """Names of the configs in a config group dir (e.g. ``norm`` -> ``bn, brn, gn, mbn, none``)."""
    return tuple(sorted(path.stem for path in (config_dir / group).glob("*.yaml")))


def split_control(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate the run's config from mbn-train's control keys (:data:`CONTROL_KEYS`), checking the latter.

    Args:
        config: the resolved config (:func:`resolve`).

    Returns:
        ``(run_config, control)``: the config without the control keys, and the control values with
        defaults (``dry_run``, ``rerun_diverged``: bool; ``fail_at_epoch``: int or None).

    Raises:
        ConfigError: a control value has the wrong type.
    """
    run_config = {k: v for k, v in config.items() if k not in CONTROL_KEYS}
    control = {
        "dry_run": config.get("dry_run", False),
        "rerun_diverged": config.get("rerun_diverged", False),
        "fail_at_epoch": (config.get("debug") or {}).get("fail_at_epoch"),
    }
    for key in ("dry_run", "rerun_diverged"):
        if not isinstance(control[key], bool):
            raise ConfigError(key, f"must be true or false, got {control[key]!r}")
    fail_at = control["fail_at_epoch"]
    if fail_at is not None and (isinstance(fail_at, bool) or not isinstance(fail_at, int) or fail_at < 1):
        raise ConfigError("debug.fail_at_epoch", f"must be a positive integer or null, got {fail_at!r}")
    return run_config, control


def validate(config: Mapping[str, Any]) -> None:
    """Check a resolved config; raise :class:`ConfigError` for the first bad value.

    Args:
        config: the resolved config (:func:`resolve`).
    """
    _integer(config, "seed", minimum=0)
    _integer(config, "epochs", minimum=1)
    sweep_name = config.get("sweep_name")
    if not isinstance(sweep_name, str) or not sweep_name or "/" in sweep_name:
        raise ConfigError("sweep_name", f"must be a non-empty name without '/', got {sweep_name!r}")
    _validate_trainer(config)
    _validate_data(config)
    _validate_model_and_norm(config)
    _validate_optim(config)
    _validate_loggers(config)


def _validate_trainer(config: Mapping[str, Any]) -> None:
    _choice(config, "trainer.accelerator", ACCELERATORS)
    _choice(config, "trainer.precision", PRECISIONS)
    _integer(config, "trainer.devices", minimum=1)
    _integer(config, "trainer.num_nodes", minimum=1)
    _integer(config, "trainer.check_finite_every_n_steps", minimum=1)
    _integer(config, "trainer.num_threads", minimum=1, optional=True)
    for key in ("trainer.benchmark", "trainer.compile"):
        _boolean(config, key)
    if _get(config, "trainer.progress_bar") is not None:
        _boolean(config, "trainer.progress_bar")


def _validate_data(config: Mapping[str, Any]) -> None:
    kind = _choice(config, "data.name", group_options("data"))
    batch_size = _integer(config, "data.batch_size", minimum=1)
    _integer(config, "data.eval_batch_size", minimum=1)
    train_subset = _integer(config, "data.train_subset", minimum=1, optional=True)
    _integer(config, "data.test_subset", minimum=1, optional=True)
    _integer(config, "data.subset_seed", minimum=0)
    _integer(config, "data.crop_padding", minimum=0)
    _boolean(config, "data.augment")
    world_size = _get(config, "trainer.devices") * _get(config, "trainer.num_nodes")
    if train_subset is not None and train_subset < batch_size * world_size:
        raise ConfigError(
            "data.train_subset",
            f"{train_subset} images cannot fill one batch of data.batch_size={batch_size} on {world_size} device(s)",
        )
    source = _get(config, "data.source")
    if not isinstance(source, Mapping):
        raise ConfigError("data.source", f"must be a mapping of dataset options, got {source!r}")
    if kind == "cifar10_archive":
        _existing_path(config, "data.source.archive", file=True)
    elif kind == "imagefolder":
        _existing_path(config, "data.source.root")
    elif kind in ("cifar10", "cifar100") and not source.get("download", False):
        _existing_path(config, "data.source.root")
    elif kind == "fake":
        num_train = _integer(config, "data.source.num_train", minimum=1)
        if train_subset is None and num_train < batch_size * world_size:
            raise ConfigError(
                "data.source.num_train",
                f"{num_train} images cannot fill one batch of data.batch_size={batch_size} on {world_size} device(s)",
            )


# mbn.nn.group_norm.DEFAULT_NUM_GROUPS, repeated because these checks run before torch is imported
# (a test keeps the two equal).
DEFAULT_GN_GROUPS = 32


def _validate_model_and_norm(config: Mapping[str, Any]) -> None:
    _choice(config, "model.name", group_options("model"))
    width = _integer(config, "model.width", minimum=1)
    norm = _choice(config, "norm.name", NORM_NAMES)
    if norm == "gn":
        num_groups = _integer(config, "norm.num_groups", minimum=1, optional=True)
        group_size = _integer(config, "norm.group_size", minimum=1, optional=True)
        if num_groups is not None and group_size is not None:
            raise ConfigError("norm.group_size", f"set norm.num_groups or norm.group_size, not both (norm.num_groups={num_groups})")
        # Every layer's channel count is a multiple of model.width, so dividing it is enough.
        if group_size is not None and width % group_size:
            raise ConfigError("norm.group_size", f"{group_size} does not divide model.width={width}")
        if group_size is None and width % (num_groups or DEFAULT_GN_GROUPS):
            raise ConfigError("norm.num_groups", f"{num_groups or DEFAULT_GN_GROUPS} groups do not divide model.width={width} channels"
                              + ("" if num_groups else " (null means the default of 32 groups; set norm.num_groups or norm.group_size)"))
    elif norm == "mbn":
        _number(config, "norm.ideal_batch_size", low=1.0)
        _number(config, "norm.tau0", low=0.0, high=1.0)
        schedule = _choice(config, "norm.schedule", MBN_SCHEDULES)
        fixed_lam = _get(config, "norm.fixed_lam")
        if schedule == "fixed":
            _number(config, "norm.fixed_lam", low=0.0, high=1.0, high_open=True)
        elif fixed_lam is not None:
            raise ConfigError("norm.fixed_lam", f"only applies with norm.schedule=fixed, got {fixed_lam!r}")
    elif norm == "brn":
        _number(config, "norm.r_max", low=1.0)
        _number(config, "norm.d_max", low=0.0)
    if norm != "none" and _get(config, "norm.eps", None) is not None:
        _number(config, "norm.eps", low=0.0)


def _validate_optim(config: Mapping[str, Any]) -> None:
    _number(config, "optim.base_lr", low=0.0, low_open=True)
    _integer(config, "optim.reference_batch_size", minimum=1)
    _number(config, "optim.momentum", low=0.0, high=1.0, high_open=True)
    _number(config, "optim.weight_decay", low=0.0)
    _boolean(config, "optim.nesterov")
    _boolean(config, "optim.decay_norm_params")
    _choice(config, "optim.schedule", LR_SCHEDULES)
    _number(config, "optim.gamma", low=0.0, high=1.0, low_open=True)
    warmup = _number(config, "optim.warmup_epochs", low=0.0)
    if warmup >= _get(config, "epochs"):
        raise ConfigError("optim.warmup_epochs", f"{warmup} must be shorter than epochs={_get(config, 'epochs')}")
    milestones = _get(config, "optim.milestones")
    if not isinstance(milestones, list) or any(
        isinstance(m, bool) or not isinstance(m, (int, float)) or not 0 < m < 1 for m in milestones
    ):
        raise ConfigError("optim.milestones", f"must be a list of fractions of training in (0, 1), got {milestones!r}")
    if milestones != sorted(milestones):
        raise ConfigError("optim.milestones", f"must be increasing, got {milestones!r}")


def _validate_loggers(config: Mapping[str, Any]) -> None:
    loggers = config.get("logger") or {}
    if not isinstance(loggers, Mapping):
        raise ConfigError("logger", f"must be a mapping of logger configs, got {loggers!r}")
    for name in loggers:
        if name not in LOGGER_NAMES:
            raise ConfigError(f"logger.{name}", f"unknown logger; expected one of {', '.join(LOGGER_NAMES)}")
    if "wandb" in loggers:
        _boolean(config, "logger.wandb.offline")
        tags = _get(config, "logger.wandb.tags")
        if not isinstance(tags, list):
            raise ConfigError("logger.wandb.tags", f"must be a list, got {tags!r}")


# --- value checks ---------------------------------------------------------------------------------

_MISSING = object()


def _get(config: Mapping[str, Any], key: str, default: Any = _MISSING) -> Any:
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, Mapping) or part not in node:
            if default is not _MISSING:
                return default
            raise ConfigError(key, "is missing from the config")
        node = node[part]
    return node


def _integer(config: Mapping[str, Any], key: str, minimum: int | None = None, optional: bool = False) -> Any:
    value = _get(config, key, None if optional else _MISSING)
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or (minimum is not None and value < minimum):
        bound = "an integer" if minimum is None else ("a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        raise ConfigError(key, f"must be {bound}{' or null' if optional else ''}, got {value!r}")
    return value


def _number(
    config: Mapping[str, Any],
    key: str,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    value = _get(config, key)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "inf)" if high is None else f"{high:g}{')' if high_open else ']'}"
        bounds = f" in {lo}, {hi}" if low is not None else ""
        raise ConfigError(key, f"must be a number{bounds}, got {value!r}")
    return float(value)


def _boolean(config: Mapping[str, Any], key: str) -> bool:
    value = _get(config, key)
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _choice(config: Mapping[str, Any], key: str, choices: Iterable[str]) -> str:
    value = _get(config, key)
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(key, f"unknown value {value!r}; expected one of {', '.join(choices)}")
    return value


def _existing_path(config: Mapping[str, Any], key: str, file: bool = False) -> Path:
    value = _get(config, key)
    path = Path(os.path.expanduser(str(value)))
    exists = path.is_file() if file else path.exists()
    if value is None or not exists:
        raise ConfigError(key, f"no such {'file' if file else 'file or directory'}: {value}")
    return path


# --- conversion -----------------------------------------------------------------------------------


def run_spec(
    config: Mapping[str, Any], output_dir: str | os.PathLike, run_name: str, overrides: Iterable[str], config_hash: str
) -> "RunSpec":
    """Build the :class:`mbn.train.spec.RunSpec` of a validated, resolved config.

    Args:
        config: the resolved config (validated with :func:`validate`).
        output_dir: the run's directory.
        run_name: short run name (the output dir's name).
        overrides: the job's command-line overrides.
        config_hash: :func:`mbn.results.config_hash` of ``config``.
    """
    from mbn.train.spec import DataSpec, LoggerSpec, ModelSpec, NormSpec, OptimSpec, RunSpec, TrainerSpec, WandbSpec

    data = dict(config["data"])
    model = dict(config["model"])
    norm = dict(config["norm"])
    optim = {k: v for k, v in config["optim"].items() if k != "name"}
    optim["milestones"] = tuple(optim["milestones"])
    loggers = config.get("logger") or {}
    wandb = loggers.get("wandb")
    return RunSpec(
        data=DataSpec(
            kind=data.pop("name"),
            source=dict(data.pop("source")),
            cache_dir=(config.get("paths") or {}).get("cache_dir"),
            **data,
        ),
        model=ModelSpec(name=model.pop("name"), width=model.pop("width"), options=model),
        norm=NormSpec(name=norm.pop("name"), options=norm),
        optim=OptimSpec(**optim),
        trainer=TrainerSpec(**config["trainer"]),
        loggers=LoggerSpec(
            wandb=WandbSpec(**wandb) if wandb is not None else None,
            tensorboard="tensorboard" in loggers,
        ),
        seed=config["seed"],
        epochs=config["epochs"],
        output_dir=Path(output_dir),
        run_name=run_name,
        sweep_name=config["sweep_name"],
        config=dict(config),
        config_hash=config_hash,
        overrides=list(overrides),
    )


def check_buildable(spec: "RunSpec") -> None:
    """Build the norm factory and the model once on the CPU to turn bad layer options into a ConfigError.

    Args:
        spec: the run (:func:`run_spec`).
    """
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
