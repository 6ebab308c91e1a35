"""Whole-image evaluation beside the bag of patches (`eval --views whole|patches|both`): the whole-image features are
the encoder's on the image resized as torchvision's Resize does and normalised by the recipe, and each view's
results are the same whether evaluated alone or with the other."""

import json

import pytest
import torch
from torchvision.transforms.v2 import functional as TF

from empssl import cli
from empssl.augment.config import AugmentConfig, augment_config_for
from empssl.evaluation.features import extract_whole_image_features
from empssl.evaluation.probe import LabelledFeatures, knn_classify
from empssl.models.encoder import build_encoder
from empssl.models.fused import fuse_conv_epilogues

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _encoder(generator):
    """A small encoder with non-trivial BatchNorm statistics (folding is exercised), in training mode."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                module.running_mean.copy_(0.5 * torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(0.2 + torch.rand(module.num_features, generator=generator))
    return encoder.train()


@pytest.mark.parametrize(
    "size, recipe",
    [(16, None), (16, AugmentConfig(output_size=12, mean=(0.4, 0.5, 0.6), std=(0.2, 0.3, 0.4)))],
)
def test_whole_image_features_are_the_encoder_on_the_resized_normalised_image(size, recipe):
    generator = torch.Generator().manual_seed(torch.seed())
    encoder = _encoder(generator)
    images = torch.randint(0, 256, (5, size, size, 3), dtype=torch.uint8, generator=generator)
    features = extract_whole_image_features(encoder, images, recipe, max_images_per_forward=2)  # 3 chunks, 1 padded
    assert encoder.training  # its mode is restored
    recipe = recipe or augment_config_for(size)
    x = images.permute(0, 3, 1, 2).double() / 255
    x = TF.resize(x, [recipe.output_size] * 2, antialias=True)  # torchvision's Resize: bilinear, antialiased
    mean, std = (torch.tensor(v, dtype=torch.float64).view(1, 3, 1, 1) for v in (recipe.mean, recipe.std))
    x = (x - mean) / std
    with torch.no_grad():
        expected = encoder.double().eval().features(x)
    # float32 through a BatchNorm-folded copy against float64, relative to the features' scale (measured: at most
    # 1e-6 over 40 draws; a resize without antialiasing errs 0.12, one rounded to uint8 2e-3)
    assert (features.double() - expected).abs().max().item() <= 5e-6 * expected.abs().max().item()


def _eval(capsys, *options):
    argv = ["eval", "--random-init", "--dataset", "synthetic", "--image-size", "8", "--train-size", "64"]
    argv += ["--test-size", "24", "--width", "0.125", "--hidden-dim", "32", "--z-dim", "16", "--num-patches", "2"]
    argv += ["--linear-epochs", "3", "--device", "cpu", "--threads", "1", "--no-progress", "--json", *options]
    threads = torch.get_num_threads()
    try:
        assert cli.main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    return printed, json.loads(printed.strip().splitlines()[-1])


def test_eval_views_both_reports_each_view_as_alone(capsys):
    printed, both = _eval(capsys, "--views", "both")
    assert "bag of 2 patches: linear probe top-1" in printed and "whole image: kNN top-1 (k=20)" in printed
    _, patches = _eval(capsys, "--views", "patches")
    _, whole = _eval(capsys, "--views", "whole")
    accuracies = ("linear_top1", "linear_best_epoch_top1", "knn_top1", "knn_top5")
    assert {k: both[k] for k in accuracies} == {k: patches[k] for k in accuracies}
    assert {f"whole_{k}": both[f"whole_{k}"] for k in accuracies} == {
        f"whole_{k}": whole[f"whole_{k}"] for k in accuracies
    }
    assert "whole_knn_top1" not in patches and "knn_top1" not in whole
    # the whole view's kNN is the kNN of the whole-image features
    from empssl.data.synthetic import make_synthetic

    torch.manual_seed(0)
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16)
    data = make_synthetic(64, 24, 8, seed=0)
    train, test = (extract_whole_image_features(encoder, images) for images in (data.train_images, data.test_images))
    knn = knn_classify(LabelledFeatures(train, data.train_labels, test, data.test_labels, data.num_classes))
    assert whole["whole_knn_top1"] == knn["top1"]


def test_the_whole_image_view_runs_fused_convolutions_when_asked(capsys, monkeypatch):
    from empssl.evaluation import features

    fused = []

    def spy(network):
        fused.append(network)
        return fuse_conv_epilogues(network)

    monkeypatch.setattr(features, "fuse_conv_epilogues", spy)
    _, whole = _eval(capsys, "--views", "whole", "--fused-conv", "on")
    assert len(fused) == 2  # the train split's features and the test split's
    _, plain = _eval(capsys, "--views", "whole")
    assert len(fused) == 2 and whole["whole_knn_top1"] == plain["whole_knn_top1"]  # off CUDA: the same ops
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    with pytest.raises(ValueError, match="needs fold=True"):
        extract_whole_image_features(build_encoder(width=0.125), images, fold=False, fused_conv=True)
