"""Generated, learnable image data for tests and smoke runs (no files needed)."""

from __future__ import annotations

import torch

from mbn.data.arrays import ImageArrays


def make_fake_splits(
    num_train: int, num_test: int, num_classes: int, image_size: int, channels: int, seed: int
) -> tuple[ImageArrays, ImageArrays]:
    """Images whose class sets a color and a smooth pattern, plus pixel noise.

    Each class has a random color and a random low-resolution pattern (4x4 per channel, upsampled),
    so a small CNN learns it within an epoch or two (well above chance), while the noise keeps it
    from being trivial. Labels cycle through the classes, so the splits are class-balanced.

    Args:
        num_train: training images.
        num_test: test images.
        num_classes: classes (>= 2).
        image_size: height and width.
        channels: image channels.
        seed: makes the data a deterministic function of all arguments.
    """
    generator = torch.Generator().manual_seed(seed)
    # A class color (easy, survives global pooling) plus a coarse spatial pattern (needs convolutions).
    color = torch.rand(num_classes, channels, 1, 1, generator=generator) * 2 - 1
    coarse = torch.rand(num_classes, channels, 4, 4, generator=generator) * 2 - 1
    pattern = torch.nn.functional.interpolate(coarse, size=(image_size, image_size), mode="bilinear")
    templates = 0.6 * color + 0.4 * pattern
    classes = [f"class_{i}" for i in range(num_classes)]

    def split(n: int) -> ImageArrays:
        labels = torch.arange(n) % num_classes
        labels = labels[torch.randperm(n, generator=generator)]
        images = torch.empty(n, channels, image_size, image_size, dtype=torch.uint8)
        for start in range(0, n, 4096):  # chunked: a float copy of a large fake set would be 4x its size
            part = labels[start : start + 4096]
            noise = torch.randn(len(part), channels, image_size, image_size, generator=generator)
            images[start : start + 4096] = (128 + 80 * templates[part] + 30 * noise).round_().clamp_(0, 255)
        return ImageArrays(images, labels.to(torch.int64), classes)

    return split(num_train), split(num_test)
