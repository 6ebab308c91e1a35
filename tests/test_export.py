"""`empssl export`: the backbone loads into torchvision's resnet18 (only fc.* missing) and computes our
features in float64; --with-head gives encoder.features; refusals (width, existing file, bad checkpoint,
no safetensors) are clear and leave no file behind."""

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
from empssl.models.encoder import build_encoder, load_encoder
from empssl.models.export import ExportError, export_checkpoint, export_state_dict
from empssl.training import loop as T

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HIDDEN_DIM = 48


def torchvision_resnet18(arch, hidden_dim=None):
    """torchvision's resnet18 as docs/training.md section 7 tells a user to build it: CIFAR stem patched, fc dropped,
    and with ``hidden_dim`` the pre_feature head that --with-head exports."""
    model = torchvision.models.resnet18()
    if arch == "resnet18-cifar":
        model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    if hidden_dim is not None:
        model.fc = nn.Identity()
        model.pre_feature = nn.Sequential(nn.Linear(512, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU())
    return model


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A width-1 CIFAR-stem encoder after 2 training steps (BatchNorm statistics and weights moved)."""
    out = tmp_path_factory.mktemp("run")
    config = TrainConfig(
        dataset="synthetic",
        width=1.0,
        hidden_dim=HIDDEN_DIM,
        z_dim=16,
        num_patches=2,
        batch_size=8,
        max_steps=2,
        log_every=1,
        device="cpu",
        progress=False,
        out_dir=str(out),
    )
    return T.train(config, make_synthetic(16, 8, 16, seed=0)).checkpoint_path


def _saved_encoder(folder, arch="resnet18-cifar", width=1.0):
    """A fresh encoder with random BatchNorm statistics and affine parameters, saved in the checkpoint format."""
    model_config = dict(arch=arch, width=width, hidden_dim=HIDDEN_DIM, z_dim=16)
    encoder = build_encoder(**model_config)
    for module in encoder.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.weight.data.uniform_(0.5, 1.5)
            module.bias.data.normal_(0, 0.1)
    path = os.path.join(folder, f"{arch}-{width}.pt")
    ckpt.save_checkpoint(path, {"model_config": model_config, "model": encoder.state_dict(), "step": 0})
    return path


def _ours(checkpoint):
    encoder, _ = load_encoder(checkpoint)
    return encoder.double().eval()


def _images(size):
    return torch.randn(3, 3, size, size, dtype=torch.float64)


@pytest.mark.parametrize("arch", ["resnet18-cifar", "resnet18-imagenet"])
def test_export_loads_into_torchvision_with_only_fc_missing_and_gives_our_features(arch, tmp_path, trained_checkpoint):
    checkpoint = trained_checkpoint if arch == "resnet18-cifar" else _saved_encoder(str(tmp_path), arch)
    out = tmp_path / "backbone.pt"
    export_checkpoint(checkpoint, str(out))
    assert not [name for name in os.listdir(tmp_path) if name.startswith(".tmp-")]  # written atomically
    state = torch.load(out, weights_only=True)
    model = torchvision_resnet18(arch)
    result = model.load_state_dict(state, strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and result.unexpected_keys == []
    model.fc = nn.Identity()
    model = model.double().eval()
    ours = _ours(checkpoint)
    x = _images(16 if arch == "resnet18-cifar" else 32)
    with torch.no_grad():
        expected = ours.backbone(x)
        got = model(x)
    assert expected.shape == (3, 512) and expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_with_head_adds_pre_feature_and_gives_the_evaluation_features(tmp_path, trained_checkpoint):
    out = tmp_path / "features.pt"
    export_checkpoint(trained_checkpoint, str(out), with_head=True)
    state = torch.load(out, weights_only=True)
    assert {key for key in state if key.startswith("pre_feature.")} == {
        "pre_feature.0.weight",
        "pre_feature.0.bias",
        "pre_feature.1.weight",
        "pre_feature.1.bias",
        "pre_feature.1.running_mean",
        "pre_feature.1.running_var",
        "pre_feature.1.num_batches_tracked",
    }
    assert not [key for key in state if key.startswith(("projection.", "backbone.", "fc."))]
    model = torchvision_resnet18("resnet18-cifar", HIDDEN_DIM)
    model.load_state_dict(state, strict=True)  # every key used, none missing
    model = model.double().eval()
    ours = _ours(trained_checkpoint)
    x = _images(16)
    with torch.no_grad():
        expected = ours.features(x)
        got = model.pre_feature(model(x))
    assert expected.shape == (3, HIDDEN_DIM) and expected.abs().max() > 0
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-10)


def test_export_state_dict_copies_and_refuses_other_widths(tmp_path):
    encoder = build_encoder(width=1.0, hidden_dim=HIDDEN_DIM, z_dim=16)
    state = export_state_dict(encoder)
    assert set(state) == {name[len("backbone.") :] for name in encoder.state_dict() if name.startswith("backbone.")}
    state["conv1.weight"].zero_()  # a copy: the encoder is untouched
    assert encoder.backbone.conv1.weight.abs().max() > 0
    with pytest.raises(ExportError, match="torchvision's resnet18 has 64 base channels .* this encoder has 32"):
        export_state_dict(build_encoder(width=0.5, hidden_dim=HIDDEN_DIM, z_dim=16))
    with pytest.raises(TypeError, match="EMPSSLEncoder"):
        export_state_dict(torchvision.models.resnet18())


def test_cli_export_writes_refuses_to_overwrite_and_overwrites_when_asked(tmp_path, capsys, trained_checkpoint):
    out = tmp_path / "backbone.pt"
    assert cli.main(["export", "--checkpoint", trained_checkpoint, "--out", str(out)]) == 0
    assert f"to {out}" in capsys.readouterr().out
    first = out.read_bytes()
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a plain file's mode, not mkstemp's 0600
    assert cli.main(["export", "--checkpoint", trained_checkpoint, "--out", str(out), "--with-head"]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert (
        cli.main(["export", "--checkpoint", trained_checkpoint, "--out", str(out), "--with-head", "--overwrite"]) == 0
    )
    assert "pre_feature.0.weight" in torch.load(out, weights_only=True)
    assert sorted(os.listdir(tmp_path)) == ["backbone.pt"]  # no temporary file left


def test_cli_export_errors_are_clear_and_write_nothing(tmp_path, capsys):
    out = tmp_path / "out.pt"
    assert cli.main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(out)]) == 1
    assert f"checkpoint {tmp_path / 'missing.pt'} not found" in capsys.readouterr().err
    foreign = tmp_path / "foreign.pt"
    torch.save(torchvision.models.resnet18().state_dict(), foreign)  # e.g. an export fed back in
    assert cli.main(["export", "--checkpoint", str(foreign), "--out", str(out)]) == 1
    assert "is not an empssl checkpoint" in capsys.readouterr().err
    narrow = _saved_encoder(str(tmp_path), width=0.25)
    assert cli.main(["export", "--checkpoint", narrow, "--out", str(out)]) == 1
    assert "64 base channels (width 1), but this encoder has 16" in capsys.readouterr().err
    assert not out.exists()
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["export", "--help"])
    assert exit_info.value.code == 0
    assert "--with-head" in capsys.readouterr().out


def test_safetensors_without_the_package_is_a_clear_error(tmp_path, monkeypatch, trained_checkpoint):
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import fails, as where it is not installed
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    out = tmp_path / "backbone.safetensors"  # the format follows the suffix when --format is not given
    with pytest.raises(ExportError, match=r"safetensors needs the safetensors package.*pip install safetensors"):
        export_checkpoint(trained_checkpoint, str(out))
    assert os.listdir(tmp_path) == []


def test_safetensors_export_round_trips(tmp_path, trained_checkpoint):
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as err:
        pytest.skip(f"optional dependency not installed: safetensors ({err})")
    out = tmp_path / "features.bin"
    written = export_checkpoint(trained_checkpoint, str(out), with_head=True, format="safetensors")
    loaded = load_file(str(out))
    assert set(loaded) == set(written)
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor)
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["arch"] == "resnet18-cifar" and metadata["with_head"] == "true" and metadata["step"] == "2"
    torchvision_resnet18("resnet18-cifar", HIDDEN_DIM).load_state_dict(loaded, strict=True)
