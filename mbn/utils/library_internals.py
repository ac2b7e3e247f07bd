"""The one module that uses private names of the libraries underneath (torch, the DataLoader,
TensorBoard, Lightning): each use is one small function here, saying why no public API does it, and
each has a test (tests/utils/test_library_internals.py) that fails naming the library's version when
a release changes what the function relies on. tests/test_private_apis.py fails on any private use
elsewhere in ``mbn/``.

Only torch is imported at module level (``mbn.nn`` uses this module, and the layers need nothing but
torch); the other libraries are imported inside the functions that use them.
"""

from __future__ import annotations

import importlib.metadata
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
from torch import Tensor

if TYPE_CHECKING:
    from pytorch_lightning.loggers import WandbLogger
    from torch.utils.data import DataLoader
    from torch.utils.tensorboard import SummaryWriter


class LibraryChangedError(RuntimeError):
    """A library no longer has what a function of :mod:`mbn.utils.library_internals` relies on."""


def library_changed(distribution: str, what: str, function: str) -> LibraryChangedError:
    """The error for ``function`` of this module when ``distribution`` (as installed) lacks ``what``.

    Args:
        distribution: the library's distribution name, e.g. ``torch``.
        what: what is missing or different, e.g. ``DataLoader._iterator is gone``.
        function: the function of this module that needs updating.
    """
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = "(version unknown)"
    return LibraryChangedError(f"{distribution} {version}: {what}; mbn.utils.library_internals.{function} "
                               "needs updating for this version")


# -- torch ----------------------------------------------------------------------------------------
def foreach_lerp(starts: Sequence[Tensor], ends: Sequence[Tensor], weight: float | Sequence[Tensor]) -> list[Tensor]:
    """``[torch.lerp(s, e, weight) for s, e in zip(starts, ends)]`` as one multi-tensor kernel.

    torch has no public multi-tensor ("foreach") ops; ``torch._foreach_*`` is what ``torch.optim``
    uses. MBN's training step updates both momentum statistics with it (mbn.nn.functional), a form
    its ``torch.compile`` tests (tests/nn/test_compile.py) were written against.

    Args:
        starts: the tensors interpolated from.
        ends: the tensors interpolated to, one per start.
        weight: a number, or one 0-dim tensor per start.
    """
    return torch._foreach_lerp(starts, ends, weight)


def foreach_copy_(targets: Sequence[Tensor], sources: Sequence[Tensor]) -> None:
    """``target.copy_(source)`` for each pair, as one multi-tensor kernel (see :func:`foreach_lerp`).

    Args:
        targets: the tensors written in place.
        sources: one tensor per target.
    """
    torch._foreach_copy_(targets, sources)


def foreach_add(tensors: Sequence[Tensor], others: Sequence[Tensor], alpha: float = 1.0) -> list[Tensor]:
    """``[t.add(o, alpha=alpha) for t, o in zip(tensors, others)]`` as one multi-tensor op (see :func:`foreach_lerp`)."""
    return list(torch._foreach_add(tensors, others, alpha=alpha))


def foreach_add_(tensors: Sequence[Tensor], others: Sequence[Tensor], alpha: float = 1.0) -> None:
    """``t.add_(o, alpha=alpha)`` for each pair, as one multi-tensor op (see :func:`foreach_lerp`)."""
    torch._foreach_add_(tensors, others, alpha=alpha)


def foreach_mul_(tensors: Sequence[Tensor], scalar: float) -> None:
    """``t.mul_(scalar)`` for each tensor, as one multi-tensor op (see :func:`foreach_lerp`)."""
    torch._foreach_mul_(tensors, scalar)


def foreach_addcmul(tensors: Sequence[Tensor], factors1: Sequence[Tensor], factors2: Sequence[Tensor]) -> list[Tensor]:
    """``[t.addcmul(a, b) for ...]`` (``t + a * b``, broadcasting ``b``) as one multi-tensor op (see :func:`foreach_lerp`)."""
    return list(torch._foreach_addcmul(tensors, factors1, factors2))


def foreach_addcmul_(tensors: Sequence[Tensor], factors1: Sequence[Tensor], factors2: Sequence[Tensor]) -> None:
    """``t.addcmul_(a, b)`` (``t += a * b``, broadcasting ``b``) for each triple, as one multi-tensor op (see :func:`foreach_lerp`)."""
    torch._foreach_addcmul_(tensors, factors1, factors2)


def own_buffers(module: torch.nn.Module) -> dict[str, Tensor | None]:
    """The live dict of ``module``'s own buffers (not its children's), by name: reading
    ``own_buffers(layer)["running_mean"]`` is ``layer.running_mean``.

    For the forward of every norm layer at every step: ``nn.Module`` keeps buffers in its private
    ``_buffers`` dict, and the public ways to them, attribute access through ``nn.Module.__getattr__``
    and ``get_buffer``, take about 10 and 30 times as long as this dict lookup (1.4 us against
    0.13 us on CPU; a few such reads are ~10% of a small MBN layer's CPU forward). Write buffers
    through the module (``setattr``, ``register_buffer``), not through this dict.

    Args:
        module: any ``nn.Module``.
    """
    return module._buffers


