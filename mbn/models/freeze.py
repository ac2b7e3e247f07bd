"""Freeze one member of a stacked model (e.g. a diverged run) while the others train on."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.utils.hooks import RemovableHandle

from mbn.models.stack import StackedModel, _check_index, stacked_modules
from mbn.models.stacked_layers import member_view
from mbn.models.stacked_optim import member_parameter_shapes

__all__ = ["FrozenMember", "freeze_member"]


class FrozenMember:
    """Keeps member ``k`` of a stacked model exactly as it was when frozen; made by :func:`freeze_member`.

    The frozen member still computes (its channels are part of every operation), so its forward
    updates its statistics and the optimizer step moves its parameters (weight decay and momentum
    do even without a gradient). Rather than keep every one of those from happening, freezing
    copies member ``k``'s state (parameters, buffers, the Python mirrors of its buffers: MBN's
    first-batch flag, Batch Renorm's step; and its SGD momentum buffers) and :meth:`restore`
    copies it back, bit for bit. Given the optimizer, restore runs after every ``optimizer.step()``
    (a step post-hook); without one, call it after each step yourself. Also call it after a
    training-mode forward that no step follows (the statistics changed).

    Member ``k``'s gradient blocks are zeroed as they are accumulated (a post-accumulate-grad
    hook on every parameter), so nan/inf from a diverged member reaches no code that reduces over
    all parameters (gradient-norm clipping, an AMP scaler's inf check). Its loss is still computed;
    leave it out of the summed loss by indexing (see :func:`~mbn.models.member_cross_entropy`).
    MBN schedule progress is not restored: it keeps following ``set_progress``, so the frozen
    member does not split the other members' forward. Freeze after moving the model
    (``.to``, ``.double``): the handle holds views of the tensors it had when frozen.

    Args:
        stacked: a model from :func:`~mbn.models.stack`.
        k: member index.
        optimizer: the SGD optimizer of ``stacked``, to restore member ``k``'s momentum buffers and
            to restore automatically after every step (None: call :meth:`restore` yourself).
    """

    def __init__(self, stacked: StackedModel, k: int, optimizer: torch.optim.Optimizer | None = None) -> None:
        _check_index(stacked, k)
        self.stacked = stacked
        self.member = k
        self.optimizer = optimizer
        self._layers = [layer for _, layer in stacked_modules(stacked)]
        self._tensors = [(view, view.clone()) for layer in self._layers for view in layer.member_tensors(k).values()]
        self._mirrors = [layer.member_buffer_mirror(k) for layer in self._layers]
        self._momentum: list[tuple[Tensor, torch.Size, Tensor | None]] = []
        self._handles: list[RemovableHandle] = []
        layout = member_parameter_shapes(stacked)
        if optimizer is not None:
            for group in optimizer.param_groups:
                for param in group["params"]:
                    buffer = optimizer.state[param].get("momentum_buffer") if param in optimizer.state else None
                    snapshot = None if buffer is None else member_view(buffer, k, stacked.num_members, layout[id(param)][1]).clone()
                    self._momentum.append((param, layout[id(param)][1], snapshot))
            self._handles.append(optimizer.register_step_post_hook(self._after_step))
        for param, shape in layout.values():
            self._handles.append(param.register_post_accumulate_grad_hook(self._zero_grad_hook(shape)))

    def _zero_grad_hook(self, shape: torch.Size):
        def zero_member_grad(param: Tensor) -> None:
            member_view(param.grad, self.member, self.stacked.num_members, shape).zero_()

        return zero_member_grad

    def _after_step(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self.restore()

    @torch.no_grad()
    def restore(self) -> None:
        """Put member ``k``'s parameters, buffers, their mirrors and momentum buffers back as frozen."""
        for view, snapshot in self._tensors:
            view.copy_(snapshot)
        for layer, mirror in zip(self._layers, self._mirrors):
            layer.set_member_buffer_mirror(self.member, mirror)
        for param, shape, snapshot in self._momentum:
            buffer = self.optimizer.state[param].get("momentum_buffer") if param in self.optimizer.state else None
            if buffer is None:
                continue
            block = member_view(buffer, self.member, self.stacked.num_members, shape)
            if snapshot is None:  # no buffer when frozen = zeros: SGD without dampening treats both alike
                block.zero_()
            else:
                block.copy_(snapshot)

    def remove(self) -> None:
        """Unfreeze: remove the hooks; member ``k`` trains on from its current state."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def freeze_member(stacked: StackedModel, k: int, optimizer: torch.optim.Optimizer | None = None) -> FrozenMember:
    """Freeze member ``k`` of ``stacked`` from now on (see :class:`FrozenMember`).

    Args:
        stacked: a model from :func:`~mbn.models.stack`.
        k: member index.
        optimizer: the SGD optimizer of ``stacked`` (restores after every step), or None.

    Returns:
        The handle: :meth:`FrozenMember.restore`, :meth:`FrozenMember.remove`.
    """
    return FrozenMember(stacked, k, optimizer)
