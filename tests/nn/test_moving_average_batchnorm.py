"""MovingAverageBatchNorm (MABN, Yan et al., ICLR 2020): the paper's equations, its backward, state, models.

Error model (tests/numerics.py): the layer and the naive float64 reference below compute the same
numbers in other orders, so each tensor agrees norm-wise within ``ONE_PASS_GROWTH * steps * eps(float64)``
after ``steps`` chained steps (the statistics carry each step's rounding into the next). Equality only
where the same kernels run on the same inputs (a reloaded layer, eval through BN's native path).

MABN's backward is by design not the gradient of its forward: after the warmup it uses the moving
average ``psi`` of the backward statistic instead of the batch's, and the forward's window average
``chi`` depends on the current batch only through one of its terms. So the backward is tested against
the formula of the reference's ``BatchNormFunction`` (with the paper's exponential average), and
``gradcheck`` runs only in the warmup, where the backward is the true gradient.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mbn.models import build_model
from mbn.nn import (
    CenteredConv2d,
    MovingAverageBatchNorm1d,
    MovingAverageBatchNorm2d,
    MovingAverageBatchNorm3d,
    bind_norm,
    centered,
    convert_norm,
    norm_layer,
)
from nn_reference import channel_view, reduce_dims
from numerics import ONE_PASS_GROWTH, assert_close_normwise

pytestmark = pytest.mark.numerics

C = 3


def close(actual: torch.Tensor, expected: torch.Tensor, *, steps: int, what: str = "", scale: float = 0.0) -> None:
    """Float64 ``actual`` within ``ONE_PASS_GROWTH * steps * eps`` of ``expected``, norm-wise."""
    assert_close_normwise(actual, expected, dtype=torch.float64, steps=steps, growth=ONE_PASS_GROWTH, what=what, scale=scale)


class MABNReference:
    """MABN written from the paper's Algorithm (SMAS forward, EMAS backward) and the reference's r.

    Step t (0-based): chi_B = mean(x^2); chi = chi_B (t < warmup) or the mean of the last
    ``window`` chi_B; r = clip(sqrt(chi + eps) / sqrt(running_var + eps), 1/r_max, r_max) (1 while
    t < renorm_warmup); y = w * r * x / sqrt(chi + eps) + b; running_var <- (1 - m) running_var + m chi.
    Backward: g = dL/dy * w * r, z = x / sqrt(chi + eps), psi_B = mean(g * z),
    psi_bar <- psi_B (t = 0) or (1 - gm) psi_bar + gm psi_B; psi = psi_B (t < warmup) else psi_bar;
    dL/dx = (g - z psi) / sqrt(chi + eps); dL/dw = sum(dL/dy * r * z); dL/db = sum(dL/dy).
    """

    def __init__(self, window, momentum, grad_momentum, warmup, r_max, renorm_warmup, eps):
        self.window, self.momentum, self.grad_momentum = window, momentum, grad_momentum
        self.warmup, self.r_max, self.renorm_warmup, self.eps = warmup, r_max, renorm_warmup, eps
        self.history: list[torch.Tensor] = []
        self.running_var = torch.ones(C, dtype=torch.float64)
        self.psi_bar = None
        self.step = 0

    def step_forward_backward(self, x, w, b, grad_y):
        t, dims, d = self.step, reduce_dims(x), x.dim()
        chi_b = (x * x).mean(dims)
        self.history.append(chi_b)
        chi = chi_b if t < self.warmup else torch.stack(self.history[-self.window:]).mean(0)
        limit = 1.0 if t < self.renorm_warmup else self.r_max
        r = torch.clamp(torch.sqrt(chi + self.eps) / torch.sqrt(self.running_var + self.eps), 1 / limit, limit)
        self.running_var = (1 - self.momentum) * self.running_var + self.momentum * chi
        z = x / channel_view(torch.sqrt(chi + self.eps), d)
        y = channel_view(w, d) * channel_view(r, d) * z + channel_view(b, d)
        g = grad_y * channel_view(w * r, d)
        psi_b = (g * z).mean(dims)
        self.psi_bar = psi_b if t == 0 else (1 - self.grad_momentum) * self.psi_bar + self.grad_momentum * psi_b
        psi = psi_b if t < self.warmup else self.psi_bar
        dx = (g - z * channel_view(psi, d)) / channel_view(torch.sqrt(chi + self.eps), d)
        dw = (grad_y * channel_view(r, d) * z).sum(dims)
        db = grad_y.sum(dims)
        self.step += 1
        return y, (dx, dw, db)


SETTINGS = dict(window=3, momentum=0.3, grad_momentum=0.4, warmup_steps=2, r_max=1.2, renorm_warmup_steps=4, eps=1e-5)


def make_layer(cls=MovingAverageBatchNorm2d, **kwargs):
    layer = cls(C, **{**SETTINGS, **kwargs}).double()
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(0.5, 1.5, C, dtype=torch.float64))
        layer.bias.copy_(torch.linspace(-1, 1, C, dtype=torch.float64))
    return layer


@pytest.mark.parametrize("cls, shape", [(MovingAverageBatchNorm1d, (C,)), (MovingAverageBatchNorm2d, (C, 3, 3)), (MovingAverageBatchNorm3d, (C, 2, 2, 3))],
                         ids=["1d", "2d", "3d"])
def test_matches_the_paper_over_steps_with_changing_batch_sizes(cls, shape):
    """Forward, backward (the method's), running_var and the backward average against the reference
    over 9 steps: warmup, window filling, renormalization with r clipped on some channels."""
    layer = make_layer(cls)
    ref = MABNReference(SETTINGS["window"], SETTINGS["momentum"], SETTINGS["grad_momentum"], SETTINGS["warmup_steps"],
                        SETTINGS["r_max"], SETTINGS["renorm_warmup_steps"], SETTINGS["eps"])
    gen = torch.Generator().manual_seed(0)
    clipped = False
    for step, batch in enumerate([2, 5, 3, 2, 4, 2, 3, 6, 2], 1):
        scales = torch.tensor([0.3, 1.0, 3.0], dtype=torch.float64) * (1 + 0.5 * step)  # drifting second moments
        x = (torch.randn(batch, *shape, generator=gen, dtype=torch.float64) * channel_view(scales, len(shape) + 1)).requires_grad_()
        grad_y = torch.randn(batch, *shape, generator=gen, dtype=torch.float64)
        w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
        old_running_var = layer.running_var.clone()
        y = layer(x)
        grads = torch.autograd.grad(y, (x, layer.weight, layer.bias), grad_y)
        y_ref, grads_ref = ref.step_forward_backward(x.detach(), w, b, grad_y)
        close(y, y_ref, steps=step, what=f"output at step {step}")
        for name, a, e in zip(("dx", "dweight", "dbias"), grads, grads_ref):
            close(a, e, steps=step, what=f"{name} at step {step}")
        close(layer.running_var, ref.running_var, steps=step, what="running_var")
        close(layer.grad_ema, ref.psi_bar, steps=step, what="grad_ema")
        if step > SETTINGS["renorm_warmup_steps"]:
            chi = torch.stack(ref.history[-SETTINGS["window"]:]).mean(0)
            ratio = torch.sqrt(chi + 1e-5) / torch.sqrt(old_running_var + 1e-5)
            clipped |= bool(((ratio > 1.2) | (ratio < 1 / 1.2)).any())
    assert clipped, "the test must exercise the clipping of r"
    assert int(layer.num_batches_tracked) == 9
    assert torch.equal(layer.running_mean, torch.zeros(C, dtype=torch.float64))


def test_backward_is_the_true_gradient_in_the_warmup():
    """In the warmup (batch statistics, r = 1) MABN is x / sqrt(mean(x^2) + eps): gradcheck holds."""
    layer = make_layer(warmup_steps=10**6, renorm_warmup_steps=10**6)
    x = torch.randn(2, C, 2, 2, dtype=torch.float64, requires_grad=True)
    weight, bias = layer.weight.detach().clone().requires_grad_(), layer.bias.detach().clone().requires_grad_()

    def forward(x, weight, bias):
        return torch.func.functional_call(layer, {"weight": weight, "bias": bias}, (x,))

    assert torch.autograd.gradcheck(forward, (x, weight, bias))


def test_backward_after_the_warmup_is_not_the_gradient_of_the_forward():
    """By design: with the window and the moving average in use, dL/dx differs from autograd of the forward."""
    layer = make_layer(warmup_steps=0, renorm_warmup_steps=10**6, window=4)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        x = torch.randn(2, C, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
        layer(x).sum().backward()
    x = torch.randn(2, C, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    history = layer.window_sq.clone()
    g = torch.randn(2, C, 2, 2, generator=gen, dtype=torch.float64)
    (dx,) = torch.autograd.grad(layer(x), x, g)
    # The same forward as a differentiable function of x (the other window entries constants).
    chi = (history[:, :3].sum(1) + (x * x).mean((0, 2, 3))) / 4  # step 3 writes slot 3 of the 4
    y_true = channel_view(layer.weight.detach(), 4) * x / channel_view(torch.sqrt(chi + 1e-5), 4)
    (dx_true,) = torch.autograd.grad(y_true, x, g)
    assert (dx - dx_true).norm() > 1e-3 * dx_true.norm()


def test_eval_mode_is_batchnorm_with_zero_mean_and_convert_to_bn_is_exact():
    layer = make_layer()
    gen = torch.Generator().manual_seed(4)
    for _ in range(5):
        layer(torch.randn(3, C, 2, 2, generator=gen, dtype=torch.float64) * 2)
    layer.eval()
    x = torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64)
    expected = channel_view(layer.weight, 4) * x / channel_view(torch.sqrt(layer.running_var + layer.eps), 4) + channel_view(layer.bias, 4)
    close(layer(x), expected, steps=1, what="eval output")
    bn = convert_norm(copy.deepcopy(layer), "bn")
    assert isinstance(bn, nn.BatchNorm2d) and not bn.training
    assert torch.equal(bn(x), layer(x))


def test_state_dict_round_trip_continues_the_same_steps():
    """A layer loaded from another's state_dict continues its window, average and step exactly."""
    layer = make_layer()
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        x = torch.randn(2, C, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
        layer(x).square().sum().backward()
    resumed = make_layer()
    resumed.load_state_dict(copy.deepcopy(layer.state_dict()))
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "window_sq", "grad_ema"}
    for _ in range(3):
        x = torch.randn(2, C, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
        y1, y2 = layer(x), resumed(x)
        assert torch.equal(y1, y2)
        assert torch.equal(torch.autograd.grad(y1.square().sum(), x)[0], torch.autograd.grad(y2.square().sum(), x)[0])
    for key, value in layer.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_loading_a_batchnorm_keeps_the_mean_at_zero():
    bn = nn.BatchNorm2d(C)
    bn.running_mean.fill_(3.0)
    layer = MovingAverageBatchNorm2d(C)
    layer.load_state_dict(bn.state_dict(), strict=False)
    assert torch.equal(layer.running_mean, torch.zeros(C))


def test_centered_conv_convolves_with_the_centered_weight_and_shares_parameters():
    """Float64: the centered convolution against F.conv2d with the naively centered weight (one pass)."""
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True).double()
    conv_c = centered(conv)
    assert isinstance(conv_c, CenteredConv2d) and conv_c.weight is conv.weight and conv_c.bias is conv.bias
    assert list(conv_c.state_dict()) == list(conv.state_dict())
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    w = conv.weight.detach()
    w_centered = w - w.mean(dim=(1, 2, 3), keepdim=True)
    close(conv_c(x), F.conv2d(x, w_centered, conv.bias, stride=2, padding=1), steps=1, what="centered conv")
    assert centered(conv_c) is conv_c
    with pytest.raises(ValueError, match="padding_mode"):
        centered(nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))


