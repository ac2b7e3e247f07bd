"""Throughput of the streaming data path (data.in_memory=false) on a generated ImageNet-like tree.

Writes a class-folder tree of JPEGs at ImageNet's typical size (500 x 375, smooth random content,
quality 90) into a temporary dir, then times full epochs of :class:`mbn.data.streaming.StreamingBatchLoader`
at 224 px: training (random-resized crop + flip) and evaluation (resize 256 + center crop), with
0 and ``--workers`` decoding processes. The first epoch of each loader starts its persistent workers
and warms the page cache; the later epochs are timed and their median is printed as images/s.

    python scripts/bench_streaming.py [--images 960] [--workers 2] [--batch-size 32] [--epochs 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from mbn.data.streaming import StreamingBatchLoader, open_image_folder

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def write_tree(root: Path, images: int, classes: int = 8, size: tuple[int, int] = (500, 375)) -> None:
    """``images`` JPEGs in ``train/`` and a quarter as many in ``val/``, over ``classes`` class folders."""
    rng = np.random.default_rng(0)
    for split, count in (("train", images), ("val", images // 4)):
        for i in range(count):
            folder = root / split / f"n{i % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            coarse = rng.integers(0, 256, (size[1] // 25, size[0] // 25, 3), dtype=np.uint8)
            image = Image.fromarray(coarse).resize(size, Image.BICUBIC)
            noisy = np.asarray(image, dtype=np.int16) + rng.integers(-12, 13, (size[1], size[0], 3))
            Image.fromarray(noisy.clip(0, 255).astype(np.uint8)).save(folder / f"{i:06d}.JPEG", quality=90)


def images_per_second(loader: StreamingBatchLoader, epochs: int) -> float:
    """Median images/s over epochs 1..epochs-1 (epoch 0 starts the workers)."""
    rates = []
    for epoch in range(epochs):
        loader.set_epoch(epoch)
        start, count = time.perf_counter(), 0
        for x, _ in loader:
            count += x.shape[0]
        if epoch:
            rates.append(count / (time.perf_counter() - start))
    loader.close()
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=960, help="training images (default 960)")
    parser.add_argument("--workers", type=int, default=2, help="decoding processes (default 2)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--epochs", type=int, default=3, help="epochs per loader, the first untimed (default 3)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_tree(root, args.images)
        print(f"tree: {args.images} train + {args.images // 4} val JPEGs at 500x375 ({time.perf_counter() - start:.0f} s to write)")
        files = open_image_folder(root, 224, mean=IMAGENET_MEAN, std=IMAGENET_STD)
        print(f"cores: {os.cpu_count()}, batch size {args.batch_size}, 224 px, torch threads in this process: 1")
        for workers in (0, args.workers):
            for name, split, options in (("train (random-resized crop + flip)", files.train, dict(augment=True, shuffle=True, drop_last=True)),
                                         ("eval  (resize 256 + center crop)  ", files.test, dict(augment=False, evaluation=True, shuffle=False, drop_last=False))):
                loader = StreamingBatchLoader(split, args.batch_size, image_size=224, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                                              num_workers=workers, **options)
                print(f"{name} workers={workers}: {images_per_second(loader, args.epochs):7.1f} images/s")


if __name__ == "__main__":
    main()
