"""The streaming path (data.in_memory=false) on generated class-folder trees: the in-memory path's
samples and order, augmentation seeded by (seed, epoch, index), and the in-memory path's size check."""

from __future__ import annotations

import pytest
import torch
from data_layouts import make_tree, random_images, write_dir

import mbn.data.datasets
import mbn.data.memory
from mbn.data import TensorBatchLoader, load_dataset, stratified_holdout
from mbn.data.memory import DatasetTooLarge
from mbn.data.streaming import StreamingBatchLoader, open_image_folder

CLASSES = ["zebra", "ant", "moth"]
SIZE = 8  # the images are 10x12: both paths resize them


@pytest.fixture
def tree_root(tmp_path, rng):
    """PNG 10x12 images: 6/5/5 per class in train/, 3 per class in val/."""
    splits = {
        "train": {cls: random_images(rng, n, (10, 12)) for cls, n in zip(CLASSES, (6, 5, 5))},
        "val": {cls: random_images(rng, 3, (10, 12)) for cls in CLASSES},
    }
    return write_dir(tmp_path / "tree", make_tree(splits))


def batches(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.set_epoch(epoch)
    return list(loader)


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second)
    for (x1, y1), (x2, y2) in zip(first, second):
        assert torch.equal(y1, y2)
        assert torch.equal(x1, x2)


@pytest.mark.parametrize("world_size, rank", [(1, 0), (2, 1)])
@pytest.mark.parametrize("subset", [None, 9])
def test_without_augmentation_both_paths_give_the_same_batches_in_the_same_order(tree_root, tmp_path, world_size, rank, subset):
    memory = load_dataset("imagefolder", root=str(tree_root), image_size=SIZE, cache_dir=tmp_path / "cache")
    files = open_image_folder(tree_root, SIZE, num_workers=0)
    assert files.train.classes == memory.train.classes == sorted(CLASSES)
    # The statistics' sample is the whole (small) split, computed as the in-memory path computes them.
    assert (files.mean, files.std) == (memory.mean, memory.std)
    train_images, train_files = memory.train, files.train
    if subset is not None:
        train_images, train_files = memory.train.subset(subset, 5), files.train.subset(subset, 5)
    assert torch.equal(train_files.labels, train_images.labels)
    options = dict(mean=memory.mean, std=memory.std, shuffle=True, drop_last=True, augment=False, seed=3,
                   rank=rank, world_size=world_size)
    in_memory = TensorBatchLoader(train_images, 2, **options)
    streamed = StreamingBatchLoader(train_files, 2, image_size=SIZE, num_workers=0, **options)
    assert len(streamed) == len(in_memory)
    for epoch in (0, 1):
        assert_same_batches(batches(streamed, epoch), batches(in_memory, epoch))
    assert not torch.equal(torch.cat([y for _, y in batches(streamed, 0)]), torch.cat([y for _, y in batches(streamed, 1)]))


def test_a_held_out_split_and_its_rest_are_the_same_images_on_both_paths(tree_root, tmp_path):
    memory = load_dataset("imagefolder", root=str(tree_root), image_size=SIZE, cache_dir=tmp_path / "cache")
    files = open_image_folder(tree_root, SIZE, num_workers=0)
    held_out, rest = stratified_holdout(memory.train.labels, len(CLASSES), 4, seed=2)
    options = dict(mean=memory.mean, std=memory.std, shuffle=False, drop_last=False, augment=False, seed=0)
    for indices in (held_out, rest):
        images, listed = memory.train.take(indices), files.train.take(indices)
        assert torch.equal(listed.labels, images.labels)
        streamed = StreamingBatchLoader(listed, 2, image_size=SIZE, num_workers=0, **options)
        assert_same_batches(batches(streamed, 0), batches(TensorBatchLoader(images, 2, **options), 0))


