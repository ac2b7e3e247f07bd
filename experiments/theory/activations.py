"""Real activations for Theorem 1: the inputs of one BN layer of a CIFAR-10 ResNet-18, over a dataset.

A narrow ResNet-18 (``width=16``, ``BatchNorm2d``) is optionally trained for a few SGD steps,
then run in eval mode over the training images; a forward pre-hook on the chosen BN layer records, per
image and channel, the value at the centre pixel and the spatial mean and mean square of its input. That
is all Theorem 1 needs (see :func:`experiments.theory.theorem1.run_real`) and stays small for 50k images.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from experiments.theory.common import positive_int
from mbn.data import load_dataset
from mbn.models import build_model

DEFAULT_LAYER = "layer3.0.norm1"


class _StopForward(Exception):
    """Raised by the recording hook: nothing after the recorded layer needs computing."""


def add_real_args(parser: argparse.ArgumentParser) -> None:
    """Add the real-activation options (``--real-archive`` etc.) to ``parser``."""
    group = parser.add_argument_group("real activations (Theorem 1)")
    group.add_argument("--real-archive", type=Path, default=None,
                       help="CIFAR-10 JPEG archive, e.g. /work/shared/data/cifar10-jpeg.tar.gz (omit: synthetic only)")
    group.add_argument("--real-fake", action="store_true",
                       help="use the generated 'fake' dataset instead of the archive (tests, machines without data)")
    group.add_argument("--real-layer", default=DEFAULT_LAYER, help="name of the BN module whose input is recorded")
    group.add_argument("--real-images", type=positive_int, default=None,
                       help="record this many training images (stratified subset; default: all)")
    group.add_argument("--train-steps", type=int, default=30,
                       help="SGD steps (batch 64) before recording; 0: random init. A step count, not a time "
                            "budget, keeps the run reproducible (30 steps ~ 1 min on 2 cores)")
    group.add_argument("--cache-dir", type=Path, default=None, help="decoded-dataset cache (default: mbn's)")


def normalize(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """uint8 N x C x H x W -> float32 standardized with the dataset's per-channel mean/std ([0, 1] units)."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.float().div_(255.0) - mean_t) / std_t


