"""Classification backbones that take a ``norm_layer`` factory (pure PyTorch)."""

from mbn.models.factory import MODEL_NAMES, build_model
from mbn.models.resnet import BasicBlock, Bottleneck, ResNet
from mbn.models.vgg import VGG

__all__ = ["MODEL_NAMES", "build_model", "ResNet", "BasicBlock", "Bottleneck", "VGG"]
