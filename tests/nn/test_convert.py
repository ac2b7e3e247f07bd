"""convert_norm / convert: swap the norm layers of existing models, keeping what eval depends on."""

import pytest
import torch
import torchvision
from torch import nn

from mbn.nn import (
    BatchRenorm2d,
    EvoNormB0,
    EvoNormS0,
    FilterResponseNorm,
    GroupNorm,
    MomentumBatchNorm1d,
    MomentumBatchNorm2d,
    convert,
    convert_norm,
)


def trained_resnet():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=4)
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(2, 3, 32, 32))
    return model.eval()


def test_torchvision_resnet_to_mbn_and_back():
    model = trained_resnet()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
    bn_count = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    converted = convert_norm(model, "mbn", ideal_batch_size=8)
    layers = [m for m in converted.modules() if isinstance(m, MomentumBatchNorm2d)]
    assert len(layers) == bn_count and not any(isinstance(m, nn.BatchNorm2d) for m in converted.modules())
    assert all(layer.ideal_batch_size == 8 and not layer.training for layer in layers)
    with torch.no_grad():
        torch.testing.assert_close(converted(x), expected, rtol=0, atol=0)  # running stats and affine copied
        converted.train()
        converted(x)  # a training step moves the running statistics
        converted.eval()
        expected_mbn = converted(x)
    assert not torch.equal(expected_mbn, expected)
    back = convert(converted)
    assert sum(type(m) is nn.BatchNorm2d for m in back.modules()) == bn_count
    with torch.no_grad():
        assert torch.equal(back(x), expected_mbn)


def test_convert_to_bn_preserves_eval_outputs_and_eps():
    model = nn.Sequential(nn.Linear(4, 6), MomentumBatchNorm1d(6, eps=1e-3), nn.Conv2d(1, 5, 1), BatchRenorm2d(5, eps=1e-4))
    with torch.no_grad():
        model[1](torch.randn(8, 6) * 3 + 1)
        model[3](torch.randn(4, 5, 2, 2) * 2 - 1)
        model[1].weight.uniform_()
        model[3].bias.uniform_()
    model.eval()
    x1, x3 = torch.randn(3, 6), torch.randn(2, 5, 3, 3)
    expected = model[1](x1), model[3](x3)
    converted = convert(model)
    assert type(converted[1]) is nn.BatchNorm1d and converted[1].eps == 1e-3
    assert type(converted[3]) is nn.BatchNorm2d and converted[3].eps == 1e-4
    assert torch.equal(converted[1](x1), expected[0]) and torch.equal(converted[3](x3), expected[1])


def test_to_groupnorm_copies_affine_and_keeps_dtype_mode_grad_flags():
    bn = nn.BatchNorm2d(8).double().train()
    with torch.no_grad():
        bn.weight.uniform_()
    bn.bias.requires_grad_(False)
    gn = convert_norm(bn, "gn", num_groups=4)  # the root itself is converted
    assert type(gn) is GroupNorm and gn.num_groups == 4 and gn.training
    assert gn.weight.dtype == torch.float64 and torch.equal(gn.weight, bn.weight)
    assert gn.weight.requires_grad and not gn.bias.requires_grad



@pytest.mark.parametrize("name, kwargs, cls, kept, eps", [
    ("evonorm_b0", {}, EvoNormB0, ("weight", "bias", "running_var"), 1e-3),
    ("evonorm_s0", {"num_groups": 2}, EvoNormS0, ("weight", "bias"), 1e-3),
    ("frn", {}, FilterResponseNorm, ("weight", "bias"), 1e-6),  # FRN's own eps: it is added to a mean square
])
def test_a_models_batchnorms_to_each_peer_by_name(name, kwargs, cls, kept, eps):
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, eps=1e-3), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4, eps=1e-3)).double()
    with torch.no_grad():
        model(torch.randn(4, 3, 3, 3, dtype=torch.float64))  # running statistics away from their initial values
        for layer in (model[1], model[4]):
            layer.weight.uniform_()
            layer.bias.uniform_()
    expected = [{key: getattr(model[i], key).detach().clone() for key in kept} for i in (1, 4)]
    converted = convert_norm(model.eval(), name, **kwargs)
    for index, state in zip((1, 4), expected):
        layer = converted[index]
        assert type(layer) is cls and not layer.training and layer.eps == eps
        assert all(torch.equal(getattr(layer, key), value) for key, value in state.items())
        assert layer.weight.dtype == torch.float64
    assert converted(torch.randn(2, 3, 3, 3, dtype=torch.float64)).shape == (2, 4, 3, 3)

def test_to_none_and_errors():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), GroupNorm(4, num_groups=2))
    converted = convert_norm(model, "none")
    assert type(converted[1]) is nn.Identity and type(converted[2]) is GroupNorm  # GN is not a batch-stat layer
    with pytest.raises(ValueError, match="valid names"):
        convert_norm(model, "ln")
    with pytest.raises(TypeError, match="ideal_batch_size"):
        convert_norm(model, "bn", ideal_batch_size=4)


def test_torch_s_batch_norms_are_named_by_every_public_class_there_is():
    # mbn names torch's batch norms by their public classes (their base, _BatchNorm, is private):
    # a batch norm that a torch release adds to torch.nn fails here until it is added too.
    from torch.nn.modules.batchnorm import _BatchNorm

    from mbn.nn.convert import TORCH_BATCH_NORMS

    def subclasses(cls: type) -> set[type]:
        return set(cls.__subclasses__()).union(*(subclasses(sub) for sub in cls.__subclasses__()))

    in_torch_nn = {cls for cls in subclasses(_BatchNorm) if cls.__module__.startswith("torch.nn.")}
    assert {nn.BatchNorm2d, nn.SyncBatchNorm, nn.LazyBatchNorm3d} <= in_torch_nn
    missing = sorted(cls.__qualname__ for cls in in_torch_nn if not issubclass(cls, TORCH_BATCH_NORMS))
    assert missing == [], f"torch {torch.__version__}: batch norms missing from mbn.nn TORCH_BATCH_NORMS: {missing}"


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "vgg11"])
@pytest.mark.parametrize("name, kwargs", [("evonorm_b0", {}), ("evonorm_s0", {"num_groups": 2}), ("frn", {})])
def test_a_converted_backbone_is_the_backbone_built_with_the_peer(arch, name, kwargs):
    # Same modules (ReLUs after the peers gone, no activation before a residual addition), same
    # state_dict keys, and the same outputs once the built model holds the converted one's state.
    from mbn.models import build_model
    from mbn.nn import norm_layer

    torch.manual_seed(0)
    converted = convert_norm(build_model(arch, num_classes=3, width=4), name, **kwargs)
    built = build_model(arch, num_classes=3, norm_layer=norm_layer(name, **kwargs), width=4)
    assert repr(converted) == repr(built)
    built.load_state_dict(converted.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(converted(x), built(x))


def test_a_torchvision_resnet_keeps_the_relus_its_forward_calls():
    # convert_norm cannot read a forward: outside nn.Sequential the ReLUs and activations stay.
    model = convert_norm(trained_resnet(), "frn")
    assert type(model.relu) is nn.ReLU and type(model.layer1[0].relu) is nn.ReLU
    assert all(layer.apply_act for layer in model.modules() if isinstance(layer, FilterResponseNorm))