def test_augmentation_is_a_function_of_seed_epoch_and_image_not_of_workers_or_restarts(tree_root):
    files = open_image_folder(tree_root, SIZE, num_workers=0)

    def loader(num_workers: int, seed: int = 0) -> StreamingBatchLoader:
        return StreamingBatchLoader(files.train, 4, image_size=SIZE, mean=files.mean, std=files.std, shuffle=True,
                                    drop_last=True, augment=True, seed=seed, num_workers=num_workers)

    two_workers = loader(2)
    epoch1 = batches(two_workers, 1)
    # A fresh loader (a resumed run) in this process gives epoch 1 exactly, whatever ran before.
    fresh = loader(0)
    batches(fresh, 0)
    assert_same_batches(batches(fresh, 1), epoch1)
    assert_same_batches(batches(two_workers, 1), epoch1)  # persistent workers, epoch replayed
    assert all(x.shape == (4, 3, SIZE, SIZE) and x.dtype == torch.float32 for x, _ in epoch1)
    # The augmentation changes with the epoch and the seed; the order follows the in-memory loader's.
    epoch2 = batches(two_workers, 2)
    assert not torch.equal(torch.cat([x for x, _ in epoch1]), torch.cat([x for x, _ in epoch2]))
    assert not torch.equal(torch.cat([x for x, _ in batches(loader(0, seed=1), 1)]), torch.cat([x for x, _ in epoch1]))
    plain = StreamingBatchLoader(files.train, 4, image_size=SIZE, mean=files.mean, std=files.std, shuffle=True,
                                 drop_last=True, augment=False, num_workers=0)
    assert torch.equal(torch.cat([y for _, y in batches(plain, 1)]), torch.cat([y for _, y in epoch1]))


def test_evaluation_reads_every_image_in_dataset_order_with_resize_and_center_crop(tree_root):
    files = open_image_folder(tree_root, SIZE, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], num_workers=0)
    assert (files.mean, files.std) == ((0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    evaluation = StreamingBatchLoader(files.test, 4, image_size=SIZE, mean=files.mean, std=files.std, shuffle=False,
                                      drop_last=False, augment=False, evaluation=True, num_workers=0)
    labels = torch.cat([y for _, y in evaluation])
    assert labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [tuple(x.shape) for x, _ in evaluation] == [(4, 3, SIZE, SIZE), (4, 3, SIZE, SIZE), (1, 3, SIZE, SIZE)]


def test_a_validation_class_missing_from_training_is_named(tree_root):
    (tree_root / "val" / "yak").mkdir()
    with pytest.raises(ValueError, match=r"val/ in .* has classes missing from train/: \['yak'\]"):
        open_image_folder(tree_root, SIZE, num_workers=0)


def test_the_in_memory_path_stops_before_decoding_what_does_not_fit(tree_root, tmp_path, monkeypatch):
    needed = (16 + 9) * 3 * SIZE * SIZE
    monkeypatch.setattr(mbn.data.memory, "available_memory_bytes", lambda: needed - 1)
    monkeypatch.setattr(mbn.data.datasets, "decode_image_tree", lambda *args: pytest.fail("decoded anyway"))
    with pytest.raises(DatasetTooLarge) as raised:
        load_dataset("imagefolder", root=str(tree_root), image_size=SIZE, cache_dir=tmp_path / "cache")
    message = str(raised.value)
    assert "\n" not in message
    assert f"needs 0.0 GB (25 images at {SIZE}x{SIZE}), 0.0 GB are available" in message
    assert message.endswith("stream the images from disk instead with data.in_memory=false")
    monkeypatch.undo()
    assert len(load_dataset("imagefolder", root=str(tree_root), image_size=SIZE, cache_dir=tmp_path / "cache").train) == 16


def test_the_decoded_size_estimate_counts_images_and_reads_one_header(tree_root):
    assert mbn.data.memory.decoded_bytes(tree_root, ("train", "val"), None) == (25 * 3 * 12 * 10, 25, "12x10")
    assert mbn.data.memory.decoded_bytes(tree_root, ("train", "val"), 224)[0] == 25 * 3 * 224 * 224