def train_briefly(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, mean: tuple[float, ...],
                  std: tuple[float, ...], steps: int, batch_size: int = 64, lr: float = 0.05,
                  seed: int = 0) -> dict[str, Any]:
    """A few SGD steps (momentum 0.9, weight decay 5e-4, random horizontal flips) on random batches.

    Args:
        model: the classifier, trained in place and left in eval mode.
        images: uint8 training images.
        labels: their labels.
        mean: dataset per-channel mean.
        std: dataset per-channel std.
        steps: SGD steps; 0 skips training (random init).
        batch_size: training batch size.
        lr: learning rate.
        seed: data order and flips.

    Returns:
        ``steps``, ``seconds`` and the mean training loss/accuracy of the first and last 10 steps
        (first and last quarter when shorter).
    """
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    losses, hits = [], []
    started = time.perf_counter()
    for _ in tqdm(range(steps), desc="train resnet18", unit="step"):
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=generator)
        x = normalize(images[idx], mean, std)
        flip = torch.rand(batch_size, generator=generator) < 0.5
        x[flip] = x[flip].flip(-1)
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        hits.append((logits.argmax(1) == labels[idx]).float().mean().item())
    model.eval()
    window = min(10, max(steps // 4, 1))
    return {
        "steps": steps,
        "seconds": time.perf_counter() - started,
        "batch_size": batch_size,
        "first_loss": float(np.mean(losses[:window])) if losses else None,
        "last_loss": float(np.mean(losses[-window:])) if losses else None,
        "last_train_acc": float(np.mean(hits[-window:])) if hits else None,
    }


@torch.no_grad()
def record_bn_inputs(model: nn.Module, layer: str, images: torch.Tensor, mean: tuple[float, ...],
                     std: tuple[float, ...], batch_size: int = 500) -> dict[str, Any]:
    """Run ``model`` in eval mode over ``images`` and record the input of the BN module ``layer``.

    Args:
        model: the network (left in eval mode).
        layer: module name as in ``model.named_modules()``, e.g. ``"layer3.0.norm1"``.
        images: uint8 images, N x C x H x W.
        mean: dataset per-channel mean.
        std: dataset per-channel std.
        batch_size: images per forward pass.

    Returns:
        ``center`` (N, K) the input at the centre pixel, ``image_mean``/``image_sqmean`` (N, K) its per-image
        spatial mean and mean square (float64 numpy), ``spatial_size`` H*W and ``feature_shape`` (K, H, W).
    """
    modules = dict(model.named_modules())
    if layer not in modules:
        norms = [n for n, m in modules.items() if "norm" in type(m).__name__.lower() or "norm" in n]
        raise ValueError(f"layer {layer!r} not found in the model; norm layers: {', '.join(norms)}")
    records: dict[str, list[torch.Tensor]] = {"center": [], "image_mean": [], "image_sqmean": []}
    shape: list[tuple[int, ...]] = []

    def hook(_module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        x = inputs[0].detach().to(torch.float64)
        if x.dim() != 4:
            raise ValueError(f"layer {layer!r} input must be N x C x H x W, got shape {tuple(x.shape)}")
        shape.append(tuple(x.shape[1:]))
        records["center"].append(x[:, :, x.shape[2] // 2, x.shape[3] // 2].clone())
        records["image_mean"].append(x.mean(dim=(2, 3)))
        records["image_sqmean"].append(x.square().mean(dim=(2, 3)))
        raise _StopForward

    model.eval()
    handle = modules[layer].register_forward_pre_hook(hook)
    try:
        for start in tqdm(range(0, images.shape[0], batch_size), desc=f"record {layer}", unit="chunk"):
            try:
                model(normalize(images[start:start + batch_size], mean, std))
            except _StopForward:
                pass
    finally:
        handle.remove()
    channels, height, width = shape[0]
    out: dict[str, Any] = {k: torch.cat(v).numpy() for k, v in records.items()}
    out.update(spatial_size=height * width, feature_shape=(channels, height, width))
    return out


def record_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Load the data, train briefly, record the BN inputs; what :func:`theorem1.main` runs for ``--real-*``.

    Returns:
        :func:`record_bn_inputs`'s arrays plus ``setup``, a JSON-able description of what was done.
    """
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    if args.real_fake:
        splits = load_dataset("fake", num_train=args.real_images or 512, num_test=64, seed=args.seed)
        source = "fake (generated stand-in)"
    else:
        splits = load_dataset("cifar10_archive", archive=args.real_archive, cache_dir=args.cache_dir)
        source = str(args.real_archive)
    load_seconds = time.perf_counter() - started
    model = build_model("resnet18", num_classes=splits.num_classes, norm_layer=nn.BatchNorm2d, width=16)
    training = train_briefly(model, splits.train.images, splits.train.labels, splits.mean, splits.std,
                             args.train_steps, seed=args.seed)
    train = splits.train
    if args.real_images is not None and args.real_images < len(train):
        train = train.subset(args.real_images, seed=args.seed)
    started = time.perf_counter()
    recorded = record_bn_inputs(model, args.real_layer, train.images, splits.mean, splits.std)
    recorded["setup"] = {
        "dataset": source,
        "model": "resnet18 width=16, BatchNorm2d, eval mode",
        "layer": args.real_layer,
        "feature_shape": list(recorded["feature_shape"]),
        "images_recorded": int(train.images.shape[0]),
        "training": training,
        "load_seconds": load_seconds,
        "record_seconds": time.perf_counter() - started,
        "batches_of_m_images": "drawn uniformly with replacement from the recorded images",
    }
    if not math.isfinite(float(np.abs(recorded["image_sqmean"]).max())):
        raise FloatingPointError(f"non-finite activations recorded at {args.real_layer}")
    return recorded
