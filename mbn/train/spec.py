"""What one training run is: typed dataclasses that are also the schemas of the Hydra configs.

Each config group option has its schema here (``norm/bn`` is :class:`BatchNormSpec`, ``data/fake``
is :class:`FakeDataSpec`, ...): ``mbn.cli`` registers them in Hydra's ConfigStore, so OmegaConf
rejects wrong types, unknown keys and missing values with the full dotted key, and builds these
objects from the composed config (``OmegaConf.to_object``). A group's options are one registry
(:data:`GROUP_SCHEMAS`) that the classes fill themselves: ``@schema_of(NORM_SCHEMAS)`` on
:class:`BatchNormSpec` makes it ``norm/bn``. The rules a type cannot say (ranges, choices,
"milestones increasing in (0, 1)") live in each class's ``__post_init__``, once; rules that span
groups ("GN groups divide the width") live in :class:`RunSpec`. A broken rule raises
:class:`SpecError` naming the field. Nothing here imports Hydra, Lightning or torch: tests and
scripts build a :class:`RunSpec` by hand just as well.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, TypeVar

# A required value: OmegaConf's "???" (omegaconf.MISSING), spelled out so this module needs no OmegaConf.
MISSING: Any = "???"

MBN_SCHEDULES = ("epoch", "iteration", "fixed")
LR_SCHEDULES = ("step", "cosine")
# trainer.mbn_history: whose batches MBN's momentum statistics average under DDP (mbn.train.ddp_buffers).
MBN_HISTORIES = ("per_device", "rank0")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "tpu", "auto")
PRECISIONS = ("64-true", "32-true", "16-true", "bf16-true", "16-mixed", "bf16-mixed", "transformer-engine")
# GN's groups in the standard 64-wide network (Wu & He's 32: mbn.nn.group_norm.DEFAULT_NUM_GROUPS,
# repeated because specs are checked before torch is imported; a test keeps the two equal).
DEFAULT_GN_GROUPS = 32
# model.width of the standard networks, where GN's default is DEFAULT_GN_GROUPS groups.
STANDARD_WIDTH = 64
# The oldest torch trainer.compile accepts (mbn.nn.functional.COMPILE_MIN_TORCH, which says why;
# repeated because specs are checked before torch is imported; a test keeps the two equal).
COMPILE_MIN_TORCH = (2, 6)


class SpecError(ValueError):
    """A value that breaks its field's rule; ``str()`` is the one-line message for the user.

    Args:
        key: the field, dotted below the object that raised (``num_groups``, ``source.archive``);
            callers that know where the object sits prefix it (``norm.num_groups``).
        problem: what is wrong, e.g. ``must be an integer >= 1, got 0``.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")

    def under(self, prefix: str) -> "SpecError":
        """The same error with ``prefix.`` in front of its key."""
        return SpecError(f"{prefix}.{self.key}", self.problem)


# --- rules ----------------------------------------------------------------------------------------


def _installed_torch() -> str | None:
    """The installed torch's version, read without importing it (None when it is not installed)."""
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return None


def _at_least(key: str, value: int | None, minimum: int, optional: bool = False) -> None:
    if value is None and optional:
        return
    if value is None or isinstance(value, bool) or not value >= minimum:
        bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise SpecError(key, f"must be {bound}{' or null' if optional else ''}, got {value!r}")


def _within(key: str, value: float | None, low: float, high: float, low_open: bool = False, high_open: bool = False) -> None:
    ok = value is not None and not isinstance(value, bool) and math.isfinite(value)
    if ok:
        ok = (value > low if low_open else value >= low) and (value < high if high_open or high == math.inf else value <= high)
    if not ok:
        closing = ")" if high_open or high == math.inf else "]"
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{closing}"
        raise SpecError(key, f"must be a number in {interval}, got {value!r}")


