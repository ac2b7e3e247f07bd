"""Layers that hold K runs ("members") of one layer side by side along the channel dimension.

Layout, for tensors and activations alike: a member tensor of shape ``(n, *rest)`` is block
``[k * n, (k + 1) * n)`` of the stacked tensor of shape ``(K * n, *rest)``; a 0-dim member tensor
(``num_batches_tracked``, ``momentum_initialized``) is element ``k`` of a ``(K,)`` tensor. Run k's
activations are channels ``[k * C, (k + 1) * C)``. Every stacked layer maps such an input to such
an output and no operation combines channels of two members:

* :class:`StackedConv2d`: one convolution with ``K * groups`` groups (the member weights
  concatenated along the output channels).
* :class:`StackedLinear`: one batched matrix product, ``(m, K * in) -> (m, K * out)``.
* :class:`StackedBatchNorm2d`, :class:`StackedMomentumBatchNorm2d`, :class:`StackedBatchRenorm2d`,
  :class:`StackedMovingAverageBatchNorm2d`, :class:`StackedCrossIterationBatchNorm2d`: the layer
  over ``K * C`` channels. Their statistics are per channel, hence per member.
* :class:`StackedGroupNorm`: ``K * G`` groups of consecutive channels, none straddling two members.
* :class:`StackedEvoNormB0`, :class:`StackedFilterResponseNorm`: the layer over ``K * C`` channels
  (per-channel statistics and parameters); :class:`StackedEvoNormS0`: ``K * G`` groups, as GN.

Each stacked layer keeps one *shell* per member: a copy of the member layer whose tensors live on
the meta device (no memory). A shell carries its member's class and hyperparameters, so
:meth:`StackedLayer.member` gives back a layer of the original class, and (MBN) the member's
schedule state. The Python state a forward reads is kept per member too (MBN's ``lam`` and
first-batch flag, Batch Renorm's step), so members at different epochs or steps behave as K
separate layers; while they agree, a stacked forward is one call of the single-layer code.
"""

from __future__ import annotations

import copy
import itertools
from typing import Any, Callable, Sequence, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mbn.nn import (
    BatchRenorm2d,
    CenteredConv2d,
    CrossIterationBatchNorm2d,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GroupNorm,
    MomentumBatchNorm2d,
    MovingAverageBatchNorm2d,
)
from mbn.nn.centered_conv import centered_weight
from mbn.nn.momentum_batchnorm import _TRAINING_STEPS
from mbn.utils.library_internals import own_buffers

__all__ = [
    "CONV_PATHS",
    "STACKED_LAYERS",
    "StackedBatchNorm2d",
    "StackedBatchRenorm2d",
    "StackedCenteredConv2d",
    "StackedConv2d",
    "StackedEvoNormB0",
    "StackedEvoNormS0",
    "StackedFilterResponseNorm",
    "StackedCrossIterationBatchNorm2d",
    "StackedGroupNorm",
    "StackedLayer",
    "StackedLinear",
    "StackedMomentumBatchNorm2d",
    "StackedMovingAverageBatchNorm2d",
    "member_view",
    "stack_member_tensors",
]

StackedSelf = TypeVar("StackedSelf", bound="StackedLayer")


def stack_member_tensors(tensors: Sequence[Tensor]) -> Tensor:
    """The stacked tensor of K member tensors of one shape (see the module docstring).

    Args:
        tensors: member 0's tensor first.

    Returns:
        ``(K * n, *rest)`` for members of shape ``(n, *rest)``, ``(K,)`` for 0-dim members.
    """
    detached = [tensor.detach() for tensor in tensors]
    return torch.stack(detached) if detached[0].dim() == 0 else torch.cat(detached)


def member_view(stacked: Tensor, k: int, num_members: int, member_shape: torch.Size) -> Tensor:
    """Member ``k``'s block of ``stacked``, as a view: writes to it change ``stacked``.

    Args:
        stacked: a stacked tensor (or a tensor of its shape, such as its gradient), contiguous.
        k: member index.
        num_members: K.
        member_shape: shape of one member's tensor.

    Returns:
        A detached view of shape ``member_shape``.
    """
    return stacked.detach().view(num_members, *member_shape)[k]


def _copy_with_tensors(layer: nn.Module, make: Callable[[str, Tensor], Tensor]) -> nn.Module:
    # A deep copy of ``layer`` whose own parameters and buffers are ``make(name, tensor)``: the
    # deepcopy memo hands out the replacements, so the old tensors are never copied.
    memo: dict[int, Any] = {}
    for name, param in layer.named_parameters(recurse=False):
        memo[id(param)] = nn.Parameter(make(name, param), requires_grad=param.requires_grad)
    for name, buffer in layer.named_buffers(recurse=False):
        memo[id(buffer)] = make(name, buffer)
    return copy.deepcopy(layer, memo)


