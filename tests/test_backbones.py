"""Any backbone (empssl.models.backbones): names checked with one clear line, options that do not apply refused with
the reason, the feature size found by a forward (checked against the libraries' own classifiers), torchvision models
with only their classifier replaced, BatchNorm pairs found by torch.fx (and only true pairs), the plain evaluation
path of a backbone without BatchNorm, checkpoints that record the backbone and refuse another, SyncBatchNorm's
refusal of BatchNorm subclasses."""

import copy
import os
import sys

import pytest
import torch
import torchvision
from torch import nn

from empssl import checkpoint as ckpt
from empssl import cli
from empssl.config import TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.distributed import convert_sync_batchnorm
from empssl.evaluation.features import extract_features
from empssl.models.backbones import (
    BackboneError,
    build_backbone,
    check_arch,
    check_options,
    parse_arch,
    parse_backbone_args,
    probe_feature_dim,
)
from empssl.models.encoder import build_encoder, load_encoder
from empssl.models.fold import encoder_fold_pairs, fold_batchnorm, fold_pairs
from empssl.training import loop as T
from empssl.training.memory import check_step_fits
from empssl.training.run_folder import check_resume_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# the pairs the built-in ResNet-18 encoder had listed by hand before they were found by tracing
RESNET18_PAIRS = (
    [("backbone.conv1", "backbone.bn1")]
    + [
        (f"backbone.layer{stage}.{block}.conv{i}", f"backbone.layer{stage}.{block}.bn{i}")
        for stage in range(1, 5)
        for block in range(2)
        for i in (1, 2)
    ]
    + [(f"backbone.layer{stage}.0.downsample.0", f"backbone.layer{stage}.0.downsample.1") for stage in (2, 3, 4)]
    + [("pre_feature.0", "pre_feature.1"), ("projection.0", "projection.1")]
)


def _on_meta(arch, **options):
    with torch.device("meta"):
        return build_backbone(arch, **options)


def _randomise_batchnorms(module, generator):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                c = m.num_features
                m.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                m.running_var.copy_(0.2 + torch.rand(c, generator=generator))
                m.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator))
                m.bias.copy_(0.3 * torch.randn(c, generator=generator))


def test_arch_names_are_checked_with_one_clear_line(capsys):
    assert parse_arch("resnet18-cifar") == ("empssl", "resnet18-cifar")
    assert parse_arch("torchvision:resnet50") == ("torchvision", "resnet50")
    assert parse_arch("timm:vit_tiny_patch16_224") == ("timm", "vit_tiny_patch16_224")
    assert check_arch("torchvision:vit_b_16") == "torchvision:vit_b_16"
    with pytest.raises(BackboneError, match=r"torchvision has no model 'resnet5'; did you mean .*torchvision:resnet50"):
        check_arch("torchvision:resnet5")
    with pytest.raises(BackboneError, match=r"unknown --arch 'keras:resnet50': use resnet18-cifar or"):
        check_arch("keras:resnet50")
    with pytest.raises(BackboneError, match=r"names no model after torchvision:"):
        check_arch("torchvision:")
    with pytest.raises(BackboneError, match=r"torchvision has no model 'fasterrcnn_resnet50_fpn'"):
        check_arch("torchvision:fasterrcnn_resnet50_fpn")  # a detection model: classification models only
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--arch", "torchvision:resnt50"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and "torchvision has no model 'resnt50'; did you mean torchvision:resnet50" in err
    assert "Traceback" not in err


def test_a_missing_timm_is_one_clear_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError, installed or not
    with pytest.raises(BackboneError, match=r"optional dependency not installed: timm.*pip install timm"):
        check_arch("timm:vit_tiny_patch16_224")
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--arch", "timm:vit_tiny_patch16_224"])
    assert info.value.code == 2 and "pip install timm" in capsys.readouterr().err


