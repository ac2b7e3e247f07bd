"""Datasets decoded once into cached uint8 tensors and a fast in-memory batch loader, or (:mod:`mbn.data.streaming`) class-folder trees read from disk batch by batch (pure PyTorch + torchvision)."""

from mbn.data.arrays import DatasetSplits, ImageArrays, channel_stats, stratified_holdout
from mbn.data.datasets import DATASET_KINDS, dataset_arguments, load_dataset
from mbn.data.loader import TensorBatchLoader
from mbn.data.stacked_loader import StackedBatchLoader

__all__ = [
    "DATASET_KINDS",
    "DatasetSplits",
    "ImageArrays",
    "StackedBatchLoader",
    "TensorBatchLoader",
    "channel_stats",
    "dataset_arguments",
    "load_dataset",
    "stratified_holdout",
]
