"""A stacked model under torch.compile: one graph without breaks, no recompile per lam, eager's numbers.

``aot_eager`` traces forward and backward as inductor does, in seconds. Inductor itself was checked
by hand (too slow for the suite: 73 s of C++ compiling on a 2-core CPU for a K=2 MBN ResNet-18):
gradients and buffers within 2e-14 of eager over 4 steps.

Error model (tests/numerics.py): the traced graph runs eager's float64 operations, possibly
decomposed into other ones (another order), so gradients and buffers agree per tensor, norm-wise,
within ``ONE_PASS_GROWTH * steps * eps(float64)`` (the buffers carry each step into the next).
"""

from __future__ import annotations

import copy

import pytest
import torch

from mbn.models import build_model, member_cross_entropy, stack
from mbn.nn import norm_layer, set_progress
from numerics import ONE_PASS_GROWTH, assert_close_normwise

pytestmark = pytest.mark.numerics


@pytest.mark.torch_compile
def test_compiled_stacked_mbn_model_matches_eager_and_does_not_recompile_per_lam():
    torch._dynamo.reset()  # no compiled code of other tests in, none of this test out
    try:
        train_compiled_and_eager_side_by_side()
    finally:
        torch._dynamo.reset()


def train_compiled_and_eager_side_by_side() -> None:
    members = []
    for seed in range(2):
        torch.manual_seed(seed)
        norm = norm_layer("mbn", ideal_batch_size=32, schedule="iteration")
        members.append(build_model("vgg11", num_classes=5, norm_layer=norm, width=4).double())
    eager = stack(members)
    stacked = copy.deepcopy(eager)
    compiled = torch.compile(stacked, backend="aot_eager", fullgraph=True)
    generator = torch.Generator().manual_seed(0)
    lams = []
    for step in range(5):
        x = torch.randn(4, 6, 8, 8, generator=generator, dtype=torch.float64)
        y = torch.randint(0, 5, (4, 2), generator=generator)
        for model, forward in ((eager, eager), (stacked, compiled)):
            set_progress(model, 1.0 + 0.7 * step, 10)
            model.zero_grad(set_to_none=True)
            # After initialization (lam = 0), the first lam and lam made symbolic: no recompiles.
            with torch._dynamo.config.patch(error_on_recompile=forward is compiled and step >= 3):
                member_cross_entropy(forward(x), y).sum().backward()
        lams.append(stacked.body.features[1].lam)
        close = {"dtype": torch.float64, "steps": step + 1, "growth": ONE_PASS_GROWTH}
        for (name, param), reference in zip(stacked.named_parameters(), eager.parameters()):
            assert_close_normwise(param.grad, reference.grad, **close, what=f"grad of {name}")
        assert_close_normwise(dict(stacked.named_buffers()), dict(eager.named_buffers()), **close, what="buffers")
    assert len(set(lams)) == 5  # lam changed at every step; fullgraph=True: every compile is one graph