def ignore_in_ddp(module: torch.nn.Module, names: Iterable[str]) -> None:
    """Make ``DistributedDataParallel(module)`` leave the parameters and buffers ``names`` alone: no
    gradient all-reduce, no broadcast from rank 0. Call before wrapping ``module``.

    DDP has no public argument for this; it reads the list from the module's
    ``_ddp_params_and_buffers_to_ignore`` attribute (what its private
    ``_set_params_and_buffers_to_ignore_for_model`` sets). Names already listed are kept.

    Args:
        module: the module DDP will wrap.
        names: full names relative to ``module``, e.g. ``layer1.0.bn1.momentum_mean``.
    """
    ignored = list(getattr(module, "_ddp_params_and_buffers_to_ignore", []))
    module._ddp_params_and_buffers_to_ignore = ignored + [name for name in names if name not in ignored]


# -- the DataLoader -------------------------------------------------------------------------------
def stop_dataloader_workers(loader: DataLoader) -> None:
    """Stop ``loader``'s persistent worker processes now; iterating it again starts new ones.

    With ``persistent_workers=True`` the DataLoader keeps its workers' iterator (``_iterator``)
    between epochs, and they stop only when that iterator is garbage collected: there is no public
    way to stop them. A suspended ``for`` loop over the loader (a fit that raised mid-epoch) holds
    the iterator too, so dropping the loader does not stop them either; this shuts them down
    whoever holds the iterator. Does nothing without persistent workers or before the first epoch.

    Args:
        loader: the DataLoader.

    Raises:
        LibraryChangedError: the DataLoader keeps its iterator, or stops its workers, differently.
    """
    if "_iterator" not in vars(loader):
        raise library_changed("torch", "DataLoader._iterator (the persistent workers' iterator) is gone", "stop_dataloader_workers")
    iterator = loader._iterator
    if iterator is None:
        return
    if not hasattr(iterator, "_shutdown_workers"):
        raise library_changed("torch", f"{type(iterator).__name__}._shutdown_workers is gone", "stop_dataloader_workers")
    loader._iterator = None
    iterator._shutdown_workers()


# -- TensorBoard ----------------------------------------------------------------------------------
def write_tensorboard_summaries(writer: SummaryWriter, summaries: Iterable[Any]) -> None:
    """Append ready-made ``Summary`` protos (e.g. the HParams plugin's ``session_start_info``) to
    the event file ``writer`` writes its scalars to, and flush it.

    ``SummaryWriter`` writes such protos only through its private ``_get_file_writer()``: its public
    ``add_hparams`` writes them into a new run dir, together with an ``experiment`` summary, and
    Lightning's ``TensorBoardLogger.log_hyperparams(params, metrics)`` writes that ``experiment``
    summary as well (see :class:`mbn.train.loggers.TensorBoardHParams` for why a run writes none).

    Args:
        writer: a ``torch.utils.tensorboard.SummaryWriter`` (a TensorBoardLogger's ``experiment``).
        summaries: ``tensorboard.compat.proto.summary_pb2.Summary`` objects.

    Raises:
        LibraryChangedError: ``SummaryWriter`` no longer has ``_get_file_writer``.
    """
    get_file_writer = getattr(writer, "_get_file_writer", None)
    if get_file_writer is None:
        raise library_changed("torch", "SummaryWriter._get_file_writer is gone", "write_tensorboard_summaries")
    file_writer = get_file_writer()
    for summary in summaries:
        file_writer.add_summary(summary)
    writer.flush()


# -- Lightning ------------------------------------------------------------------------------------
def started_wandb_run(logger: WandbLogger) -> Any | None:
    """The W&B run ``logger`` has started or attached to, or None if it has none yet.

    ``WandbLogger.experiment``, the public way to the run, starts one when there is none (to finish
    a logger that never logged would start a run just to end it), and returns a dummy on ranks > 0;
    the run it holds is its ``_experiment``.

    Args:
        logger: a Lightning ``WandbLogger``.

    Raises:
        LibraryChangedError: ``WandbLogger`` no longer keeps its run in ``_experiment``.
    """
    if "_experiment" not in vars(logger):
        raise library_changed("pytorch-lightning", "WandbLogger._experiment (its run) is gone", "started_wandb_run")
    return logger._experiment


# -- Hydra ----------------------------------------------------------------------------------------
def hydra_job_dir_in_traceback(exc: BaseException) -> str | None:
    """The output dir of the Hydra job that ``exc`` was raised in, or None if it was not raised in one.

    Hydra resets its config (``HydraConfig``) when a job raises, so once the exception reaches the
    caller of ``hydra.main`` no public API names the job's dir; the dir is a local of
    ``hydra.core.utils.run_job``, read here from that frame of the traceback.

    Args:
        exc: an exception raised through ``hydra.main`` (with ``HYDRA_FULL_ERROR=1``, which re-raises it).
    """
    traceback = exc.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if (frame.f_code.co_name == "run_job" and frame.f_globals.get("__name__") == "hydra.core.utils"
                and frame.f_locals.get("output_dir")):
            return str(frame.f_locals["output_dir"])
        traceback = traceback.tb_next
    return None