def _meta_shell(layer: nn.Module) -> nn.Module:
    return _copy_with_tensors(layer, lambda name, tensor: torch.empty_like(tensor.detach(), device="meta"))


def _tensor_layout(layer: nn.Module, with_storage: bool) -> dict[str, Any]:
    # Names, shapes and, with_storage, dtype/device/requires_grad of the own tensors. (A None entry,
    # such as bias=None, is not listed: the extra_repr compared before names it, bias=False.)
    layout: dict[str, Any] = {}
    for name, tensor in _named_own_tensors(layer):
        storage = (tensor.dtype, str(tensor.device), tensor.requires_grad) if with_storage else ()
        layout[name] = (tuple(tensor.shape), *storage)
    return layout


def describe_mismatch(expected: nn.Module, actual: nn.Module, with_storage: bool = True) -> str | None:
    """Why ``actual`` cannot be a member next to ``expected`` (None if it can).

    Args:
        expected: the reference member (member 0, or a shell).
        actual: the candidate.
        with_storage: also compare dtypes, devices and ``requires_grad`` (not against meta shells).

    Returns:
        A one-line reason, or None.
    """
    if type(actual) is not type(expected):
        return f"{type(actual).__name__} instead of {type(expected).__name__}"
    if actual.extra_repr() != expected.extra_repr():
        name = type(actual).__name__
        return f"{name}({actual.extra_repr()}) instead of {name}({expected.extra_repr()})"
    actual_layout, expected_layout = _tensor_layout(actual, with_storage), _tensor_layout(expected, with_storage)
    if actual_layout != expected_layout:
        return f"tensors {actual_layout} instead of {expected_layout}"
    if with_storage and actual.training != expected.training:
        return f"training={actual.training} instead of {expected.training}"
    return None


