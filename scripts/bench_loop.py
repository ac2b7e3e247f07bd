"""Per-step overhead of mbn's Lightning training path against a bare PyTorch loop.

Both sides train the same model (ResNet-18 with MBN), on the same in-memory data loader
(:class:`mbn.data.TensorBatchLoader`), with the same SGD + per-step lr schedule and the MBN progress
update per step, for a fixed number of steps. The Lightning side is the real thing: ``mbn.train``'s
run, ``mbn.train.train`` (module, data module, callbacks, checkpointing and CSV logger). Only the
training steps are timed (from the first timed batch start to the last batch end), after a few
warm-up steps; the two sides alternate several times in one process and the median ratio is
printed.

    python scripts/bench_loop.py [--steps-m2 300] [--steps-m32 60] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import Callback

from mbn.data import TensorBatchLoader, load_dataset
from mbn.models import build_model
from mbn.nn import mbn_layers, norm_layer, set_progress
from mbn.train.optim import build_optimizer
from mbn.train.run import train
from mbn.train.spec import FakeDataSpec, FakeSource, MomentumBatchNormSpec, OptimSpec, ResNetSpec, RunSpec, TrainerSpec

WARMUP_STEPS = 10


class StepTimer(Callback):
    """Wall time from the start of batch ``WARMUP_STEPS`` to the end of the last training batch."""

    def __init__(self) -> None:
        self.start = self.end = 0.0
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == WARMUP_STEPS:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.end = time.perf_counter()
        self.steps = batch_idx + 1


def make_spec(batch_size: int, steps: int, output_dir: Path, width: int) -> RunSpec:
    return RunSpec(
        data=FakeDataSpec(
            source=FakeSource(num_train=batch_size * steps, num_test=64, image_size=32, seed=0),
            batch_size=batch_size,
            eval_batch_size=64,
            augment=True,
        ),
        model=ResNetSpec("resnet18", width=width),
        norm=MomentumBatchNormSpec(),
        optim=OptimSpec(),
        trainer=TrainerSpec(progress_bar=False),
        epochs=1,
        output_dir=output_dir,
        run_name="bench",
    )


def lightning_seconds_per_step(spec: RunSpec) -> float:
    timer = StepTimer()
    results = train(spec, callbacks=[timer])
    if results["status"] != "completed":
        raise RuntimeError(f"the Lightning run ended {results['status']}: {results.get('error')}")
    return (timer.end - timer.start) / (timer.steps - WARMUP_STEPS)


def bare_seconds_per_step(spec: RunSpec) -> float:
    splits = load_dataset(spec.data.name, **spec.data.source_options)
    pl.seed_everything(spec.seed, verbose=False)
    model = build_model("resnet18", splits.num_classes, norm_layer("mbn"), width=spec.model.width)
    loader = TensorBatchLoader(
        splits.train, spec.data.batch_size, mean=splits.mean, std=splits.std, shuffle=True,
        drop_last=True, augment=True, seed=spec.seed, crop_padding=spec.data.crop_padding,
    )
    steps = len(loader)
    optimizer, scheduler = build_optimizer(model, spec.optim, spec.data.batch_size, steps, steps)
    layers = mbn_layers(model)
    # The same epoch statistics the Lightning module keeps (loss sum, correct, samples, batches).
    sums = torch.zeros(4, dtype=torch.float64)
    model.train()
    start = 0.0
    for batch_idx, (x, y) in enumerate(loader):
        if batch_idx == WARMUP_STEPS:
            start = time.perf_counter()
        set_progress(layers, 1 + batch_idx / steps, spec.epochs)
        logits = model(x)
        loss = F.cross_entropy(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        sums[0] += loss.detach()
        sums[1] += (logits.detach().argmax(1) == y).sum()
        sums[2] += y.shape[0]
        sums[3] += 1
        if (batch_idx + 1) % spec.trainer.check_finite_every_n_steps == 0 and not torch.isfinite(sums[0]):
            raise RuntimeError("diverged")
    end = time.perf_counter()
    return (end - start) / (steps - WARMUP_STEPS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-m2", type=int, default=300)
    parser.add_argument("--steps-m32", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--width", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import logging
    import warnings

    logging.getLogger("pytorch_lightning").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")

    print(f"ResNet-18 (width {args.width}) + MBN, 32x32 images, {args.threads} thread(s), "
          f"median of {args.repeats} alternating repeats, {WARMUP_STEPS} warm-up steps excluded")
    print(f"{'m':>3} {'steps':>6} {'bare ms/step':>13} {'lightning ms/step':>18} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for batch_size, steps in ((2, args.steps_m2), (32, args.steps_m32)):
            bare, lightning = [], []
            for repeat in range(args.repeats):
                spec = make_spec(batch_size, steps + WARMUP_STEPS, Path(tmp) / f"m{batch_size}-{repeat}", args.width)
                bare.append(bare_seconds_per_step(spec))
                lightning.append(lightning_seconds_per_step(spec))
            ratios = [lt / b for lt, b in zip(lightning, bare)]
            print(f"{batch_size:>3} {steps:>6} {1e3 * statistics.median(bare):>13.2f} "
                  f"{1e3 * statistics.median(lightning):>18.2f} {statistics.median(ratios):>7.3f}", flush=True)


if __name__ == "__main__":
    main()
