"""The config tree's location, its OmegaConf resolvers, job dir names and the one-line config error.

The schema (types, defaults and rules) is :mod:`mbn.cli.schema`; this module holds what the
configs and the error messages need besides it: ``mbn.default_data_root`` and ``mbn.job_dirname``
(deterministic job dirs), :class:`ConfigError`, and :func:`check_buildable`.
"""

from __future__ import annotations

import difflib
import hashlib
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from omegaconf import OmegaConf

if TYPE_CHECKING:
    from torch import nn

    from mbn.train.spec import RunSpec

PACKAGE_DIR = Path(__file__).resolve().parents[1]


def _checkout_root() -> Path | None:
    """The repository root when ``mbn`` runs from a checkout (editable install, ``PYTHONPATH``), else None."""
    root = PACKAGE_DIR.parent
    return root if (root / "configs" / "train.yaml").is_file() and (root / "pyproject.toml").is_file() else None


PROJECT_ROOT = _checkout_root()
# A built wheel carries the configs inside the package (pyproject.toml: force-include configs ->
# mbn/configs); a checkout keeps them at the top level, where they are edited.
CONFIG_DIR = PACKAGE_DIR / "configs" if (PACKAGE_DIR / "configs").is_dir() else (PROJECT_ROOT or PACKAGE_DIR) / "configs"
MAX_DIRNAME = 200
# Side of the CIFAR images (their sources have no image_size).
CIFAR_IMAGE_SIZE = 32


def default_data_root() -> str:
    """Where datasets are looked for unless ``$MBN_DATA_ROOT`` or ``paths.data_root`` says otherwise.

    ``../shared/data`` beside a checkout (this project's machines keep the real CIFAR-10 there);
    ``./data`` under the working directory for an installed package.
    """
    return str(PROJECT_ROOT.parent / "shared" / "data") if PROJECT_ROOT is not None else str(Path.cwd() / "data")


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


def group_options(group: str, config_dir: Path = CONFIG_DIR) -> tuple[str, ...]:
    """Names of the configs in a config group dir (e.g. ``norm`` -> ``bn, brn, gn, mbn, none``)."""
    return tuple(sorted(path.stem for path in (config_dir / group).glob("*.yaml")))


def composition_error(exc: BaseException) -> ConfigError:
    """Hydra's (or OmegaConf's) multi-line composition error as one :class:`ConfigError` line.

    Covers an unknown group option (``norm=foo``, ``'logger=[foo]'``), an unknown key
    (``data.batchsize=2``), a value of the wrong type (``norm.momentum=abc``) and an unparsable
    override.

    Args:
        exc: what composing the config raised.
    """
    from hydra.errors import MissingConfigException, OverrideParseException
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    # Hydra re-raises OmegaConf's error inside its own (``In 'experiment/x': ConfigKeyError raised
    # ...``) without ``from``: the key is on the original, the file only in Hydra's message.
    cause = next((e for e in (exc.__cause__, exc.__context__) if isinstance(e, OmegaConfBaseException)), exc)
    source = _COMPOSED_FROM.match(str(exc))
    where = f" (set in {source.group(1)}.yaml)" if source and cause is not exc else ""
    if isinstance(exc, MissingConfigException) and exc.missing_cfg_file:
        group, _, option = str(exc.missing_cfg_file).rpartition("/")
        known = group_options(group) if group and (CONFIG_DIR / group).is_dir() else ()
        expected = f"; expected one of {', '.join(known)}" if known else ""
        return ConfigError(group or "config", f"unknown option {option!r}{expected}")
    if isinstance(exc, OverrideParseException):
        return ConfigError("override", str(exc).strip().splitlines()[0])
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        key = cause.full_key
        if isinstance(cause, ConfigKeyError) or "not in" in str(cause):
            return unknown_key_error(key, _keys_at(cause), where)
        return ConfigError(key, str(cause).strip().splitlines()[0] + where)
    return ConfigError("config", str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__)


_COMPOSED_FROM = re.compile(r"^In '([^']+)':")


def unknown_key_error(key: str, known: Iterable[str], where: str = "") -> ConfigError:
    """The one line for a key that its schema lacks, with the nearest valid keys (or all of them).

    Args:
        key: the full dotted key, e.g. ``trainer.sync_batchnorm``.
        known: the valid keys at that level (without the parent's prefix).
        where: text placed after ``unknown key``, e.g. the file that set it.
    """
    parent, _, name = key.rpartition(".")
    prefix = f"{parent}." if parent else ""
    known = sorted(str(k) for k in known)
    close = difflib.get_close_matches(name, known, n=3)
    if close:
        hint = f"; did you mean {' or '.join(prefix + k for k in close)}?"
    elif known:
        hint = f"; valid keys of {parent or 'the config'}: {', '.join(known)}"
    else:
        hint = ""
    return ConfigError(key, f"unknown key{where}{hint}")


def _keys_at(error: BaseException) -> list[str]:
    node = getattr(error, "parent_node", None)
    try:
        return [str(k) for k in node.keys()] if node is not None else []
    except Exception:  # noqa: BLE001 - a hint only
        return []


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
    if not OmegaConf.has_resolver("mbn.default_data_root"):
        OmegaConf.register_new_resolver("mbn.default_data_root", default_data_root)
    if not OmegaConf.has_resolver("mbn.job_dirname"):
        OmegaConf.register_new_resolver(
            "mbn.job_dirname", lambda overrides, exclude=(): job_dirname(list(overrides), list(exclude))
        )


register_resolvers()


def check_buildable(spec: "RunSpec") -> None:
    """Build the norm factory and the model once on the CPU to turn bad layer options into a ConfigError;
    with ``data.batch_size=1``, also check that no batch-statistics norm layer gets one value per channel.

    Args:
        spec: the run (:func:`run_spec`).
    """
    from mbn.models import build_model
    from mbn.nn import norm_layer

    try:
        factory = norm_layer(spec.norm.name, **spec.norm_options(steps_per_epoch=1))
    except (TypeError, ValueError) as exc:
        raise ConfigError("norm", str(exc)) from None
    try:
        model = build_model(spec.model.name, num_classes=2, norm_layer=factory, width=spec.model.width, **spec.model.options)
    except (TypeError, ValueError) as exc:
        raise ConfigError("model/norm", str(exc)) from None
    if spec.data.batch_size == 1:
        _check_one_value_per_channel(spec, model)


def _check_one_value_per_channel(spec: "RunSpec", model: "nn.Module") -> None:
    """A batch of one is fine for BN-like layers only while the smallest feature map has more than one value."""
    from mbn.nn import min_values_per_channel

    source = spec.data.source
    size = getattr(source, "image_size", CIFAR_IMAGE_SIZE)
    values = min_values_per_channel(model, (getattr(source, "channels", 3), size, size))
    if values == 1:
        raise ConfigError("data.batch_size", f"1 image per device leaves the {spec.norm.name} layers of {spec.model.name} "
                          f"one value per channel at its smallest feature map (1x1 at {size} px), and batch "
                          "statistics need more than one in training: use data.batch_size >= 2")
