"""Classification backbones that take a ``norm_layer`` factory, and stacked runs of them (pure PyTorch)."""

from mbn.models.factory import MODEL_NAMES, build_model, model_options
from mbn.models.freeze import FrozenMember, freeze_member
from mbn.models.resnet import BasicBlock, Bottleneck, ResNet
from mbn.models.stack import (
    StackedModel,
    load_member_model,
    load_member_state_dict,
    member_model,
    member_state_dict,
    set_conv_paths,
    stack,
    stacked_modules,
    unstack,
)
from mbn.models.stacked_loss import member_cross_entropy
from mbn.models.stacked_optim import MemberSGD, load_member_optimizer_state_dict, member_lr, member_optimizer_state_dict
from mbn.models.vgg import VGG

__all__ = [
    "MODEL_NAMES",
    "build_model",
    "model_options",
    "ResNet",
    "BasicBlock",
    "Bottleneck",
    "VGG",
    "FrozenMember",
    "StackedModel",
    "freeze_member",
    "load_member_model",
    "MemberSGD",
    "load_member_optimizer_state_dict",
    "load_member_state_dict",
    "member_cross_entropy",
    "member_model",
    "member_lr",
    "member_optimizer_state_dict",
    "member_state_dict",
    "set_conv_paths",
    "stack",
    "stacked_modules",
    "unstack",
]
