"""MomentumBatchNorm under torch.compile: one graph, no recompile per lam, same numbers as eager.

Error model (tests/numerics.py): inductor's generated kernels compute eager's float64 numbers in
another order (fused, vectorized reductions), so outputs, gradients and buffers agree per tensor,
norm-wise, within ``ONE_PASS_GROWTH * steps * eps(float64)`` (M/Phi carry each step into the next).
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from mbn.nn import MomentumBatchNorm2d, set_progress
from numerics import ONE_PASS_GROWTH, assert_close_normwise

pytestmark = pytest.mark.numerics

C = 3


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.torch_compile
def test_compiled_mbn_matches_eager_and_does_not_recompile_per_lam():
    # fullgraph=True: any graph break raises. The per-iteration schedule changes lam every step;
    # after the first steps (initialization with lam = 0, first lam, lam made symbolic) a new lam
    # must not recompile.
    eager = MomentumBatchNorm2d(C, ideal_batch_size=32, schedule="iteration").double()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        eager.weight.copy_(torch.rand(C, generator=gen, dtype=torch.float64) + 0.5)
        eager.bias.copy_(torch.randn(C, generator=gen, dtype=torch.float64))
    layer = copy.deepcopy(eager)
    compiled = torch.compile(layer, backend="inductor", fullgraph=True)
    lams = []
    for step in range(6):
        for module in (eager, layer):
            set_progress(module, 1.0 + 0.7 * step, 10)
        x = torch.randn(4, C, 3, 3, generator=gen, dtype=torch.float64) * 2 + 0.5
        grad = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        x_eager, x_compiled = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_eager = eager(x_eager)
        with torch._dynamo.config.patch(error_on_recompile=step >= 3):
            y_compiled = compiled(x_compiled)
        y_eager.backward(grad)
        y_compiled.backward(grad)
        lams.append(layer.lam)

        close = {"dtype": torch.float64, "steps": step + 1, "growth": ONE_PASS_GROWTH}
        assert_close_normwise(y_compiled, y_eager, **close, what="output")
        assert_close_normwise(x_compiled.grad, x_eager.grad, **close, what="grad of x")
        for name in ("weight", "bias"):
            assert_close_normwise(getattr(layer, name).grad, getattr(eager, name).grad, **close, what=f"grad of {name}")
            getattr(layer, name).grad = getattr(eager, name).grad = None
        for name, buffer in eager.named_buffers():
            if buffer.is_floating_point():
                assert_close_normwise(getattr(layer, name), buffer, **close, what=name)
            else:
                assert torch.equal(getattr(layer, name), buffer), name
    assert len(set(lams)) == 6  # lam really changed at every step
    assert counters["stats"]["unique_graphs"] <= 3
