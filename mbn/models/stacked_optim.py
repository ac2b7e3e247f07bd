"""One member's SGD state (momentum buffers) in and out of the optimizer of a stacked model.

An SGD optimizer over a stacked model's parameters holds, per parameter, one momentum buffer of
the stacked shape; member ``k``'s block of it is member ``k``'s buffer. These functions convert
between that and a single run's ``optimizer.state_dict()``, whose parameter indices follow the
member model's parameter order. Build both optimizers the same way (e.g.
``mbn.train.optim.parameter_groups``): the stacked model has the member's parameter order.

Group hyperparameters (lr, momentum, weight decay) are the stacked optimizer's, shared by all
members: members can only train exactly together at the same learning rate.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
from torch import Tensor

from mbn.models.stack import StackedModel, _check_index, stacked_modules
from mbn.models.stacked_layers import member_view

__all__ = ["load_member_optimizer_state_dict", "member_optimizer_state_dict", "member_parameter_shapes"]


def member_parameter_shapes(stacked: StackedModel) -> dict[int, tuple[Tensor, torch.Size]]:
    """``id(parameter) -> (parameter, shape of one member's block)`` for every stacked parameter.

    Args:
        stacked: a model from :func:`~mbn.models.stack`.

    Returns:
        The layout of every parameter, keyed by ``id`` (tensors compare elementwise, not as keys).
    """
    layout = {}
    for _, layer in stacked_modules(stacked):
        shapes = layer.member_shapes()
        for name, param in layer.named_parameters(recurse=False):
            layout[id(param)] = (param, shapes[name])
    return layout


def _optimizer_parameters(optimizer: torch.optim.Optimizer, stacked: StackedModel) -> list[tuple[Tensor, torch.Size, dict]]:
    # (parameter, member shape, its param group) in state_dict index order.
    if not isinstance(optimizer, torch.optim.SGD):
        raise TypeError(f"member optimizer state is implemented for torch.optim.SGD, got {type(optimizer).__name__}")
    layout = member_parameter_shapes(stacked)
    entries = []
    for group in optimizer.param_groups:
        for param in group["params"]:
            if id(param) not in layout:
                raise ValueError(f"the optimizer holds a parameter of shape {tuple(param.shape)} that is not the stacked model's")
            entries.append((param, layout[id(param)][1], group))
    return entries


def member_optimizer_state_dict(optimizer: torch.optim.SGD, stacked: StackedModel, k: int) -> dict[str, Any]:
    """Member ``k``'s part of ``optimizer.state_dict()``: what its single run's optimizer would save.

    Args:
        optimizer: SGD over the stacked model's parameters.
        stacked: the stacked model.
        k: member index.

    Returns:
        ``{"state": {index: {"momentum_buffer": member block}}, "param_groups": [...]}`` (copies).
    """
    _check_index(stacked, k)
    entries = _optimizer_parameters(optimizer, stacked)
    full = optimizer.state_dict()
    state = {}
    for index, saved in full["state"].items():
        _, shape, _ = entries[index]
        state[index] = {
            key: member_view(value, k, stacked.num_members, shape).clone() if isinstance(value, Tensor) else copy.deepcopy(value)
            for key, value in saved.items()
        }
    return {"state": state, "param_groups": copy.deepcopy(full["param_groups"])}


def load_member_optimizer_state_dict(
    optimizer: torch.optim.SGD, stacked: StackedModel, k: int, state_dict: Mapping[str, Any]
) -> None:
    """Load a single run's SGD ``state_dict`` (its momentum buffers) into member ``k``'s blocks.

    A member without a momentum buffer (no step taken yet) gets zeros, which SGD without
    dampening treats exactly as a missing buffer (``buf = 0 * momentum + grad``). The param
    groups' hyperparameters are not loaded (see the module docstring).

    Args:
        optimizer: SGD over the stacked model's parameters.
        stacked: the stacked model.
        k: member index.
        state_dict: a single run's ``optimizer.state_dict()``.

    Raises:
        ValueError: param groups of other sizes than the stacked optimizer's, or ``dampening != 0``
            where a missing buffer would have to become zeros.
    """
    _check_index(stacked, k)
    entries = _optimizer_parameters(optimizer, stacked)
    sizes = [len(group["params"]) for group in state_dict["param_groups"]]
    expected = [len(group["params"]) for group in optimizer.param_groups]
    if sizes != expected:
        raise ValueError(f"the state_dict's param groups hold {sizes} parameters, the stacked optimizer's {expected}")
    for index, (param, shape, group) in enumerate(entries):
        saved = state_dict["state"].get(index, {}).get("momentum_buffer")
        current = optimizer.state[param].get("momentum_buffer") if param in optimizer.state else None
        if saved is None and current is None:
            continue
        if group["dampening"] != 0:
            raise ValueError(f"cannot mix members with and without momentum buffers under dampening={group['dampening']}")
        if current is None:
            current = optimizer.state[param]["momentum_buffer"] = torch.zeros_like(param, memory_format=torch.contiguous_format)
        block = member_view(current, k, stacked.num_members, shape)
        if saved is None:
            block.zero_()
        else:
            block.copy_(saved)