def test_options_that_do_not_apply_are_refused_with_the_reason():
    with pytest.raises(BackboneError, match=r"--width scales the channels of the built-in ResNet-18 only"):
        check_options("torchvision:resnet50", width=0.5)
    with pytest.raises(ValueError, match=r"--width scales the channels of the built-in ResNet-18 only"):
        TrainConfig(arch="torchvision:resnet50", width=0.5).validate()
    with pytest.raises(BackboneError, match=r"names its stem in --arch: use --arch resnet18-cifar"):
        check_options("resnet18-imagenet", stem="cifar")
    with pytest.raises(BackboneError, match=r"the built-in resnet18-cifar takes --width"):
        check_options("resnet18-cifar", backbone_args="img_size=32")
    with pytest.raises(BackboneError, match=r"may not set num_classes, weights: empssl never loads weights"):
        parse_backbone_args("weights='IMAGENET1K_V1',num_classes=10")
    with pytest.raises(BackboneError, match=r"expected KEY=VALUE pairs"):
        parse_backbone_args("img_size")
    with pytest.raises(BackboneError, match=r"--stem cifar replaces a ResNet's stem .* has no such stem"):
        _on_meta("torchvision:mobilenet_v3_small", stem="cifar")
    with pytest.raises(BackboneError, match=r"cannot be built with --backbone-args no_such_argument=3"):
        _on_meta("torchvision:resnet50", backbone_args="no_such_argument=3")
    with pytest.raises(BackboneError, match=r"no Linear classifier with 1000 outputs"):
        _on_meta("torchvision:squeezenet1_0")  # its classifier is a convolution
    with pytest.raises(BackboneError, match=r"returns a GoogLeNetOutputs .* aux_logits=False"):
        _on_meta("torchvision:googlenet", backbone_args="aux_logits=True,init_weights=False")
    # a transformer is built for one image size: training on another is refused before anything is built
    config = TrainConfig(arch="torchvision:vit_b_16", backbone_args="image_size=32", hidden_dim=16, z_dim=8)
    check_step_fits(config, torch.device("cpu"), 32)
    with pytest.raises(ValueError, match=r"does not take 16x16 images .* image_size=16"):
        check_step_fits(config, torch.device("cpu"), 16)


def test_backbone_args_are_python_literals():
    args = parse_backbone_args("img_size=(32, 48), patch_size=8,act=gelu,  drop_rate=0.1,class_token=False")
    assert args == {"img_size": (32, 48), "patch_size": 8, "act": "gelu", "drop_rate": 0.1, "class_token": False}
    assert parse_backbone_args("") == {} and parse_backbone_args({"a": 1}) == {"a": 1}


@pytest.mark.parametrize(
    "arch, args, classifier",
    [
        ("torchvision:resnet50", "", "fc"),
        ("torchvision:mobilenet_v3_small", "", "classifier.3"),
        ("torchvision:convnext_tiny", "", "classifier.2"),
        ("torchvision:vit_b_16", "", "heads.head"),
        ("torchvision:vit_b_16", "image_size=32", "heads.head"),  # a transformer built for 32x32 images
        ("torchvision:swin_t", "", "head"),
    ],
)
def test_the_feature_size_is_found_and_is_what_the_classifier_read(arch, args, classifier):
    built = _on_meta(arch, backbone_args=args)
    with torch.device("meta"):
        reference = torchvision.models.get_model(parse_arch(arch)[1], weights=None, **parse_backbone_args(args))
        encoder = build_encoder(arch, hidden_dim=16, z_dim=8, backbone_args=args)
    assert built.removed_head == classifier and isinstance(built.module.get_submodule(classifier), nn.Identity)
    assert built.feature_dim == reference.get_submodule(classifier).in_features
    assert encoder.feature_dim == built.feature_dim == encoder.pre_feature[0].in_features
    # only the classifier went: every other tensor is the library's, by name and shape
    expected = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith(classifier + ".")}
    assert {k: v.shape for k, v in built.module.state_dict().items()} == expected


def test_a_torchvision_backbone_is_the_torchvision_model_without_its_classifier():
    torch.manual_seed(int(torch.seed() % 2**31))
    encoder = build_encoder("torchvision:mobilenet_v3_small", hidden_dim=16, z_dim=8).double()
    reference = torchvision.models.mobilenet_v3_small().double()
    reference.classifier[3] = nn.Identity()
    reference.load_state_dict(encoder.backbone.state_dict(), strict=True)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    seed = int(torch.seed() % 2**31)
    torch.manual_seed(seed)  # the same dropout masks: both in training mode
    ours = encoder.backbone(x)
    torch.manual_seed(seed)
    theirs = reference(x)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
    (grad_ours,) = torch.autograd.grad((ours * ours.detach().sin()).sum(), x)
    (grad_theirs,) = torch.autograd.grad((theirs * theirs.detach().sin()).sum(), x)
    torch.testing.assert_close(grad_ours, grad_theirs, rtol=0, atol=0)
    assert grad_ours.abs().max() > 0