def test_backbones_and_convert_norm_center_the_convolution_in_front_of_each_layer():
    model = build_model("resnet18", num_classes=3, norm_layer=norm_layer("mabn"), width=4)
    pairs = [(name, module) for name, module in model.named_modules() if isinstance(module, MovingAverageBatchNorm2d)]
    convs = [module for module in model.modules() if isinstance(module, nn.Conv2d)]
    assert len(pairs) == len(convs) == 20 and all(isinstance(conv, CenteredConv2d) for conv in convs)
    vgg = build_model("vgg11", num_classes=3, norm_layer=norm_layer("mabn"), width=4)
    assert all(isinstance(m, CenteredConv2d) for m in vgg.modules() if isinstance(m, nn.Conv2d))
    bn_model = build_model("resnet18", num_classes=3, norm_layer=norm_layer("bn"), width=4)
    assert not any(isinstance(m, CenteredConv2d) for m in bn_model.modules())
    converted = convert_norm(copy.deepcopy(bn_model), "mabn")
    assert all(isinstance(m, CenteredConv2d) for m in converted.modules() if isinstance(m, nn.Conv2d))
    assert list(converted.state_dict()) != [] and set(converted.state_dict()) > set(bn_model.state_dict())
    with pytest.raises(ValueError, match="needs the convolution in front"):
        convert_norm(nn.Sequential(nn.BatchNorm2d(3), nn.ReLU()), "mabn")
    assert bind_norm(nn.Linear(2, 3), MovingAverageBatchNorm1d(3)).__class__ is nn.Linear


@pytest.mark.parametrize("batch_size", [2, 5])
def test_a_tiny_resnet18_trains_with_finite_loss(batch_size):
    torch.manual_seed(0)
    model = build_model("resnet18", num_classes=3, norm_layer=norm_layer("mabn", window=3, warmup_steps=2, renorm_warmup_steps=3), width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(6):
        x, y = torch.randn(batch_size, 3, 8, 8), torch.randint(0, 3, (batch_size,))
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    model.eval()
    assert torch.isfinite(model(torch.randn(2, 3, 8, 8))).all()


def test_validation():
    for kwargs, match in (({"window": 0}, "window"), ({"momentum": 0.0}, "momentum"), ({"grad_momentum": 1.5}, "grad_momentum"),
                          ({"r_max": 0.5}, "r_max"), ({"warmup_steps": -1}, "warmup_steps"), ({"renorm_warmup_steps": 1.5}, "renorm_warmup_steps")):
        with pytest.raises(ValueError, match=match):
            MovingAverageBatchNorm2d(C, **kwargs)
    with pytest.raises(ValueError, match="4D"):
        MovingAverageBatchNorm2d(C)(torch.randn(2, C))
