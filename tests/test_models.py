"""The encoder (docs/method.md section 3) against torchvision's resnet18 and the spec's structure."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from empssl.models.encoder import EMPSSLEncoder, build_encoder
from empssl.models.resnet import ResNet18Backbone


def torchvision_resnet18(arch: str) -> nn.Module:
    """torchvision's resnet18 with the authors' modifications (model/model.py of the EMP-SSL code)."""
    model = torchvision.models.resnet18(weights=None)
    if arch == "resnet18-cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    return model


def randomise_batchnorm_statistics(model: nn.Module, generator: torch.Generator) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not the identity."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            c = module.num_features
            module.running_mean.copy_(torch.randn(c, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(c, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(c, generator=generator) * 0.1)


@pytest.mark.parametrize("arch", ["resnet18-imagenet", "resnet18-cifar"])
def test_state_dict_names_and_shapes_match_torchvision(arch):
    ours = ResNet18Backbone(arch).state_dict()
    theirs = torchvision.models.resnet18(weights=None).state_dict()
    theirs = {k: v for k, v in theirs.items() if not k.startswith("fc.")}
    assert list(ours) == list(theirs)  # same names in the same order, buffers included
    for name in theirs:
        if arch == "resnet18-cifar" and name == "conv1.weight":
            assert ours[name].shape == (64, 3, 3, 3)
            assert theirs[name].shape == (64, 3, 7, 7)
        else:
            assert ours[name].shape == theirs[name].shape, name


@pytest.mark.parametrize("arch", ["resnet18-imagenet", "resnet18-cifar"])
def test_state_dict_loads_strictly_both_ways(arch):
    generator = torch.Generator().manual_seed(0)
    theirs = torchvision_resnet18(arch)
    randomise_batchnorm_statistics(theirs, generator)
    ours = ResNet18Backbone(arch)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    for name, tensor in ours.state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()[name]), name

    ours_fresh = ResNet18Backbone(arch)
    back = torchvision_resnet18(arch)
    back.load_state_dict(ours_fresh.state_dict(), strict=True)
    for name, tensor in back.state_dict().items():
        assert torch.equal(tensor, ours_fresh.state_dict()[name]), name


@pytest.mark.parametrize("arch,size", [("resnet18-imagenet", 64), ("resnet18-cifar", 32)])
def test_backbone_equals_torchvision_values_and_gradients(arch, size):
    generator = torch.Generator().manual_seed(1)
    theirs = torchvision_resnet18(arch).double()
    randomise_batchnorm_statistics(theirs, generator)
    ours = ResNet18Backbone(arch).double()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, size, size, dtype=torch.float64, generator=generator)

    for mode in ("eval", "train"):
        ours.train(mode == "train")
        theirs.train(mode == "train")
        ours.zero_grad()
        theirs.zero_grad()
        x_ours = x.clone().requires_grad_()
        x_theirs = x.clone().requires_grad_()
        out_ours, out_theirs = ours(x_ours), theirs(x_theirs)
        assert out_ours.shape == (2, 512)
        torch.testing.assert_close(out_ours, out_theirs, rtol=1e-10, atol=1e-10)
        weight = torch.randn(2, 512, dtype=torch.float64, generator=generator)
        (out_ours * weight).sum().backward()
        (out_theirs * weight).sum().backward()
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=1e-10, atol=1e-10)
        their_params = dict(theirs.named_parameters())
        for name, p in ours.named_parameters():
            torch.testing.assert_close(p.grad, their_params[name].grad, rtol=1e-10, atol=1e-10, msg=name)


def test_cifar_stem_has_no_downsampling_and_a_4x4_final_map():
    backbone = ResNet18Backbone("resnet18-cifar")
    conv1 = backbone.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding, conv1.bias) == ((3, 3), (1, 1), (1, 1), None)
    assert isinstance(backbone.maxpool, nn.Identity)
    assert not any(isinstance(m, nn.MaxPool2d) for m in backbone.modules())

    shapes = {}
    backbone.layer1.register_forward_hook(lambda m, i, o: shapes.__setitem__("layer1", o.shape))
    backbone.avgpool.register_forward_hook(lambda m, i, o: shapes.__setitem__("before_pool", i[0].shape))
    out = backbone(torch.randn(2, 3, 32, 32))
    assert shapes["layer1"] == (2, 64, 32, 32)
    assert shapes["before_pool"] == (2, 512, 4, 4)
    assert out.shape == (2, 512)


def test_imagenet_stem_downsamples_by_4():
    backbone = ResNet18Backbone("resnet18-imagenet")
    conv1 = backbone.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((7, 7), (2, 2), (3, 3))
    assert isinstance(backbone.maxpool, nn.MaxPool2d)
    shapes = {}
    backbone.avgpool.register_forward_hook(lambda m, i, o: shapes.__setitem__("before_pool", i[0].shape))
    backbone(torch.randn(1, 3, 64, 64))
    assert shapes["before_pool"] == (1, 512, 2, 2)


def test_width_multiplier_scales_every_stage():
    encoder = EMPSSLEncoder("resnet18-cifar", width=0.25, hidden_dim=32, z_dim=16)
    backbone = encoder.backbone
    assert backbone.base_channels == 16 and backbone.feature_dim == 128
    stage_channels = [getattr(backbone, f"layer{i}")[1].conv2.out_channels for i in range(1, 5)]
    assert [backbone.conv1.out_channels] + stage_channels == [16, 16, 32, 64, 128]
    assert encoder.pre_feature[0].in_features == 128
    assert backbone(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    # Names do not depend on the width.
    assert list(backbone.state_dict()) == list(ResNet18Backbone("resnet18-cifar").state_dict())


def test_encoder_layout_outputs_and_unit_norm():
    torch.manual_seed(2)
    encoder = build_encoder("resnet18-cifar", width=0.25, hidden_dim=48, z_dim=24)
    assert [type(m) for m in encoder.pre_feature] == [nn.Linear, nn.BatchNorm1d, nn.ReLU]
    assert [type(m) for m in encoder.projection] == [nn.Linear, nn.BatchNorm1d, nn.ReLU, nn.Linear]
    assert (encoder.projection[0].in_features, encoder.projection[0].out_features) == (48, 48)
    assert encoder.projection[3].out_features == 24
    x = torch.randn(6, 3, 32, 32)
    z, features = encoder(x, return_features=True)
    assert z.shape == (6, 24) and features.shape == (6, 48)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(6), rtol=0, atol=1e-6)
    # z is the normalised projection of the returned features; features() is the same tensor.
    torch.testing.assert_close(z, F.normalize(encoder.projection(features), dim=1))
    encoder.eval()
    torch.testing.assert_close(encoder.features(x), encoder(x, return_features=True)[1])
    torch.testing.assert_close(encoder(x), F.normalize(encoder.projection(encoder.features(x)), dim=1))


def test_default_encoder_dimensions():
    encoder = EMPSSLEncoder()
    assert encoder.pre_feature[0].in_features == 512 and encoder.pre_feature[0].out_features == 4096
    assert encoder.projection[3].out_features == 1024
    assert isinstance(encoder.backbone.maxpool, nn.Identity)


def test_gradient_reaches_every_parameter():
    torch.manual_seed(3)
    encoder = EMPSSLEncoder("resnet18-cifar", width=0.25, hidden_dim=32, z_dim=16)
    x = torch.randn(4, 3, 32, 32)
    target = torch.randn(4, 16)

    encoder.eval()  # running statistics: every parameter, pre-BN biases included, gets a nonzero gradient
    (encoder(x) * target).sum().backward()
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name

    encoder.zero_grad(set_to_none=True)
    encoder.train()  # batch statistics: a bias right before a BatchNorm cancels out of the output
    (encoder(x) * target).sum().backward()
    pre_bn_biases = {"pre_feature.0.bias", "projection.0.bias"}
    for name, p in encoder.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        if name in pre_bn_biases:
            assert p.grad.abs().max() < 1e-5 * encoder.pre_feature[0].weight.grad.abs().max(), name
        else:
            assert p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("arch", ["resnet18-cifar", "resnet18-imagenet"])
def test_channels_last_matches_contiguous(arch):
    torch.manual_seed(4)
    encoder = EMPSSLEncoder(arch, width=0.25, hidden_dim=32, z_dim=16).double()
    x = torch.randn(3, 3, 32, 32, dtype=torch.float64)
    z = encoder(x)
    (z * z.detach().flip(0)).sum().backward()
    grads = {name: p.grad.clone() for name, p in encoder.named_parameters()}

    encoder.zero_grad(set_to_none=True)
    encoder = encoder.to(memory_format=torch.channels_last)
    assert encoder.backbone.conv1.weight.is_contiguous(memory_format=torch.channels_last)
    z_cl = encoder(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(z_cl, z, rtol=1e-10, atol=1e-10)
    (z_cl * z.detach().flip(0)).sum().backward()
    for name, p in encoder.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], rtol=1e-9, atol=1e-10, msg=name)


def test_bad_arguments_raise_clear_errors():
    with pytest.raises(ValueError, match="arch"):
        EMPSSLEncoder("resnet50")
    for width in (0, -0.5, float("nan")):
        with pytest.raises(ValueError, match="width"):
            EMPSSLEncoder(width=width)
    with pytest.raises(TypeError, match="width"):
        EMPSSLEncoder(width="1")
    with pytest.raises(ValueError, match="hidden_dim"):
        EMPSSLEncoder(hidden_dim=0)
    with pytest.raises(TypeError, match="z_dim"):
        EMPSSLEncoder(z_dim=3.0)
    encoder = EMPSSLEncoder(width=0.25, hidden_dim=8, z_dim=4)
    with pytest.raises(ValueError, match="x must have shape"):
        encoder(torch.randn(2, 1, 32, 32))
