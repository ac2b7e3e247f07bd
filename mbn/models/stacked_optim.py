"""One member's SGD state (momentum buffers) in and out of the optimizer of a stacked model.

An SGD optimizer over a stacked model's parameters holds, per parameter, one momentum buffer of
the stacked shape; member ``k``'s block of it is member ``k``'s buffer. These functions convert
between that and a single run's ``optimizer.state_dict()``, whose parameter indices follow the
member model's parameter order. Build both optimizers the same way (e.g.
``mbn.train.optim.parameter_groups``): the stacked model has the member's parameter order.

Group hyperparameters (momentum, nesterov) are shared by all members. With ``torch.optim.SGD`` the
lr and weight decay are shared too; :class:`MemberSGD` gives each member its own (an lr grid trained
as one model), and member ``k``'s part of its ``state_dict`` holds member ``k``'s values.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from mbn.models.stack import StackedModel, _check_index, stacked_modules
from mbn.models.stacked_layers import member_view
from mbn.utils.library_internals import foreach_add, foreach_add_, foreach_addcmul, foreach_addcmul_, foreach_mul_

__all__ = ["MemberSGD", "member_lr", "load_member_optimizer_state_dict", "member_optimizer_state_dict", "member_parameter_shapes"]

# MemberSGD's per-member param-group entries (one value per member).
MEMBER_LR_SCALE = "member_lr_scale"
MEMBER_WEIGHT_DECAY = "member_weight_decay"


class MemberSGD(torch.optim.SGD):
    """SGD over a stacked model whose members have their own learning rate and weight decay.

    Member ``k``'s block of every parameter steps as ``torch.optim.SGD`` with
    ``lr = group["lr"] * member_lr_scale[k]`` and ``weight_decay = member_weight_decay[k]`` (per param
    group: give a group that is not decayed zeros), with the same operations in the same order
    (momentum, dampening and nesterov as SGD's). A scheduler that sets ``group["lr"]`` (``LambdaLR``)
    scales every member's lr, as it scales each single run's. Only the members' lr values round
    differently (``lr * scale`` is member 0's lr times a ratio: member 0's is bit for bit its own).

    Args:
        params: param groups (every parameter stacked, its first dimension K members' blocks); each
            group's ``member_lr_scale`` and ``member_weight_decay`` (K values each) default to the
            constructor's.
        num_members: K.
        lr: the lr that ``member_lr_scale`` scales (member 0's, with scale 1.0).
        member_lr_scale: each member's lr / ``lr``.
        member_weight_decay: each member's weight decay.
        momentum, dampening, nesterov: as for ``torch.optim.SGD`` (shared).

    Raises:
        ValueError: per-member values of another length than ``num_members``.
    """

    def __init__(self, params: Any, num_members: int, lr: float, member_lr_scale: Sequence[float],
                 member_weight_decay: Sequence[float], momentum: float = 0.0, dampening: float = 0.0, nesterov: bool = False) -> None:
        self.num_members = num_members
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=0.0, foreach=False)
        for group in self.param_groups:
            group.setdefault(MEMBER_LR_SCALE, [float(v) for v in member_lr_scale])
            group.setdefault(MEMBER_WEIGHT_DECAY, [float(v) for v in member_weight_decay])
            for key in (MEMBER_LR_SCALE, MEMBER_WEIGHT_DECAY):
                if len(group[key]) != num_members:
                    raise ValueError(f"{key} needs one value per member ({num_members}), got {len(group[key])}")
            if group["weight_decay"] != 0:
                raise ValueError("MemberSGD takes weight decay per member (member_weight_decay), not as a group's weight_decay")

    @torch.no_grad()
    def step(self, closure: Any = None) -> Any:
        """One SGD step of every member at its own lr and weight decay (see the class doc).

        Each operation runs over all parameters of a group at once (multi-tensor ops, as
        ``torch.optim.SGD(foreach=True)``): at batch size 2 a Python loop over parameters and members
        was a quarter of a stacked ResNet-18's step. A member's lr and weight decay enter as a column
        of K values broadcast over its block of each parameter.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [param for param in group["params"] if param.grad is not None]
            if not params:
                continue
            momentum, dampening, nesterov = group["momentum"], group["dampening"], group["nesterov"]
            grads = [param.grad for param in params]
            decays = group[MEMBER_WEIGHT_DECAY]
            if len(set(decays)) == 1 and decays[0] != 0:
                grads = foreach_add(grads, params, alpha=decays[0])  # SGD's d_p.add(param, alpha=weight_decay)
            elif any(decays):
                grads = foreach_addcmul(self._member_views(grads), self._member_views(params), self._member_columns(decays, params))
                grads = [grad.view_as(param) for grad, param in zip(grads, params)]
            if momentum != 0:
                states = [self.state[param] for param in params]
                if any("momentum_buffer" not in state for state in states):
                    for state, grad in zip(states, grads):
                        state.setdefault("momentum_buffer", torch.clone(grad).detach())
                else:
                    buffers = [state["momentum_buffer"] for state in states]
                    foreach_mul_(buffers, momentum)
                    foreach_add_(buffers, grads, alpha=1 - dampening)
                buffers = [state["momentum_buffer"] for state in states]
                grads = foreach_add(grads, buffers, alpha=momentum) if nesterov else buffers
            steps = self._member_columns([-(group["lr"] * scale) for scale in group[MEMBER_LR_SCALE]], params)
            foreach_addcmul_(self._member_views(params), self._member_views(grads), steps)
        return loss

    def _member_views(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        # Every stacked tensor as K rows, one member's block each.
        return [tensor.view(self.num_members, -1) for tensor in tensors]

    def _member_columns(self, values: Sequence[float], params: Sequence[Tensor]) -> list[Tensor]:
        # One value per member as a K x 1 column (in the parameters' dtype, as SGD's scalar alpha), per parameter.
        column = torch.tensor(values, dtype=params[0].dtype, device=params[0].device).view(self.num_members, 1)
        return [column] * len(params)


def member_lr(optimizer: torch.optim.Optimizer, k: int | None) -> float:
    """The current lr of member ``k`` (its first param group's), or of the optimizer when ``k`` is None.

    Args:
        optimizer: any optimizer; a :class:`MemberSGD` scales the group's lr by member ``k``'s factor.
        k: member index, or None for a model that is not stacked.
    """
    group = optimizer.param_groups[0]
    if k is None or MEMBER_LR_SCALE not in group:
        return float(group["lr"])
    return float(group["lr"] * group[MEMBER_LR_SCALE][k])


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
    groups = copy.deepcopy(full["param_groups"])
    if isinstance(optimizer, MemberSGD):
        for group in groups:
            # A single run's SGD group: its lr now (and initial_lr, a scheduler's base) and weight decay.
            scale = group.pop(MEMBER_LR_SCALE)[k]
            group["weight_decay"] = group.pop(MEMBER_WEIGHT_DECAY)[k]
            group["lr"] = group["lr"] * scale
            if "initial_lr" in group:
                group["initial_lr"] = group["initial_lr"] * scale
    return {"state": state, "param_groups": groups}


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
