"""Each function of mbn.utils.library_internals against the installed library, with real objects: a
failure names the library and its version, the sign that a release changed a private name mbn uses."""

from __future__ import annotations

import importlib.metadata
import multiprocessing
import sys

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from mbn.utils import library_internals
from mbn.utils.library_internals import (
    LibraryChangedError,
    foreach_add,
    foreach_add_,
    foreach_addcmul,
    foreach_addcmul_,
    foreach_copy_,
    foreach_lerp,
    foreach_mul_,
    hydra_job_dir_in_traceback,
    ignore_in_ddp,
    own_buffers,
    started_wandb_run,
    stop_dataloader_workers,
    write_tensorboard_summaries,
)


def changed(distribution: str, what: str) -> str:
    """The failure message: the library, its installed version, what no longer holds."""
    return f"{distribution} {importlib.metadata.version(distribution)}: {what}; update mbn.utils.library_internals"


def test_foreach_lerp_and_copy_are_lerp_and_copy_per_tensor():
    """Exact equality: the multi-tensor ops run torch.lerp's formula and copy_ per tensor, bit for bit."""
    generator = torch.Generator().manual_seed(0)
    starts = [torch.randn(5, generator=generator), torch.randn(3, generator=generator)]
    ends = [torch.randn(5, generator=generator), torch.randn(3, generator=generator)]
    weights = (torch.tensor(0.3), torch.tensor(0.3))
    for weight in (0.3, weights):
        try:
            results = foreach_lerp(starts, ends, weight)
        except AttributeError as exc:
            pytest.fail(changed("torch", f"torch._foreach_lerp is gone ({exc})"))
        expected = [torch.lerp(s, e, 0.3) for s, e in zip(starts, ends)]
        assert all(torch.equal(r, x) for r, x in zip(results, expected)), changed("torch", "_foreach_lerp computes otherwise")
    targets = [torch.zeros(5), torch.zeros(3)]
    try:
        foreach_copy_(targets, ends)
    except AttributeError as exc:
        pytest.fail(changed("torch", f"torch._foreach_copy_ is gone ({exc})"))
    assert all(torch.equal(t, e) for t, e in zip(targets, ends)), changed("torch", "_foreach_copy_ copies otherwise")


def test_foreach_arithmetic_is_the_per_tensor_op_bit_for_bit():
    """Exact equality with the per-tensor op, broadcasting a K x 1 column where MemberSGD does."""
    generator = torch.Generator().manual_seed(0)
    tensors = [torch.randn(4, 6, generator=generator), torch.randn(4, 1, generator=generator)]
    others = [torch.randn(4, 6, generator=generator), torch.randn(4, 1, generator=generator)]
    column = torch.randn(4, 1, generator=generator)
    try:
        added = foreach_add(tensors, others, alpha=0.3)
        products = foreach_addcmul(tensors, others, [column, column])
        targets = [t.clone() for t in tensors]
        foreach_add_(targets, others, alpha=-0.7)
        scaled = [t.clone() for t in tensors]
        foreach_mul_(scaled, 0.9)
        stepped = [t.clone() for t in tensors]
        foreach_addcmul_(stepped, others, [column, column])
    except (AttributeError, RuntimeError) as exc:
        pytest.fail(changed("torch", f"a torch._foreach_* op is gone or takes other arguments ({exc})"))
    cases = {
        "_foreach_add": (added, [t.add(o, alpha=0.3) for t, o in zip(tensors, others)]),
        "_foreach_addcmul": (products, [t.addcmul(o, column) for t, o in zip(tensors, others)]),
        "_foreach_add_": (targets, [t.add(o, alpha=-0.7) for t, o in zip(tensors, others)]),
        "_foreach_mul_": (scaled, [t.mul(0.9) for t in tensors]),
        "_foreach_addcmul_": (stepped, [t.addcmul(o, column) for t, o in zip(tensors, others)]),
    }
    for op, (results, expected) in cases.items():
        assert all(torch.equal(r, x) for r, x in zip(results, expected)), changed("torch", f"{op} computes otherwise")


def test_own_buffers_is_the_live_dict_of_the_module_s_own_buffers():
    model = nn.Sequential(nn.BatchNorm1d(3))
    layer = model[0]
    buffers = own_buffers(layer)
    assert isinstance(buffers, dict), changed("torch", "nn.Module._buffers is not a dict")
    assert list(buffers) == [name for name, _ in layer.named_buffers(recurse=False)], changed("torch", "_buffers lists other names")
    assert buffers["running_mean"] is layer.running_mean, changed("torch", "_buffers holds other tensors")
    layer.running_mean = torch.ones(3)  # a write through the module is seen
    assert buffers["running_mean"] is layer.running_mean, changed("torch", "_buffers is not the live dict")
    assert own_buffers(model) == {}  # the container's own buffers only