def test_the_cifar_stem_of_a_torchvision_resnet_keeps_32x32_maps_to_a_4x4_final_map():
    built = build_backbone("torchvision:resnet18", stem="cifar")
    conv1 = built.module.conv1
    assert (conv1.kernel_size, conv1.stride, conv1.padding) == ((3, 3), (1, 1), (1, 1)) and conv1.bias is None
    assert isinstance(built.module.maxpool, nn.Identity)
    seen = {}

    def record(module, inputs, output):
        seen["shape"] = tuple(output.shape)

    built.module.layer4.register_forward_hook(record)
    with torch.no_grad():
        assert built.module.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512)
    assert seen["shape"] == (2, 512, 4, 4)


def test_batchnorm_pairs_are_found_by_tracing():
    assert sorted(encoder_fold_pairs(build_encoder(width=0.125, hidden_dim=16, z_dim=8))) == sorted(RESNET18_PAIRS)
    with torch.device("meta"):
        resnet50 = build_encoder("torchvision:resnet50", hidden_dim=16, z_dim=8)
    # the stem, 16 bottlenecks of 3 convolutions, 4 downsamples, the head's two
    assert len(encoder_fold_pairs(resnet50)) == 1 + 16 * 3 + 4 + 2

    class Block(nn.Module):  # only the first conv -> bn pair is foldable
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)
            self.shared, self.bn_shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)  # its output also feeds the sum
            self.act, self.bn_after_act = nn.ReLU(), nn.BatchNorm2d(4)  # conv -> relu -> bn
            self.before_subclass = nn.Conv2d(4, 4, 1)  # conv -> a BatchNorm subclass
            self.subclass = type("BatchNormAct", (nn.BatchNorm2d,), {})(4)  # may compute something else
            self.pool = nn.Conv2d(4, 4, 1)
            self.stats_free = nn.BatchNorm2d(4, track_running_stats=False)  # normalises by the batch in eval too

        def forward(self, x):
            x = self.bn(self.conv(x))
            y = self.shared(x)
            x = self.bn_shared(y) + y
            x = self.bn_after_act(self.act(x))
            return self.stats_free(self.pool(self.subclass(self.before_subclass(x))))

    assert fold_pairs(Block()) == [("conv", "bn")]

    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            return self.bn(self.conv(x)) if x.sum() > 0 else x  # control flow on values: torch.fx cannot trace it

    assert fold_pairs(Untraceable()) == []  # the plain path, with a note