def _one_of(key: str, value: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    if value not in choices:
        raise SpecError(key, f"unknown value {value!r}; expected one of {', '.join(choices)}")


def _named_option(spec: Any, registry: dict[str, type]) -> None:
    """``spec.name`` must be an option of ``registry`` that ``spec``'s class is the schema of (a base
    class built by hand, such as ``NormSpec(name="bn")``, takes any option)."""
    _one_of("name", spec.name, registry)
    schema = registry[spec.name]
    if type(spec) is not schema and type(spec) in registry.values():
        group = next(group for group, schemas in GROUP_SCHEMAS.items() if schemas is registry)
        raise SpecError("name", f"{spec.name!r} is another option (a {schema.__name__}, not a {type(spec).__name__}): "
                                f"select it with {group}={spec.name} instead of setting the name")


def _existing(key: str, path: str, file: bool = False) -> None:
    if path == MISSING or "${" in str(path):
        return  # a schema default still to be resolved (OmegaConf resolves before it builds the spec)
    resolved = Path(os.path.expanduser(str(path)))
    if not (resolved.is_file() if file else resolved.exists()):
        raise SpecError(key, f"no such {'file' if file else 'file or directory'}: {path}")


def options_of(spec: Any, exclude: Iterable[str] = ("name",)) -> dict[str, Any]:
    """The fields of a spec dataclass as keyword arguments (nested specs as dicts), minus ``exclude``."""
    skipped = set(exclude)
    return {f.name: _plain(getattr(spec, f.name)) for f in dataclasses.fields(spec) if f.name not in skipped}


def _plain(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value


# --- the registries: config group option -> its schema ---------------------------------------------

# Option name -> schema class, filled by the ``@schema_of`` classes below in definition order, so a
# new option is one class. What each option builds is registered beside its code (mbn.nn's
# NORM_LAYERS, mbn.models' MODEL_BUILDERS, mbn.data's loaders, mbn.train.loggers' LOGGER_BUILDERS);
# specs are checked before torch is imported, so the names cannot be read from there: tests keep the
# registries, the ConfigStore and configs/<group>/ naming the same options.
DATA_SCHEMAS: dict[str, type["DataSpec"]] = {}
MODEL_SCHEMAS: dict[str, type["ModelSpec"]] = {}
NORM_SCHEMAS: dict[str, type["NormSpec"]] = {}
LOGGER_SCHEMAS: dict[str, type] = {}
# Config group -> its registry: the groups whose options are one schema class each.
GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "data": DATA_SCHEMAS,
    "model": MODEL_SCHEMAS,
    "norm": NORM_SCHEMAS,
    "logger": LOGGER_SCHEMAS,
}

_Schema = TypeVar("_Schema", bound=type)


def schema_of(registry: dict[str, type], *options: str) -> Callable[[_Schema], _Schema]:
    """Class decorator: register the dataclass as the schema of config ``options`` in ``registry``.

    Args:
        registry: one of :data:`GROUP_SCHEMAS`' registries.
        *options: the option names; none = the class's ``name`` default (``norm/bn`` for ``name = "bn"``).

    Raises:
        ValueError: an option registered twice, or no name to register under.
    """

    def register(schema: _Schema) -> _Schema:
        names = options or (getattr(schema, "name", MISSING),)
        if MISSING in names:
            raise ValueError(f"{schema.__name__} has no name default: name its options, schema_of(registry, 'name', ...)")
        for name in names:
            if name in registry:
                raise ValueError(f"option {name!r} of {schema.__name__} is taken by {registry[name].__name__}")
            registry[name] = schema
        return schema

    return register


# --- data -----------------------------------------------------------------------------------------


@dataclass
class ArchiveSource:
    """The CIFAR-10 JPEG archive (see ``../shared/data/README.md``).

    Args:
        archive: path of ``cifar10-jpeg.tar.gz``.
    """

    archive: str = "${paths.data_root}/cifar10-jpeg.tar.gz"

    def __post_init__(self) -> None:
        _existing("archive", self.archive, file=True)


@dataclass
class CifarSource:
    """torchvision's CIFAR layout (the python pickle batches).

    Args:
        root: the dir holding ``cifar-10-batches-py/`` or ``cifar-100-python/``.
        download: fetch the archive when missing (needs network access).
    """

    root: str = MISSING
    download: bool = True

    def __post_init__(self) -> None:
        if not self.download:
            _existing("root", self.root)


@dataclass
class ImageFolderSource:
    """``train/`` and ``val/`` class folders (or a .tar/.tar.gz of them), e.g. Mini-ImageNet.

    Args:
        root: the dir (or archive) holding the split folders.
        image_size: images are resized to ``image_size`` x ``image_size``.
        train_dir: the training split's folder name.
        val_dir: the evaluation split's folder name.
    """

    root: str = MISSING
    image_size: int = 84
    train_dir: str = "train"
    val_dir: str = "val"

    def __post_init__(self) -> None:
        _existing("root", self.root)
        _at_least("image_size", self.image_size, 1)


@dataclass
class FakeSource:
    """Generated, learnable images (class-dependent patterns) for tests and quick checks.

    Args:
        num_train: training images.
        num_test: test images.
        num_classes: classes (at least 2).
        image_size: square image side.
        channels: image channels.
        seed: the images are a function of all these arguments.
    """

    num_train: int = 256
    num_test: int = 64
    num_classes: int = 10
    image_size: int = 16
    channels: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("num_train", "num_test", "image_size", "channels"):
            _at_least(key, getattr(self, key), 1)
        _at_least("seed", self.seed, 0)


@dataclass
class DataSpec:
    """Dataset and batching; one subclass per dataset kind (the ``data`` config group).

    Args:
        name: dataset kind for :func:`mbn.data.load_dataset` (``cifar10_archive``, ``fake``, ...).
        source: that kind's options (archive path, root, sizes, ...).
        batch_size: per-device (= normalization) batch size m.
        eval_batch_size: batch size for validation (does not affect results: eval uses running statistics).
        train_subset: use only this many training images (stratified); ``None`` = all.
        test_subset: use only this many test images; ``None`` = all.
        val_subset: hold out this many training images (stratified by class) as the validation
            split, reported as ``val/*`` (the test split as ``test/*``) and used to pick
            ``best.ckpt``; they are held out of the whole training split first, then
            ``train_subset`` is taken from the rest. ``None`` = no validation split (``best.ckpt``
            is then picked on the test split).
        subset_seed: which images the subsets and the validation split take.
        augment: random crop (with ``crop_padding``) and horizontal flip on training batches.
        crop_padding: zero padding before the random crop.
    """

    name: str = MISSING
    source: Any = MISSING
    batch_size: int = 32
    eval_batch_size: int = 500
    train_subset: int | None = None
    test_subset: int | None = None
    val_subset: int | None = None
    subset_seed: int = 0
    augment: bool = True
    crop_padding: int = 4

    def __post_init__(self) -> None:
        _named_option(self, DATA_SCHEMAS)
        _at_least("batch_size", self.batch_size, 1)
        _at_least("eval_batch_size", self.eval_batch_size, 1)
        _at_least("train_subset", self.train_subset, 1, optional=True)
        _at_least("test_subset", self.test_subset, 1, optional=True)
        _at_least("val_subset", self.val_subset, 1, optional=True)
        train_images = self.train_images
        if self.val_subset is not None and train_images is not None and self.val_subset >= train_images:
            raise SpecError("val_subset", f"must be smaller than the {train_images} training images, got {self.val_subset}")
        _at_least("subset_seed", self.subset_seed, 0)
        _at_least("crop_padding", self.crop_padding, 0)

    @property
    def source_options(self) -> dict[str, Any]:
        """``source`` as keyword arguments for :func:`mbn.data.load_dataset`."""
        return _plain(self.source) if dataclasses.is_dataclass(self.source) else dict(self.source)

    @property
    def streams(self) -> bool:
        """Read the images from disk batch by batch (:mod:`mbn.data.streaming`) instead of decoding them into memory."""
        return False

    @property
    def train_images(self) -> int | None:
        """The training split's size when the config tells it (generated data, CIFAR), else None."""
        num_train = getattr(self.source, "num_train", None)
        return num_train if isinstance(num_train, int) else None

    @property
    def eval_splits(self) -> tuple[str, ...]:
        """The evaluation splits, in order: ``("val", "test")`` with a validation split, else ``("test",)``.

        A run logs each as ``<split>/loss``, ``<split>/acc1``, ``<split>/acc5`` and picks ``best.ckpt``
        by the first one's ``acc1`` (:attr:`selection_metric`).
        """
        return ("val", "test") if self.val_subset is not None else ("test",)

    @property
    def selection_metric(self) -> str:
        """The metric ``best.ckpt`` maximizes: the validation split's top-1 accuracy, else the test split's."""
        return f"{self.eval_splits[0]}/acc1"


# CIFAR-10's and CIFAR-100's training split.
CIFAR_TRAIN_IMAGES = 50_000


@schema_of(DATA_SCHEMAS)
@dataclass
class Cifar10ArchiveDataSpec(DataSpec):
    """The real CIFAR-10 JPEG archive, decoded once into the cache."""

    name: str = "cifar10_archive"
    source: ArchiveSource = field(default_factory=ArchiveSource)

    @property
    def train_images(self) -> int | None:
        return CIFAR_TRAIN_IMAGES


@schema_of(DATA_SCHEMAS)
@dataclass
class Cifar10DataSpec(DataSpec):
    """CIFAR-10 in torchvision's layout under ``source.root``."""

    name: str = "cifar10"
    source: CifarSource = field(default_factory=lambda: CifarSource(root="${paths.data_root}/cifar10"))

    @property
    def train_images(self) -> int | None:
        return CIFAR_TRAIN_IMAGES


@schema_of(DATA_SCHEMAS)
@dataclass
class Cifar100DataSpec(DataSpec):
    """CIFAR-100 (fine labels) in torchvision's layout under ``source.root``."""

    name: str = "cifar100"
    source: CifarSource = field(default_factory=lambda: CifarSource(root="${paths.data_root}/cifar100"))

    @property
    def train_images(self) -> int | None:
        return CIFAR_TRAIN_IMAGES


@schema_of(DATA_SCHEMAS)
@dataclass
class ImageFolderDataSpec(DataSpec):
    """Any class-folder tree (e.g. Mini-ImageNet at 84 px), decoded into memory or streamed from disk.

    In memory (the default) the images are decoded once into the cache, resized to
    ``source.image_size`` squared; a dataset larger than the memory available stops at start-up.
    Streamed (``in_memory=false``, a directory tree only) they are read by ``num_workers`` processes
    with the ImageNet transforms: random-resized crop + flip for training (``augment``; ``crop_padding``
    does not apply), resize + center crop for evaluation.

    Args:
        in_memory: decode the whole dataset into memory; false streams it from disk.
        num_workers: decoding processes per device when streaming.
        mean: per-channel normalization mean in [0, 1] pixel units when streaming; null (with
            ``std``) = estimated from 2,000 training images. In memory the statistics of all
            training images are used.
        std: per-channel normalization standard deviation, with ``mean``.
    """

    name: str = "imagefolder"
    source: ImageFolderSource = field(default_factory=ImageFolderSource)
    eval_batch_size: int = 250
    crop_padding: int = 8
    in_memory: bool = True
    num_workers: int = 4
    mean: list[float] | None = None
    std: list[float] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("num_workers", self.num_workers, 0)
        if (self.mean is None) != (self.std is None):
            raise SpecError("std" if self.std is None else "mean", "set data.mean and data.std together, or neither")
        for key in ("mean", "std"):
            values = getattr(self, key)
            if values is not None and (len(values) != 3 or any(not math.isfinite(v) for v in values)):
                raise SpecError(key, f"must be 3 numbers (R, G, B), got {list(values)!r}")
        if self.std is not None and any(v <= 0 for v in self.std):
            raise SpecError("std", f"must be positive, got {list(self.std)!r}")
        root = getattr(self.source, "root", MISSING)
        if not self.in_memory and root != MISSING and "${" not in str(root) and Path(os.path.expanduser(str(root))).is_file():
            raise SpecError("in_memory", f"streaming reads a directory tree, but data.source.root is a file: {root} "
                            "(extract the archive, or use data.in_memory=true)")

    @property
    def streams(self) -> bool:
        return not self.in_memory


@schema_of(DATA_SCHEMAS)
@dataclass
class ImageNetDataSpec(ImageFolderDataSpec):
    """ImageNet (ILSVRC-2012) in its usual layout, ``train/<wnid>/`` and ``val/<wnid>/``, at 224 px:
    streamed from disk (it is ~190 GB decoded) with 8 workers and the standard ImageNet statistics."""

    name: str = "imagenet"
    source: ImageFolderSource = field(default_factory=lambda: ImageFolderSource(root="${paths.data_root}/imagenet", image_size=224))
    eval_batch_size: int = 100
    in_memory: bool = False
    num_workers: int = 8
    mean: list[float] | None = field(default_factory=lambda: [0.485, 0.456, 0.406])
    std: list[float] | None = field(default_factory=lambda: [0.229, 0.224, 0.225])


@schema_of(DATA_SCHEMAS)
@dataclass
class FakeDataSpec(DataSpec):
    """Generated images: tiny, fast, learnable."""

    name: str = "fake"
    source: FakeSource = field(default_factory=FakeSource)
    batch_size: int = 8
    eval_batch_size: int = 64
    augment: bool = False
    crop_padding: int = 2


# --- model ----------------------------------------------------------------------------------------


@dataclass
class ModelSpec:
    """Backbone (see :func:`mbn.models.build_model`); the ``model`` config group.

    Args:
        name: one of :data:`mbn.models.MODEL_NAMES`.
        width: base channels (64 = the standard network; e.g. 16 for narrow CPU runs).
    """

    name: str = MISSING
    width: int = 64

    def __post_init__(self) -> None:
        _named_option(self, MODEL_SCHEMAS)
        _at_least("width", self.width, 1)

    @property
    def options(self) -> dict[str, Any]:
        """Further keyword arguments for ``build_model`` (the fields besides name and width)."""
        return options_of(self, exclude=("name", "width"))


@schema_of(MODEL_SCHEMAS, "resnet18", "resnet34", "resnet50", "imagenet_resnet18", "imagenet_resnet34", "imagenet_resnet50")
@dataclass
class ResNetSpec(ModelSpec):
    """A ResNet (CIFAR-style 3x3 stem, or ``imagenet_resnet*`` with the 7x7/2 stem and max-pool).

    Args:
        zero_init_residual: zero the last norm weight of each residual block.
    """

    zero_init_residual: bool = False


@schema_of(MODEL_SCHEMAS, "vgg11", "vgg16")
@dataclass
class VGGSpec(ModelSpec):
    """A CIFAR-style VGG with a norm layer after every convolution."""


# --- norm -----------------------------------------------------------------------------------------


@dataclass
class NormSpec:
    """Normalization layer (see :func:`mbn.nn.norm_layer`); one subclass per ``norm`` config option.

    Args:
        name: one of :data:`NORM_SCHEMAS` (the names of :data:`mbn.nn.NORM_NAMES`).
    """

    name: str = MISSING
    # Lengths a norm takes in training steps (its layer's unit) or in epochs instead: {steps field:
    # epochs field}. An epochs field (None = unused) is the same fraction of training at every batch
    # size; layer_options converts it with the run's steps per epoch.
    EPOCH_FIELDS: ClassVar[dict[str, str]] = {}
    # The layer's forward reads its Python step counter (a warmup, ramps, a window slot, a burn-in),
    # on which torch.compile guards: every training step recompiles until torch's recompile limit
    # drops the model back to eager, so trainer.compile would only cost compile time.
    RECOMPILES_EACH_STEP: ClassVar[bool] = False

    def __post_init__(self) -> None:
        _named_option(self, NORM_SCHEMAS)
        for steps_key, epochs_key in self.EPOCH_FIELDS.items():
            _at_least(steps_key, getattr(self, steps_key), 0)
            if getattr(self, epochs_key) is None:
                continue
            _within(epochs_key, getattr(self, epochs_key), 0.0, math.inf)
            default = next(f.default for f in dataclasses.fields(self) if f.name == steps_key)
            if getattr(self, steps_key) != default:
                raise SpecError(epochs_key, f"set {steps_key} or {epochs_key}, not both ({steps_key}={getattr(self, steps_key)}; "
                                f"{epochs_key}=null gives the length in steps)")

    @property
    def options(self) -> dict[str, Any]:
        """The fields as keyword arguments for ``norm_layer`` (every field but ``name``)."""
        return options_of(self)

    def layer_options(self, width: int, steps_per_epoch: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``norm_layer`` in a network of base ``width``: :attr:`options`, with
        defaults that depend on the width resolved (GN's groups) and lengths given in epochs
        converted to steps (:attr:`EPOCH_FIELDS`); :meth:`RunSpec.norm_options`.

        Args:
            width: ``model.width``.
            steps_per_epoch: the run's optimizer steps per epoch (None = unknown); needed when an
                epochs field is set.

        Raises:
            SpecError: an epochs field is set and ``steps_per_epoch`` is not given.
        """
        options = self.options
        for steps_key, epochs_key in self.EPOCH_FIELDS.items():
            epochs = options.pop(epochs_key)
            if epochs is None:
                continue
            if steps_per_epoch is None:
                raise SpecError(epochs_key, "needs the run's steps per epoch to be converted to steps")
            options[steps_key] = round(epochs * steps_per_epoch)
        return options


@schema_of(NORM_SCHEMAS)
@dataclass
class BatchNormSpec(NormSpec):
    """Batch normalization (``torch.nn.BatchNorm2d``).

    Args:
        eps: added to the variance.
        momentum: running-statistics update factor.
    """

    name: str = "bn"
    eps: float = 1e-5
    momentum: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _within("eps", self.eps, 0.0, math.inf)
        _within("momentum", self.momentum, 0.0, 1.0)


def width_scaled_gn_groups(width: int) -> int:
    """GN's default groups for a network of base ``width``: the channels per group of GN-32 at width 64.

    32 groups in the standard 64-wide network are 2 channels per group in its first stage, so a
    network of width w gets w/2 groups in every layer (8 at width 16, 4 at width 8, 32 at width 64:
    the paper's setting). For widths where w/2 is no divisor (odd widths) it is the largest divisor
    of w below w/2, and at least 1. Every layer's channel count is a multiple of the width, so the
    groups divide every layer.

    Args:
        width: ``model.width`` (>= 1).
    """
    target = max(1, width * DEFAULT_GN_GROUPS // STANDARD_WIDTH)
    return max(groups for groups in range(1, target + 1) if width % groups == 0)


@schema_of(NORM_SCHEMAS)
@dataclass
class GroupNormSpec(NormSpec):
    """Group normalization: set ``num_groups`` (must divide every layer's channel count, i.e.
    ``model.width``) or ``group_size`` (channels per group), not both. Both null (the default) =
    width-scaled groups, :func:`width_scaled_gn_groups`: 32 groups at width 64 (Wu & He, 2018), the
    same channels per group at any other width (8 groups at width 16), so every width works.

    Args:
        num_groups: groups per layer.
        group_size: channels per group.
        eps: added to the variance.
    """

    name: str = "gn"
    num_groups: int | None = None
    group_size: int | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("num_groups", self.num_groups, 1, optional=True)
        _at_least("group_size", self.group_size, 1, optional=True)
        if self.num_groups is not None and self.group_size is not None:
            raise SpecError("group_size", f"set num_groups or group_size, not both (num_groups={self.num_groups})")
        _within("eps", self.eps, 0.0, math.inf)

    def check_width(self, width: int) -> None:
        """Raise :class:`SpecError` when set groups do not divide a network of base ``width``.

        Every layer's channel count is a multiple of the width, so dividing it is enough; the
        width-scaled default always does.
        """
        if self.group_size is not None and width % self.group_size:
            raise SpecError("group_size", f"{self.group_size} does not divide model.width={width}")
        if self.num_groups is not None and width % self.num_groups:
            raise SpecError("num_groups", f"{self.num_groups} groups do not divide model.width={width} channels "
                            "(null means width-scaled groups, which always do)")

    def layer_options(self, width: int, steps_per_epoch: int | None = None) -> dict[str, Any]:
        """Keyword arguments for ``norm_layer`` in a network of base ``width`` (the default resolved)."""
        options = super().layer_options(width, steps_per_epoch)
        if self.num_groups is None and self.group_size is None:
            options["num_groups"] = width_scaled_gn_groups(width)
        return options


@schema_of(NORM_SCHEMAS)
@dataclass
class BatchRenormSpec(NormSpec):
    """Batch Renormalization (Ioffe, 2017): r/d corrections clipped to r_max/d_max, which ramp up
    after a warmup of plain BN. The warmup and ramps are given in training steps (Ioffe's unit) or
    in epochs (``*_epochs``, converted with the run's steps per epoch), which is the same fraction
    of training at every batch size; the ``norm=brn_epochs`` option sets them so.

    Args:
        r_max: final clip of the std ratio r.
        d_max: final clip of the mean shift d.
        warmup_steps: steps of plain BN (r = 1, d = 0) first.
        r_max_ramp_steps: steps over which r_max ramps from 1.
        d_max_ramp_steps: steps over which d_max ramps from 0.
        warmup_epochs: the warmup in epochs instead (``warmup_steps`` then stays at its default).
        r_max_ramp_epochs: r_max's ramp in epochs instead.
        d_max_ramp_epochs: d_max's ramp in epochs instead.
        momentum: running-statistics update factor.
        eps: added to the variance.
    """

    EPOCH_FIELDS: ClassVar[dict[str, str]] = {
        "warmup_steps": "warmup_epochs", "r_max_ramp_steps": "r_max_ramp_epochs", "d_max_ramp_steps": "d_max_ramp_epochs"}
    RECOMPILES_EACH_STEP: ClassVar[bool] = True

    name: str = "brn"
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 0
    r_max_ramp_steps: int = 5000
    d_max_ramp_steps: int = 5000
    warmup_epochs: float | None = None
    r_max_ramp_epochs: float | None = None
    d_max_ramp_epochs: float | None = None
    momentum: float = 0.1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _within("r_max", self.r_max, 1.0, math.inf)
        _within("d_max", self.d_max, 0.0, math.inf)
        _within("momentum", self.momentum, 0.0, 1.0)
        _within("eps", self.eps, 0.0, math.inf)


@schema_of(NORM_SCHEMAS)
@dataclass
class MomentumBatchNormSpec(NormSpec):
    """Momentum Batch Normalization (Yong et al., ECCV 2020): training statistics with momentum
    lam(t) from 0 (epoch 1) to 1 - m/m0 (last epoch); running statistics with tau = tau0 ** (m/m0).

    Args:
        ideal_batch_size: m0.
        tau0: running-statistics momentum at m = m0.
        schedule: ``epoch`` (lam changes once per epoch, the paper), ``iteration`` (per step) or
            ``fixed`` (``fixed_lam`` throughout).
        fixed_lam: lam for ``schedule=fixed``.
        eps: added to the variance.
    """

    name: str = "mbn"
    ideal_batch_size: float = 32
    tau0: float = 0.9
    schedule: str = "epoch"
    fixed_lam: float | None = None
    eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _within("ideal_batch_size", self.ideal_batch_size, 1.0, math.inf)
        _within("tau0", self.tau0, 0.0, 1.0)
        _one_of("schedule", self.schedule, MBN_SCHEDULES)
        if self.schedule == "fixed":
            _within("fixed_lam", self.fixed_lam, 0.0, 1.0, high_open=True)
        elif self.fixed_lam is not None:
            raise SpecError("fixed_lam", f"only applies with norm.schedule=fixed, got {self.fixed_lam!r}")
        _within("eps", self.eps, 0.0, math.inf)


@schema_of(NORM_SCHEMAS)
@dataclass
class NoNormSpec(NormSpec):
    """No normalization (identity)."""

    name: str = "none"


# B0's options are BN's (eps, momentum; the same checks), so its schema is BN's.
@schema_of(NORM_SCHEMAS)
@dataclass
class EvoNormB0Spec(BatchNormSpec):
    """EvoNorm-B0 (Liu et al., NeurIPS 2020): x / max(sqrt(batch variance + eps), v * x + sqrt(instance
    variance + eps)) * gamma + beta, with a running variance (as BN's) at inference.

    Args:
        eps: added to both variances.
        momentum: running-variance update factor.
    """

    name: str = "evonorm_b0"


# S0's groups follow GN's rules, so its schema is GN's (same fields, checks and width-scaled default;
# RunSpec checks the groups against the width for both).
@schema_of(NORM_SCHEMAS)
@dataclass
class EvoNormS0Spec(GroupNormSpec):
    """EvoNorm-S0 (Liu et al., NeurIPS 2020): x * sigmoid(v * x) / group std * gamma + beta, batch-independent.
    Groups as GN's (:class:`GroupNormSpec`): ``num_groups`` or ``group_size``, both null = width-scaled
    groups (32 at width 64).

    Args:
        num_groups: groups per layer.
        group_size: channels per group.
        eps: added to the group variance.
    """

    name: str = "evonorm_s0"


@schema_of(NORM_SCHEMAS)
@dataclass
class FilterResponseNormSpec(NormSpec):
    """Filter Response Normalization + TLU (Singh & Krishnan, CVPR 2020): max(gamma * x / sqrt(mean
    over HxW of x^2 + eps) + beta, tau), batch-independent.

    Args:
        eps: added to the mean square.
    """

    name: str = "frn"
    eps: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        _within("eps", self.eps, 0.0, math.inf)


@schema_of(NORM_SCHEMAS)
@dataclass
class MovingAverageBatchNormSpec(NormSpec):
    """Moving Average Batch Normalization (Yan et al., ICLR 2020): normalization by the second
    moment averaged over the last ``window`` iterations, the backward statistic an exponential
    moving average, the convolutions in front centered (:class:`mbn.nn.MovingAverageBatchNorm2d`).

    Args:
        window: iterations in the forward statistics' moving average, the current one included.
        momentum: running-statistics update factor (weight of the new statistic).
        grad_momentum: update factor of the backward statistic's moving average.
        warmup_steps: steps with the batch's own statistics first.
        r_max: limit of the renormalization factor r.
        renorm_warmup_steps: steps with r = 1 first.
        eps: added to the second moment.
    """

    RECOMPILES_EACH_STEP: ClassVar[bool] = True

    name: str = "mabn"
    window: int = 16
    momentum: float = 0.02
    grad_momentum: float = 0.02
    warmup_steps: int = 100
    r_max: float = 5.0
    renorm_warmup_steps: int = 1000
    eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("window", self.window, 1)
        _within("momentum", self.momentum, 0.0, 1.0, low_open=True)
        _within("grad_momentum", self.grad_momentum, 0.0, 1.0, low_open=True)
        _at_least("warmup_steps", self.warmup_steps, 0)
        _within("r_max", self.r_max, 1.0, math.inf)
        _at_least("renorm_warmup_steps", self.renorm_warmup_steps, 0)
        _within("eps", self.eps, 0.0, math.inf)


@schema_of(NORM_SCHEMAS)
@dataclass
class CrossIterationBatchNormSpec(NormSpec):
    """Cross-Iteration Batch Normalization (Yao et al., CVPR 2021): the statistics of the last
    ``window`` iterations, compensated for the change of the convolution in front by a first-order
    Taylor expansion, after a burn-in of plain BN (:class:`mbn.nn.CrossIterationBatchNorm2d`). The
    burn-in is given in epochs, as the reference code does (its ``tools/train.py`` converts the
    configs' ``burnin`` from epochs to iterations), or in steps with ``burnin_epochs=null``.

    Args:
        window: iterations pooled, the current one included (1 = plain BN).
        burnin_steps: steps of plain BN first (used when ``burnin_epochs`` is null).
        burnin_epochs: epochs of plain BN first (the reference configs' 8), converted with the
            run's steps per epoch.
        momentum: running-statistics update factor.
        eps: added to the variance.
    """

    EPOCH_FIELDS: ClassVar[dict[str, str]] = {"burnin_steps": "burnin_epochs"}
    RECOMPILES_EACH_STEP: ClassVar[bool] = True

    name: str = "cbn"
    window: int = 4
    burnin_steps: int = 0
    burnin_epochs: float | None = 8.0
    momentum: float = 0.1
    eps: float = 1e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        _at_least("window", self.window, 1)
        _within("momentum", self.momentum, 0.0, 1.0)
        _within("eps", self.eps, 0.0, math.inf)


# --- optimization, trainer, loggers ---------------------------------------------------------------


@dataclass
class OptimSpec:
    """SGD with linear lr scaling and a step or cosine schedule over the whole run (the paper's recipe).

    Args:
        name: the optimizer (``sgd``).
        base_lr: lr at ``reference_batch_size``; the run uses ``base_lr * global_batch / reference_batch_size``.
        reference_batch_size: batch size at which ``base_lr`` applies.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: L2 penalty.
        decay_norm_params: apply weight decay to norm-layer parameters and biases too (the paper does).
        schedule: ``step`` (multiply by ``gamma`` at each milestone) or ``cosine`` (to zero).
        milestones: fractions of training, increasing in (0, 1), at which the step schedule decays.
        gamma: step decay factor.
        warmup_epochs: linear warmup length in epochs (fractional allowed).
    """

    name: str = "sgd"
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

    def __post_init__(self) -> None:
        _one_of("name", self.name, ("sgd",))
        _within("base_lr", self.base_lr, 0.0, math.inf, low_open=True)
        _at_least("reference_batch_size", self.reference_batch_size, 1)
        _within("momentum", self.momentum, 0.0, 1.0, high_open=True)
        _within("weight_decay", self.weight_decay, 0.0, math.inf)
        _one_of("schedule", self.schedule, LR_SCHEDULES)
        _within("gamma", self.gamma, 0.0, 1.0, low_open=True)
        _within("warmup_epochs", self.warmup_epochs, 0.0, math.inf)
        # OmegaConf hands sequences over as lists.
        self.milestones = tuple(self.milestones)
        if any(isinstance(m, bool) or not 0 < m < 1 for m in self.milestones):
            raise SpecError("milestones", f"must be a list of fractions of training in (0, 1), got {list(self.milestones)!r}")
        if list(self.milestones) != sorted(self.milestones):
            raise SpecError("milestones", f"must be increasing, got {list(self.milestones)!r}")

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
        benchmark: ``torch.backends.cudnn.benchmark`` (GPU only).
        num_threads: ``torch.set_num_threads`` when set; null = PyTorch's default.
        progress_bar: Lightning's progress bar; ``None`` = only when stdout is a terminal (plain
            per-epoch log lines otherwise).
        check_finite_every_n_steps: how often (in steps) the summed training loss is checked for
            NaN/inf (one host sync); a non-finite loss stops the run as ``diverged``.
        compile: ``torch.compile`` the model in place (``nn.Module.compile``: state_dict keys and
            checkpoints stay the same). Pays a one-off compile time per run; at small batch sizes it
            removes most of MBN's per-op overhead (BENCHMARKS.md). Needs torch >= 2.6 (COMPILE_MIN_TORCH).
            Refused with a norm that would recompile every step (``NormSpec.RECOMPILES_EACH_STEP``: BRN, MABN, CBN).
        mbn_history: under DDP, whose batches MBN's momentum statistics M/Phi average:
            ``per_device`` (each device its own, as it normalizes its own batch: the paper's
            per-device normalization; every device's are checkpointed, so resumes stay exact) or
            ``rank0`` (rank 0's, copied to every device at each forward, as DDP does with every
            buffer). The running statistics (evaluation, the saved model) are rank 0's either way.
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
    mbn_history: str = "per_device"

    def __post_init__(self) -> None:
        _one_of("accelerator", self.accelerator, ACCELERATORS)
        _one_of("mbn_history", self.mbn_history, MBN_HISTORIES)
        _one_of("precision", self.precision, PRECISIONS)
        _at_least("devices", self.devices, 1)
        _at_least("num_nodes", self.num_nodes, 1)
        _at_least("num_threads", self.num_threads, 1, optional=True)
        _at_least("check_finite_every_n_steps", self.check_finite_every_n_steps, 1)
        if self.compile:
            version = _installed_torch()
            release = re.match(r"(\d+)\.(\d+)", version or "")
            if release and tuple(map(int, release.groups())) < COMPILE_MIN_TORCH:
                raise SpecError("compile", f"needs torch >= {'.'.join(map(str, COMPILE_MIN_TORCH))} (older torch.compile "
                                           f"recompiles MBN for every new lam), this is torch {version}: set trainer.compile=false")

    @property
    def world_size(self) -> int:
        """Number of processes (devices x nodes)."""
        return self.devices * self.num_nodes


@schema_of(LOGGER_SCHEMAS, "csv")
@dataclass
class CsvLoggerSpec:
    """``metrics.csv`` under ``<run dir>/csv/`` (always on, even when not selected)."""

    always_on: ClassVar[bool] = True


@schema_of(LOGGER_SCHEMAS, "tensorboard")
@dataclass
class TensorBoardSpec:
    """TensorBoard event files under ``<run dir>/tensorboard/``."""


@schema_of(LOGGER_SCHEMAS, "wandb")
@dataclass
class WandbSpec:
    """Weights & Biases logging (one W&B run per training run). Offline unless ``offline=false``
    (then ``wandb login`` first); offline runs land in ``<run dir>/wandb/`` and upload with
    ``wandb sync <run dir>/wandb/offline-run-*``.

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
    """Which metric loggers run: the selected options of the ``logger`` group, by name.

    Args:
        selected: logger name (a key of :data:`LOGGER_SCHEMAS`) -> its options, an object of that
            name's schema, e.g. ``{"tensorboard": TensorBoardSpec()}``. A logger whose schema is
            ``always_on`` (CSV) runs whether selected or not.
    """

    selected: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, options in self.selected.items():
            schema = LOGGER_SCHEMAS.get(name)
            if schema is None:
                raise SpecError(name, f"unknown logger; expected one of {', '.join(LOGGER_SCHEMAS)}")
            if not isinstance(options, schema):
                raise SpecError(name, f"must be a {schema.__name__}, got {options!r}")

    def active(self) -> dict[str, Any]:
        """Every logger that runs, by name, in :data:`LOGGER_SCHEMAS` order: the selected ones and the
        ``always_on`` ones (with their default options when not selected)."""
        return {
            name: self.selected[name] if name in self.selected else schema()
            for name, schema in LOGGER_SCHEMAS.items()
            if name in self.selected or getattr(schema, "always_on", False)
        }


# --- the run --------------------------------------------------------------------------------------


def _stays_in_parent(name: str) -> bool:
    """A dir name that ``parent / name`` keeps inside ``parent``: not empty, ``.`` or ``..``, no ``/``."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\0" not in name


@dataclass
class RunSpec:
    """Everything one training run needs; checks the rules that span its parts.

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
        cache_dir: decoded-dataset cache for kinds that take one (``None`` = :mod:`mbn.data`'s
            default); where the cache lives never changes what a run computes.
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
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _at_least("seed", self.seed, 0)
        _at_least("epochs", self.epochs, 1)
        for key, name in (("sweep_name", self.sweep_name), ("run_name", self.run_name)):
            if not _stays_in_parent(name):
                raise SpecError(key, f"must name a dir inside its parent (not empty, '.' or '..', no '/'), got {name!r}")
        one_batch = self.data.batch_size * self.trainer.world_size
        devices = f"{self.trainer.world_size} device(s)"
        if self.data.train_subset is not None and self.data.train_subset < one_batch:
            raise SpecError("data.train_subset",
                            f"{self.data.train_subset} images cannot fill one batch of data.batch_size={self.data.batch_size} on {devices}")
        if isinstance(self.data.source, FakeSource) and self.data.train_subset is None and self.data.source.num_train < one_batch:
            raise SpecError("data.source.num_train",
                            f"{self.data.source.num_train} images cannot fill one batch of data.batch_size={self.data.batch_size} on {devices}")
        if isinstance(self.norm, GroupNormSpec):
            try:
                self.norm.check_width(self.model.width)
            except SpecError as exc:
                raise exc.under("norm") from None
        if self.trainer.compile and self.norm.RECOMPILES_EACH_STEP:
            raise SpecError("trainer.compile", f"norm={self.norm.name} would recompile at every training step (its layers read a "
                            "Python step counter, on which torch.compile guards) and fall back to eager at torch's recompile "
                            "limit: set trainer.compile=false")
        if self.optim.warmup_epochs >= self.epochs:
            raise SpecError("optim.warmup_epochs", f"{self.optim.warmup_epochs:g} must be shorter than epochs={self.epochs}")

    @property
    def global_batch_size(self) -> int:
        """Samples per optimizer step over all devices."""
        return self.data.batch_size * self.trainer.world_size

    def norm_options(self, steps_per_epoch: int | None = None) -> dict[str, Any]:
        """Keyword arguments of the run's ``norm_layer``, width-dependent defaults resolved and lengths
        in epochs converted to steps.

        Args:
            steps_per_epoch: optimizer steps per epoch (:meth:`mbn.train.datamodule.ImageDataModule.steps_per_epoch`);
                needed by a norm with lengths in epochs.
        """
        return self.norm.layer_options(self.model.width, steps_per_epoch)