def test_ignore_in_ddp_is_what_distributed_data_parallel_leaves_out(tmp_path):
    model = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    ignore_in_ddp(model, ["1.running_mean"])
    ignore_in_ddp(model, ["1.running_var", "1.running_mean"])  # names already listed are kept once
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = nn.parallel.DistributedDataParallel(model)
        ignored = wrapped.parameters_to_ignore
    finally:
        torch.distributed.destroy_process_group()
    assert ignored == {"1.running_mean", "1.running_var"}, changed("torch", "DDP reads its ignored names elsewhere")


def test_stop_dataloader_workers_stops_persistent_workers_even_mid_epoch():
    loader = DataLoader(list(range(8)), batch_size=2, num_workers=2, persistent_workers=True)
    stop_dataloader_workers(loader)  # before the first epoch: nothing to stop
    before = set(multiprocessing.active_children())
    epoch = iter(loader)
    next(epoch)  # a suspended epoch (a fit that raised) still holds the workers' iterator
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    stop_dataloader_workers(loader)
    assert not any(worker.is_alive() for worker in workers), changed("torch", "the persistent workers kept running")
    assert sorted(int(x) for batch in loader for x in batch) == list(range(8))  # a new epoch starts new workers
    stop_dataloader_workers(loader)
    assert set(multiprocessing.active_children()) <= before


def test_stop_dataloader_workers_names_torch_when_the_loader_changed():
    loader = DataLoader(list(range(4)), batch_size=2)
    assert "_iterator" in vars(loader), changed("torch", "DataLoader._iterator is gone")
    del loader.__dict__["_iterator"]  # as a torch without it
    with pytest.raises(LibraryChangedError, match=rf"^torch {torch.__version__.split('+')[0]}.*: DataLoader\._iterator"):
        stop_dataloader_workers(loader)


def test_write_tensorboard_summaries_appends_to_the_writer_s_own_event_file(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    writer = SummaryWriter(str(tmp_path))
    writer.add_scalar("final/val_acc1", 0.5, 3)
    _, session_start, session_end = hparams({"norm": "mbn", "seed": 1}, {"final/val_acc1": 0.5})
    write_tensorboard_summaries(writer, [session_start, session_end])
    writer.close()
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1, changed("torch", "the summaries went to another file")
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    assert set(events.PluginTagToContent("hparams")) == {"_hparams_/session_start_info", "_hparams_/session_end_info"}
    assert [(e.step, e.value) for e in events.Scalars("final/val_acc1")] == [(3, 0.5)]


def test_started_wandb_run_is_none_until_the_logger_starts_one(tmp_path, monkeypatch):
    from pytorch_lightning.loggers import WandbLogger

    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="mbn-test")
    assert started_wandb_run(logger) is None, changed("pytorch-lightning", "a WandbLogger starts with a run")
    run = logger.experiment
    try:
        assert started_wandb_run(logger) is run, changed("pytorch-lightning", "WandbLogger keeps its run elsewhere")
    finally:
        run.finish()


def test_hydra_job_dir_in_traceback_names_the_dir_of_the_job_that_raised(tmp_path, monkeypatch):
    import hydra

    (tmp_path / "task.yaml").write_text("x: 1\n")

    @hydra.main(version_base=None, config_path=str(tmp_path), config_name="task")
    def task(cfg) -> None:
        raise RuntimeError("the job failed")

    job_dir = tmp_path / "job=1"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")  # hydra.main re-raises the job's exception
    monkeypatch.setattr(sys, "argv", ["task", f"hydra.run.dir='{job_dir}'"])
    with pytest.raises(RuntimeError, match="the job failed") as raised:
        task()
    assert hydra_job_dir_in_traceback(raised.value) == str(job_dir), changed(
        "hydra-core", "hydra.core.utils.run_job no longer has the job's dir in its local output_dir")
    assert hydra_job_dir_in_traceback(RuntimeError("not from a job")) is None


def test_every_function_of_the_adapter_is_tested_here():
    tested = {name for name in globals() if callable(getattr(library_internals, name, None))}
    public = {name for name, value in vars(library_internals).items()
              if callable(value) and getattr(value, "__module__", None) == library_internals.__name__
              and not name.startswith("_") and not isinstance(value, type) and name != "library_changed"}
    assert public <= tested