class StackedLayer(nn.Module):
    """What every stacked layer shares: building from members and taking members in and out.

    Subclasses (``class StackedConv2d(StackedLayer, nn.Conv2d)``) keep the forward of the layer
    they stack where it already keeps members apart, and say how to build the empty ``K``-member
    layer (:meth:`_empty`) and how their per-member Python state moves.
    """

    num_members: int
    _member_shells: tuple[nn.Module, ...]

    # -- building -----------------------------------------------------------------------------
    @classmethod
    def from_members(cls: type[StackedSelf], members: Sequence[nn.Module]) -> StackedSelf:
        """Stack layers of one class and configuration; member ``k``'s state becomes block ``k``.

        Args:
            members: the layers, all of the same class, hyperparameters, shapes, dtype, device
                and mode (their Python state, e.g. MBN's schedule progress, may differ).

        Returns:
            The stacked layer, on the members' device.

        Raises:
            ValueError: no members, a member that differs from member 0, or a configuration the
                layer cannot stack (the message says which).
        """
        if not members:
            raise ValueError(f"{cls.__name__}: needs at least one member")
        prototype = members[0]
        for index, member in enumerate(members[1:], 1):
            mismatch = describe_mismatch(prototype, member)
            if mismatch is not None:
                raise ValueError(f"member {index} differs from member 0: {mismatch}")
        cls._check_stackable(prototype)
        layer = cls._empty(prototype, len(members))
        expected_shapes = {name: tensor.shape for name, tensor in _named_own_tensors(layer)}
        layer.num_members = len(members)
        for name, param in prototype.named_parameters(recurse=False):
            tensor = stack_member_tensors([member.get_parameter(name) for member in members])
            setattr(layer, name, nn.Parameter(tensor, requires_grad=param.requires_grad))
        for name, buffer in prototype.named_buffers(recurse=False):
            layer.get_buffer(name)  # the empty layer has this buffer (else setattr would not make one)
            setattr(layer, name, stack_member_tensors([member.get_buffer(name) for member in members]))
        for name, tensor in _named_own_tensors(layer):
            # 0-dim member tensors stack to (K,) where the empty layer has a 0-dim placeholder.
            if getattr(prototype, name).dim() and tensor.shape != expected_shapes[name]:  # a bug in _empty
                raise RuntimeError(f"{cls.__name__}: {name} stacks to {tuple(tensor.shape)}, the layer expects {tuple(expected_shapes[name])}")
        layer._member_shells = tuple(_meta_shell(member) for member in members)
        layer.train(prototype.training)
        layer._import_python_state(members)
        return layer

    @classmethod
    def _check_stackable(cls, prototype: nn.Module) -> None:
        """Raise ValueError if layers configured as ``prototype`` cannot be stacked (all can here)."""

    @classmethod
    def _empty(cls: type[StackedSelf], prototype: nn.Module, num_members: int) -> StackedSelf:
        """The stacked layer for ``num_members`` copies of ``prototype``, with tensors on the meta device."""
        raise NotImplementedError

    # -- members ------------------------------------------------------------------------------
    def _check_member(self, k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < self.num_members:
            raise ValueError(f"{type(self).__name__}: member index must be an int in [0, {self.num_members}), got {k!r}")

    def member_shapes(self) -> dict[str, torch.Size]:
        """Shape of one member's tensor, by parameter/buffer name."""
        shell = self._member_shells[0]
        return {name: tensor.shape for name, tensor in _named_own_tensors(shell)}

    def member_tensors(self, k: int) -> dict[str, Tensor]:
        """Views of member ``k``'s parameters and buffers, by the member layer's names.

        Args:
            k: member index.

        Returns:
            Detached views into this layer's tensors: writing to them changes member ``k``.
        """
        self._check_member(k)
        shapes = self.member_shapes()
        return {name: member_view(tensor, k, self.num_members, shapes[name]) for name, tensor in _named_own_tensors(self)}

    def member(self, k: int) -> nn.Module:
        """Member ``k`` as a layer of its original class, with copies of its tensors and Python state.

        Args:
            k: member index.

        Returns:
            A new layer, in this layer's train/eval mode.
        """
        tensors = self.member_tensors(k)
        layer = _copy_with_tensors(self._member_shells[k], lambda name, tensor: tensors[name].clone())
        for name, param in layer.named_parameters(recurse=False):
            param.requires_grad_(self.get_parameter(name).requires_grad)
        layer.train(self.training)
        self._export_python_state(k, layer)
        return layer

    def member_mismatch(self, k: int, layer: nn.Module) -> str | None:
        """Why ``layer`` cannot be loaded as member ``k`` (class, configuration, shapes), or None.

        Args:
            k: member index.
            layer: the candidate.
        """
        self._check_member(k)
        return describe_mismatch(self._member_shells[k], layer, with_storage=False)

    def load_member(self, k: int, layer: nn.Module) -> None:
        """Make member ``k`` a copy of ``layer``: its tensors and its Python state.

        Args:
            k: member index.
            layer: a layer of the members' class and configuration (dtype and device may differ).

        Raises:
            ValueError: ``layer`` differs from the members in class, configuration or shapes.
        """
        mismatch = self.member_mismatch(k, layer)
        if mismatch is not None:
            raise ValueError(f"{type(self).__name__}: cannot load member {k}: {mismatch}")
        with torch.no_grad():
            for name, view in self.member_tensors(k).items():
                view.copy_(getattr(layer, name))
        shells = list(self._member_shells)
        shells[k] = _meta_shell(layer)
        self._member_shells = tuple(shells)
        self._import_member_python_state(k, layer)

    # -- per-member Python state (no-ops for layers without any) ------------------------------
    def _import_python_state(self, members: Sequence[nn.Module]) -> None:
        """Take every member's Python state (right after :meth:`from_members`)."""
        for k, member in enumerate(members):
            self._import_member_python_state(k, member)

    def _import_member_python_state(self, k: int, layer: nn.Module) -> None:
        """Take member ``k``'s Python state from ``layer`` (its shell is already ``layer``'s copy)."""

    def _export_python_state(self, k: int, layer: nn.Module) -> None:
        """Write member ``k``'s Python state into ``layer``, a copy of its shell."""

    def member_buffer_mirror(self, k: int) -> Any:
        """Member ``k``'s Python copy of its buffer state (MBN: initialized flag; BRN: step), or None."""
        return None

    def set_member_buffer_mirror(self, k: int, value: Any) -> None:
        """Set what :meth:`member_buffer_mirror` returns, after member ``k``'s buffers were written."""

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, members={self.num_members}"


def _named_own_tensors(layer: nn.Module) -> list[tuple[str, Tensor]]:
    # Parameters, then buffers, of the layer itself (None entries skipped), in registration order.
    return [*layer.named_parameters(recurse=False, remove_duplicate=False),
            *layer.named_buffers(recurse=False, remove_duplicate=False)]


CONV_PATHS = ("grouped", "dense")


class StackedConv2d(StackedLayer, nn.Conv2d):
    """K ``nn.Conv2d`` members as one convolution with ``K * groups`` groups, or K convolutions.

    Group ``k * groups + g`` reads member k's input group g and writes its output group g, with
    member k's weights: exactly member k's convolution. ``path`` says how the forward computes it
    (the same parameters and numbers either way; which is faster depends on the machine, the
    channels, the map size and the batch, :mod:`mbn.models.stack_probe`):

    * ``"grouped"`` (default): ``nn.Conv2d``'s forward, one convolution with ``K * groups`` groups;
    * ``"dense"``: one ``F.conv2d`` per member on its channel slice with its weight block, the
      outputs concatenated (a grouped convolution's kernels are often slower than K dense ones
      at many channels per group).
    """

    path: str = "grouped"
    # Both paths compute nn.Conv2d's convolution with ``weight`` (CBN's fast derivatives rely on it).
    convolves_its_weight: bool = True

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "path" and value not in CONV_PATHS:
            raise ValueError(f"{type(self).__name__}.path must be one of {', '.join(CONV_PATHS)}, got {value!r}")
        super().__setattr__(name, value)

    def forward(self, input: Tensor) -> Tensor:
        """Member k's convolution of channels ``[k * in, (k + 1) * in)`` of ``input``, as ``path`` says."""
        if self.path == "grouped":
            return super().forward(input)
        members = self.num_members
        padding: Any = self.padding
        if self.padding_mode != "zeros":  # as nn.Conv2d: pad first, then convolve without padding
            input, padding = F.pad(input, self._explicit_padding(), mode=self.padding_mode), 0
        inputs = input.chunk(members, 1)
        weights = self._member_weights().chunk(members, 0)
        biases = self.bias.chunk(members, 0) if self.bias is not None else [None] * members
        outputs = [F.conv2d(x, w, b, self.stride, padding, self.dilation, self.groups // members)
                   for x, w, b in zip(inputs, weights, biases)]
        return torch.cat(outputs, 1)

    def _member_weights(self) -> Tensor:
        # The weight the grouped path convolves with (a centered convolution's is centered).
        return self.weight

    def _explicit_padding(self) -> list[int]:
        # F.pad's (left, right, top, bottom) of this layer's padding ("same": the extra one right and bottom, as torch).
        pads = []
        for dim in (1, 0):
            if self.padding == "same":
                total = self.dilation[dim] * (self.kernel_size[dim] - 1)
                pads += [total // 2, total - total // 2]
            else:
                pads += [0, 0] if self.padding == "valid" else [self.padding[dim]] * 2
        return pads

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, path={self.path}"

    @classmethod
    def _empty(cls, prototype: nn.Conv2d, num_members: int) -> "StackedConv2d":
        return cls(
            prototype.in_channels * num_members, prototype.out_channels * num_members, prototype.kernel_size,
            stride=prototype.stride, padding=prototype.padding, dilation=prototype.dilation,
            groups=prototype.groups * num_members, bias=prototype.bias is not None,
            padding_mode=prototype.padding_mode, device="meta",
        )  # fmt: skip


class StackedLinear(StackedLayer, nn.Linear):
    """K ``nn.Linear`` members as one batched matrix product: ``(m, K * in) -> (m, K * out)``.

    ``weight`` is ``(K * out, in)`` (member weights concatenated), ``bias`` ``(K * out,)``.
    """

    @classmethod
    def _empty(cls, prototype: nn.Linear, num_members: int) -> "StackedLinear":
        return cls(prototype.in_features, prototype.out_features * num_members, bias=prototype.bias is not None, device="meta")

    def forward(self, input: Tensor) -> Tensor:
        """Apply member k's layer to features ``[k * in, (k + 1) * in)`` of ``input`` ``(m, K * in)``."""
        members, features = self.num_members, self.in_features
        if input.dim() != 2 or input.shape[1] != members * features:
            raise ValueError(f"{type(self).__name__}: expected input of shape (m, {members * features}), got {tuple(input.shape)}")
        per_member = input.unflatten(1, (members, features)).transpose(0, 1)  # (K, m, in)
        weight = self.weight.view(members, -1, features).transpose(1, 2)  # (K, in, out)
        if self.bias is None:
            output = torch.bmm(per_member, weight)
        else:
            output = torch.baddbmm(self.bias.view(members, 1, -1), per_member, weight)
        return output.transpose(0, 1).flatten(1)


class StackedBatchNorm2d(StackedLayer, nn.BatchNorm2d):
    """K ``nn.BatchNorm2d`` members as one over ``K * C`` channels; ``num_batches_tracked`` is ``(K,)``.

    The forward is ``nn.BatchNorm2d``'s (the native kernel): it adds 1 to every member's count.
    """

    @classmethod
    def _check_stackable(cls, prototype: nn.BatchNorm2d) -> None:
        if prototype.momentum is None:
            # The cumulative average divides by num_batches_tracked as one number; members' counts may differ.
            raise ValueError("BatchNorm2d with momentum=None (cumulative average) cannot be stacked; give it a momentum")

    @classmethod
    def _empty(cls, prototype: nn.BatchNorm2d, num_members: int) -> "StackedBatchNorm2d":
        return cls(
            prototype.num_features * num_members, eps=prototype.eps, momentum=prototype.momentum,
            affine=prototype.affine, track_running_stats=prototype.track_running_stats, device="meta",
        )  # fmt: skip


class StackedGroupNorm(StackedLayer, nn.GroupNorm):
    """K GroupNorm members (``nn.GroupNorm`` or :class:`mbn.nn.GroupNorm`) as one with ``K * G`` groups."""

    @classmethod
    def _empty(cls, prototype: nn.GroupNorm, num_members: int) -> "StackedGroupNorm":
        return cls(
            prototype.num_groups * num_members, prototype.num_channels * num_members,
            eps=prototype.eps, affine=prototype.affine, device="meta",
        )  # fmt: skip


class StackedMomentumBatchNorm2d(StackedLayer, MomentumBatchNorm2d):
    """K :class:`~mbn.nn.MomentumBatchNorm2d` members as one over ``K * C`` channels.

    Each member's schedule state lives in its shell: :func:`mbn.nn.set_progress` sets every
    member's progress, :meth:`set_member_progress` one member's. The first-batch flag is per
    member (``momentum_initialized`` is ``(K,)``). While all members use the same ``lam`` this
    step, the forward is one call of MBN's training step over all channels; otherwise it is one
    call per run of consecutive members with equal ``lam`` (the same numbers, slower).
    """

    @classmethod
    def _empty(cls, prototype: MomentumBatchNorm2d, num_members: int) -> "StackedMomentumBatchNorm2d":
        layer = cls(
            prototype.num_features * num_members, eps=prototype.eps, ideal_batch_size=prototype.ideal_batch_size,
            tau0=prototype.tau0, affine=prototype.affine, schedule=prototype.schedule, fixed_lam=prototype.fixed_lam,
            batch_size=prototype.batch_size, device="meta",
        )  # fmt: skip
        layer.impl = prototype.impl
        return layer

    # -- schedule -----------------------------------------------------------------------------
    def _set_progress_unchecked(self, epoch: float, total_epochs: float) -> None:
        # mbn.nn.set_progress and MomentumBatchNorm.set_progress land here: every member moves.
        for shell in self._member_shells:
            shell._set_progress_unchecked(epoch, total_epochs)
        self._derive_forward_state()

    def set_member_progress(self, k: int, epoch: float, total_epochs: float) -> None:
        """Set member ``k``'s schedule position (as :meth:`~mbn.nn.MomentumBatchNorm.set_progress`).

        Args:
            k: member index.
            epoch: current epoch of that member, 1-based (may be fractional).
            total_epochs: number of epochs of its run.
        """
        self._check_member(k)
        self._member_shells[k].set_progress(epoch, total_epochs)
        self._derive_forward_state()

    @property
    def member_lams(self) -> tuple[float, ...]:
        """Each member's :attr:`~mbn.nn.MomentumBatchNorm.lam`."""
        return tuple(shell.lam for shell in self._member_shells)

    @property
    def lam(self) -> float:
        """The members' common ``lam``; ValueError if they differ (then read :attr:`member_lams`)."""
        lams = set(self.member_lams)
        if len(lams) > 1:
            raise ValueError(f"{type(self).__name__}: members have different lam {self.member_lams}; read member_lams")
        return lams.pop()

    def _derive_forward_state(self) -> None:
        # The attributes the forward reads, derived from the shells whenever one of them changes
        # (never per step): the base class's _cached_lam/_cached_tau/_last_m/_initialized, valid
        # while the members agree (_uniform), and each member's lam for this step otherwise.
        shells = self._member_shells
        initialized = [shell._initialized for shell in shells]
        lams = [shell._cached_lam for shell in shells]
        self._member_step_lams = tuple(lam if init else 0.0 for lam, init in zip(lams, initialized))
        self._uniform = len(set(initialized)) == 1 and (not initialized[0] or len(set(lams)) == 1)
        self._initialized = all(initialized)
        self._cached_lam = lams[0]
        self._cached_tau = shells[0]._cached_tau
        batch_sizes = {shell._last_m for shell in shells}
        # Members that disagree on m (None: unknown) all re-derive lam/tau at the next forward.
        self._last_m = batch_sizes.pop() if len(batch_sizes) == 1 else None

    # -- forward ------------------------------------------------------------------------------
    def _normalize_training_batch(self, input: Tensor) -> Tensor:
        m = input.shape[0] if self.batch_size is None else self.batch_size
        if m != self._last_m:
            for shell in self._member_shells:
                shell._update_lam_tau(m)
            self._derive_forward_state()
        if not self._uniform:
            return self._normalize_members_apart(input)
        was_initialized = self._initialized
        output = super()._normalize_training_batch(input)  # _last_m == m: reads the members' lam/tau
        if not was_initialized:
            self._mark_members_initialized()
        return output

    def _normalize_members_apart(self, input: Tensor) -> Tensor:
        # One training step per run of consecutive members with the same lam, on their channels.
        channels = self.num_features // self.num_members
        buffers = own_buffers(self)
        names = ("momentum_mean", "momentum_var", "running_mean", "running_var")
        outputs, start = [], 0
        for lam, run in itertools.groupby(self._member_step_lams):
            stop = start + len(list(run))
            block = slice(start * channels, stop * channels)
            weight = None if self.weight is None else self.weight[block]
            bias = None if self.bias is None else self.bias[block]
            stats = [buffers[name][block] for name in names]  # views: the step updates them in place
            outputs.append(_TRAINING_STEPS[self._impl](input[:, block], weight, bias, *stats, lam, self._cached_tau, self.eps))
            start = stop
        buffers["momentum_initialized"].fill_(True)
        self._mark_members_initialized()
        return torch.cat(outputs, 1)

    def _mark_members_initialized(self) -> None:
        for shell in self._member_shells:
            shell._initialized = True
        self._derive_forward_state()

    # -- state --------------------------------------------------------------------------------
    def _sync_with_buffers(self) -> None:
        for shell, flag in zip(self._member_shells, self.momentum_initialized.tolist()):
            shell._initialized = bool(flag)
        self._derive_forward_state()

    def _import_python_state(self, members: Sequence[nn.Module]) -> None:
        self._derive_forward_state()  # the shells are copies of the members, schedule state included

    def _import_member_python_state(self, k: int, layer: nn.Module) -> None:
        self._derive_forward_state()

    def member_buffer_mirror(self, k: int) -> bool:
        return self._member_shells[k]._initialized

    def set_member_buffer_mirror(self, k: int, value: bool) -> None:
        self._member_shells[k]._initialized = value
        self._derive_forward_state()


class _MemberSteps:
    """Each member's training step count, for stacked layers whose single layer counts steps in
    ``self._step`` (BRN's ramps, MABN's window and warmup, CBN's window and burn-in): the members
    keep their own steps through stacking, checkpoints and loading one member.

    A subclass stores the steps in ``_set_member_steps`` and reads them in ``member_steps``; the
    default keeps a tuple of them.
    """

    @property
    def member_steps(self) -> tuple[int, ...]:
        """Each member's training step count (the Python mirror of ``num_batches_tracked``)."""
        return self._member_steps

    def _set_member_steps(self, steps: Sequence[int]) -> None:
        self._member_steps = tuple(int(step) for step in steps)
        self._step = self._member_steps[0]

    def _member_step_runs(self) -> list[tuple[int, slice]]:
        # (step, channel block) of each run of consecutive members at the same step.
        channels = self.num_features // self.num_members
        runs, start = [], 0
        for step, run in itertools.groupby(self.member_steps):
            stop = start + len(list(run))
            runs.append((step, slice(start * channels, stop * channels)))
            start = stop
        return runs

    def _sync_with_buffers(self) -> None:
        self._set_member_steps(self.num_batches_tracked.tolist())

    def _import_python_state(self, members: Sequence[nn.Module]) -> None:
        self._set_member_steps([member._step for member in members])

    def _import_member_python_state(self, k: int, layer: nn.Module) -> None:
        self.set_member_buffer_mirror(k, layer._step)

    def _export_python_state(self, k: int, layer: nn.Module) -> None:
        layer._step = self.member_steps[k]

    def member_buffer_mirror(self, k: int) -> int:
        return self.member_steps[k]

    def set_member_buffer_mirror(self, k: int, value: int) -> None:
        steps = list(self.member_steps)
        steps[k] = value
        self._set_member_steps(steps)


class StackedBatchRenorm2d(_MemberSteps, StackedLayer, BatchRenorm2d):
    """K :class:`~mbn.nn.BatchRenorm2d` members as one over ``K * C`` channels.

    Each member has its own step (``num_batches_tracked`` is ``(K,)``), which drives its clipping
    ramp. While the members' steps agree the forward is Batch Renorm's; otherwise the limits
    ``r_max``/``d_max`` are per-channel tensors (the same numbers per member).
    """

    @classmethod
    def _empty(cls, prototype: BatchRenorm2d, num_members: int) -> "StackedBatchRenorm2d":
        return cls(
            prototype.num_features * num_members, eps=prototype.eps, momentum=prototype.momentum,
            affine=prototype.affine, r_max=prototype.r_max, d_max=prototype.d_max,
            warmup_steps=prototype.warmup_steps, r_max_ramp_steps=prototype.r_max_ramp_steps,
            d_max_ramp_steps=prototype.d_max_ramp_steps, device="meta",
        )  # fmt: skip

    @property
    def member_steps(self) -> tuple[int, ...]:
        """Each member's training step count (the Python mirror of ``num_batches_tracked``)."""
        return tuple(self._step + offset for offset in self._member_step_offsets)

    def _set_member_steps(self, steps: Sequence[int]) -> None:
        # The base class advances self._step once per forward; members keep fixed offsets to it.
        self._step = steps[0]
        self._member_step_offsets = tuple(step - steps[0] for step in steps)

    def _clip_limits(self) -> tuple[float | Tensor, float | Tensor]:
        if not any(self._member_step_offsets):
            return self.limits(self._step)
        limits = [self.limits(step) for step in self.member_steps]
        return self._per_channel([r for r, _ in limits]), self._per_channel([d for _, d in limits])

    def _per_channel(self, values: list[float]) -> Tensor:
        # float64, so that 1 / r_max is the number a member computes in Python, whatever the input dtype.
        channels = self.num_features // self.num_members
        return torch.tensor(values, dtype=torch.float64, device=self.running_var.device).repeat_interleave(channels)

class StackedEvoNormB0(StackedLayer, EvoNormB0):
    """K :class:`~mbn.nn.EvoNormB0` members as one over ``K * C`` channels.

    Its batch and instance variances and ``running_var`` are per channel, hence per member; the
    forward is EvoNorm-B0's.
    """

    @classmethod
    def _empty(cls, prototype: EvoNormB0, num_members: int) -> "StackedEvoNormB0":
        return cls(prototype.num_features * num_members, eps=prototype.eps, momentum=prototype.momentum, apply_act=prototype.apply_act, device="meta")


class StackedEvoNormS0(StackedLayer, EvoNormS0):
    """K :class:`~mbn.nn.EvoNormS0` members as one with ``K * G`` groups of consecutive channels over
    ``K * C`` channels: member k's groups are groups ``[k * G, (k + 1) * G)``, none straddling two
    members. The forward is EvoNorm-S0's."""

    @classmethod
    def _empty(cls, prototype: EvoNormS0, num_members: int) -> "StackedEvoNormS0":
        return cls(prototype.num_features * num_members, num_groups=prototype.num_groups * num_members, eps=prototype.eps, apply_act=prototype.apply_act, device="meta")


class StackedFilterResponseNorm(StackedLayer, FilterResponseNorm):
    """K :class:`~mbn.nn.FilterResponseNorm` members as one over ``K * C`` channels (its statistic is
    per sample and channel); the forward is FRN + TLU's."""

    @classmethod
    def _empty(cls, prototype: FilterResponseNorm, num_members: int) -> "StackedFilterResponseNorm":
        return cls(prototype.num_features * num_members, eps=prototype.eps, apply_act=prototype.apply_act, device="meta")


class StackedCenteredConv2d(StackedConv2d, CenteredConv2d):
    """K :class:`~mbn.nn.CenteredConv2d` members as one centered convolution with ``K * groups`` groups.

    The weight is centered per output channel, so each member's weight is centered on its own, on
    both paths.
    """

    convolves_its_weight = False  # it convolves with the centered weight

    def _member_weights(self) -> Tensor:
        return centered_weight(self.weight)


class StackedMovingAverageBatchNorm2d(_MemberSteps, StackedLayer, MovingAverageBatchNorm2d):
    """K :class:`~mbn.nn.MovingAverageBatchNorm2d` members as one over ``K * C`` channels.

    Every statistic is per channel, hence per member; each member has its own step
    (``num_batches_tracked`` is ``(K,)``), which picks its window slot, warmup and renormalization
    limit. While the members' steps agree the forward is one call of MABN's training step over all
    channels; otherwise one call per run of consecutive members at the same step.
    """

    @classmethod
    def _empty(cls, prototype: MovingAverageBatchNorm2d, num_members: int) -> "StackedMovingAverageBatchNorm2d":
        return cls(
            prototype.num_features * num_members, window=prototype.window, momentum=prototype.momentum,
            grad_momentum=prototype.grad_momentum, warmup_steps=prototype.warmup_steps, r_max=prototype.r_max,
            renorm_warmup_steps=prototype.renorm_warmup_steps, eps=prototype.eps, affine=prototype.affine, device="meta",
        )  # fmt: skip

    def _normalize_training_batch(self, input: Tensor) -> Tensor:
        steps = self.member_steps
        if len(set(steps)) == 1:
            output = self._training_step(input, self.weight, self.bias, self.window_sq, self.grad_ema, self.running_var, steps[0])
        else:
            outputs = []
            for step, block in self._member_step_runs():
                weight = None if self.weight is None else self.weight[block]
                bias = None if self.bias is None else self.bias[block]
                # Views: the step updates the members' buffers in place.
                outputs.append(self._training_step(input[:, block], weight, bias, self.window_sq[block], self.grad_ema[block],
                                                   self.running_var[block], step))
            output = torch.cat(outputs, 1)
        self._set_member_steps([step + 1 for step in steps])
        return output

    def _sync_with_buffers(self) -> None:
        super()._sync_with_buffers()
        self.running_mean.zero_()


class StackedCrossIterationBatchNorm2d(_MemberSteps, StackedLayer, CrossIterationBatchNorm2d):
    """K :class:`~mbn.nn.CrossIterationBatchNorm2d` members as one over ``K * C`` channels.

    Bound to the stacked convolution in front (:func:`mbn.nn.preceding_layer.relink_preceding_layers`,
    which :func:`~mbn.models.stack` calls): channel ``c`` of the stacked convolution depends only on
    its own weight rows, so CBN's per-channel derivatives and compensation are each member's own.
    Each member has its own step (``num_batches_tracked`` is ``(K,)``), which picks its burn-in and
    window slot: while the members' steps agree the forward is one call of CBN's training step over
    all channels; otherwise one call per run of consecutive members at the same step.
    """

    @classmethod
    def _check_stackable(cls, prototype: CrossIterationBatchNorm2d) -> None:
        if prototype.past_weight is None:
            raise ValueError("CrossIterationBatchNorm2d without its convolution (mbn.nn.bind_norm) cannot be stacked")

    @classmethod
    def _empty(cls, prototype: CrossIterationBatchNorm2d, num_members: int) -> "StackedCrossIterationBatchNorm2d":
        layer = cls(
            prototype.num_features * num_members, window=prototype.window, burnin_steps=prototype.burnin_steps,
            momentum=prototype.momentum, eps=prototype.eps, affine=prototype.affine, device="meta",
        )  # fmt: skip
        shape = (prototype.num_features * num_members, *prototype.past_weight.shape[1:])
        for name in ("past_weight", "past_dmean", "past_dsq"):
            setattr(layer, name, torch.empty(shape, device="meta"))
        return layer

    def _normalize_training_batch(self, input: Tensor) -> Tensor:
        steps = self.member_steps
        if len(set(steps)) == 1:
            output = self._training_step(input, self.weight, self.bias, slice(None), steps[0])
        else:
            outputs = []
            for step, block in self._member_step_runs():
                weight = None if self.weight is None else self.weight[block]
                bias = None if self.bias is None else self.bias[block]
                outputs.append(self._training_step(input[:, block], weight, bias, block, step))
            output = torch.cat(outputs, 1)
        self._set_member_steps([step + 1 for step in steps])
        return output

    def _import_python_state(self, members: Sequence[nn.Module]) -> None:
        for shell in self._member_shells:
            shell._preceding = ()  # the shell's deep copy of the member's convolution: not needed
        super()._import_python_state(members)

    def _import_member_python_state(self, k: int, layer: nn.Module) -> None:
        self._member_shells[k]._preceding = ()
        super()._import_member_python_state(k, layer)


# Member class -> its stacked layer. Exact classes: a subclass may compute something else.
STACKED_LAYERS: dict[type[nn.Module], type[StackedLayer]] = {
    nn.Conv2d: StackedConv2d,
    nn.Linear: StackedLinear,
    nn.BatchNorm2d: StackedBatchNorm2d,
    nn.GroupNorm: StackedGroupNorm,
    GroupNorm: StackedGroupNorm,
    MomentumBatchNorm2d: StackedMomentumBatchNorm2d,
    BatchRenorm2d: StackedBatchRenorm2d,
    EvoNormB0: StackedEvoNormB0,
    EvoNormS0: StackedEvoNormS0,
    FilterResponseNorm: StackedFilterResponseNorm,
    CenteredConv2d: StackedCenteredConv2d,
    MovingAverageBatchNorm2d: StackedMovingAverageBatchNorm2d,
    CrossIterationBatchNorm2d: StackedCrossIterationBatchNorm2d,
}