def test_a_folded_torchvision_encoder_equals_the_eval_mode_encoder_in_float64():
    generator = torch.Generator().manual_seed(torch.seed())
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    encoder = build_encoder("torchvision:mobilenet_v3_small", hidden_dim=16, z_dim=8).double()
    _randomise_batchnorms(encoder, generator)
    folded = fold_batchnorm(encoder)
    remaining = [type(m) for m in folded.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert remaining == [] and len(encoder_fold_pairs(encoder)) == 36
    x = torch.randn(3, 3, 32, 32, generator=generator, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(folded.features(x), encoder.eval().features(x), rtol=1e-10, atol=1e-10)


def test_a_backbone_without_batchnorm_is_evaluated_on_the_plain_path():
    """ConvNeXt normalises with LayerNorm: nothing of its backbone folds, only the head does, and the evaluation
    features equal the unfolded eval-mode encoder's."""
    generator = torch.Generator().manual_seed(torch.seed())
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    encoder = build_encoder("torchvision:convnext_tiny", hidden_dim=16, z_dim=8)
    _randomise_batchnorms(encoder, generator)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in encoder.backbone.modules())
    assert encoder_fold_pairs(encoder) == [("pre_feature.0", "pre_feature.1"), ("projection.0", "projection.1")]
    images = make_synthetic(6, 2, 32, seed=int(torch.randint(1000, (1,), generator=generator))).train_images
    folded = extract_features(encoder, images, 2, seed=5)
    plain = extract_features(encoder, images, 2, seed=5, fold=False)
    scale = plain.abs().max().item()
    assert folded.shape == (6, 16) and scale > 0
    assert (folded - plain).abs().max().item() <= 3e-6 * scale  # folding rounds the head's weights once more


def test_sync_batchnorm_refuses_a_batchnorm_subclass():
    plain = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    assert type(convert_sync_batchnorm(copy.deepcopy(plain))[1]).__name__ == "SyncBatchNorm"
    subclass = nn.Sequential(nn.Conv2d(3, 4, 3), type("BatchNormAct2d", (nn.BatchNorm2d,), {})(4))
    with pytest.raises(ValueError, match=r"BatchNormAct2d is a BatchNorm with a forward of its own"):
        convert_sync_batchnorm(subclass)


def test_checkpoints_record_the_backbone_and_refuse_another(tmp_path, capsys):
    options = dict(
        dataset="synthetic", hidden_dim=16, z_dim=8, num_patches=2, batch_size=8, max_steps=1, device="cpu",
        progress=False, log_every=1,
    )  # fmt: skip
    data = make_synthetic(16, 8, 32, seed=0)
    arch, args = "torchvision:mobilenet_v3_small", "dropout=0.1"
    path = T.train(TrainConfig(arch=arch, backbone_args=args, out_dir=str(tmp_path / "run"), **options), data)
    path = path.checkpoint_path
    payload = ckpt.load_checkpoint(path)
    assert payload["model_config"] == dict(
        arch=arch, width=1.0, hidden_dim=16, z_dim=8, stem="default", backbone_args={"dropout": 0.1}
    )
    encoder, _ = load_encoder(path)
    assert encoder.arch == arch and encoder.backbone.classifier[2].p == 0.1  # the argument reached the model
    other = TrainConfig(arch="torchvision:mobilenet_v3_large", resume=path, out_dir=str(tmp_path / "run"), **options)
    with pytest.raises(ckpt.CheckpointError) as info:
        T.train(other, data)
    message = str(info.value)
    assert f"holds a {arch} backbone_args dropout=0.1 hidden_dim 16" in message
    assert "asks for torchvision:mobilenet_v3_large hidden_dim 16" in message
    with pytest.raises(ckpt.CheckpointError, match=r"holds a .*dropout=0.1 .* but this run asks for .*dropout=0.2"):
        check_resume_config(path, payload["model_config"], {}, TrainConfig(arch=arch, backbone_args="dropout=0.2"))
    code = cli.main(["eval", "--checkpoint", path, "--arch", "resnet18-cifar", "--device", "cpu", "--no-progress"])
    err = capsys.readouterr().err
    assert code != 0 and f"holds a {arch}" in err and "asks for resnet18-cifar width 1.0" in err


def test_a_checkpoint_from_before_backbones_loads_and_resumes_as_the_built_in_resnet(tmp_path):
    old_config = dict(arch="resnet18-cifar", width=0.125, hidden_dim=16, z_dim=8)  # no stem, no backbone_args
    encoder = build_encoder(**old_config)
    path = os.path.join(tmp_path, "old.pt")
    ckpt.save_checkpoint(path, {"model_config": old_config, "model": encoder.state_dict(), "step": 0})
    loaded, _ = load_encoder(path)
    saved, found = encoder.state_dict(), loaded.state_dict()
    assert list(found) == list(saved)  # the same names, in the same order
    for name, tensor in saved.items():
        assert torch.equal(tensor, found[name]), name
    check_resume_config(path, old_config, {}, TrainConfig(width=0.125, hidden_dim=16, z_dim=8))  # the same model


class _NoMetaKernel(nn.Module):
    """A backbone with an op that has no meta kernel; on real images of ``takes`` (a size, or None: none) it returns
    (N, 5) features, on others it refuses the size."""

    def __init__(self, takes=None):
        super().__init__()
        self.linear, self.takes = nn.Linear(3, 5), takes

    def forward(self, x):
        if x.device.type == "meta":
            raise NotImplementedError("no meta kernel for op empssl_test::blur")
        if x.shape[-1] != self.takes:
            raise ValueError(f"expected {self.takes}x{self.takes} images")
        return self.linear(x.mean((2, 3)))


def test_a_backbone_without_a_meta_kernel_is_sized_by_a_real_forward_or_refused_with_the_reason():
    assert probe_feature_dim(_NoMetaKernel(takes=32), "custom") == 5  # real weights: a tiny real forward
    with pytest.raises(BackboneError, match=r"takes none of the image sizes 16, 8 \(first: 16x16: expected None"):
        probe_feature_dim(_NoMetaKernel(), "custom", sizes=(16, 8))  # each real forward's refusal is the reason
    with torch.device("meta"):  # as train, eval and export build it first
        skeleton = _NoMetaKernel(takes=32)
    with pytest.raises(
        BackboneError, match=r"--arch custom cannot be sized on the meta device.* \(no meta kernel for op"
    ):
        probe_feature_dim(skeleton, "custom")


def test_the_step_memory_is_not_checked_with_a_warning_where_an_op_has_no_meta_kernel(monkeypatch):
    from empssl.training import memory

    monkeypatch.setattr(memory, "_meta_encoder", lambda model_config: _NoMetaKernel())
    monkeypatch.setattr(memory, "_SAVED_BYTES_PER_PATCH", {})
    with pytest.warns(UserWarning, match=r"not checked before training: an op has no meta kernel at 32x32"):
        check_step_fits(TrainConfig(hidden_dim=16, z_dim=8), torch.device("cpu"), 32)
