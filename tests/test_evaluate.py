"""Bag-of-features evaluation: feature averaging, BatchNorm folding, linear probe (against the
Python-loop reference), weighted kNN."""

import copy
import functools

import pytest
import torch
import torch.nn.functional as F

from empssl.config import EvalConfig
from empssl.data.synthetic import make_synthetic
from empssl.evaluation.features import SPLIT_KEYS, extract_features
from empssl.evaluation.pipeline import evaluate
from empssl.evaluation.probe import LabelledFeatures, fit_linear_probe, knn_classify, linear_probe
from empssl.models.encoder import build_encoder
from empssl.models.fold import fold_batchnorm
from empssl.models.fused import fuse_conv_epilogues
from empssl.reference import probe as reference_probe

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _around(centres, num_per_class, generator):
    """Features = class centre + small noise, shuffled: linearly separable when the centres are far apart."""
    labels = torch.arange(len(centres)).repeat_interleave(num_per_class)
    features = centres[labels] + 0.3 * torch.randn(len(labels), centres.shape[1], generator=generator)
    order = torch.randperm(len(labels), generator=generator)
    return features[order], labels[order]


def test_linear_probe_and_knn_reach_100_percent_on_separable_features():
    generator = torch.Generator().manual_seed(torch.seed())
    centres = 4.0 * torch.randn(5, 32, generator=generator)
    train_x, train_y = _around(centres, 60, generator)
    test_x, test_y = _around(centres, 20, generator)
    probe = linear_probe(LabelledFeatures(train_x, train_y, test_x, test_y, 5), epochs=20)
    assert probe["final_top1"] == 1.0 and probe["best_epoch_top1"] == 1.0
    knn = knn_classify(LabelledFeatures(train_x, train_y, test_x, test_y, 5))
    assert knn["top1"] == 1.0 and knn["top5"] == 1.0


def test_random_labels_give_chance_accuracy():
    generator = torch.Generator().manual_seed(torch.seed())
    train_x, test_x = torch.randn(800, 64, generator=generator), torch.randn(800, 64, generator=generator)
    train_y, test_y = torch.randint(4, (800,), generator=generator), torch.randint(4, (800,), generator=generator)
    probe = linear_probe(LabelledFeatures(train_x, train_y, test_x, test_y, 4), epochs=10)
    knn = knn_classify(LabelledFeatures(train_x, train_y, test_x, test_y, 4))
    # chance is 0.25; the standard deviation of the accuracy of 800 guesses is 0.015
    assert abs(probe["final_top1"] - 0.25) < 0.07
    assert abs(knn["top1"] - 0.25) < 0.07
    assert probe["best_epoch_top1"] >= probe["final_top1"] and 1 <= probe["best_epoch"] <= 10


def test_knn_matches_a_float64_weighted_vote():
    generator = torch.Generator().manual_seed(torch.seed())
    # 7 or 8 train features per class and k = 44: every class gets votes, so no zero-vote ties in the top 5
    num_classes, k, temperature = 7, 44, 0.07
    train_x, test_x = torch.randn(50, 16, generator=generator), torch.randn(30, 16, generator=generator)
    train_y = torch.arange(50)[torch.randperm(50, generator=generator)] % num_classes
    test_y = torch.randint(num_classes, (30,), generator=generator)
    result = knn_classify(
        LabelledFeatures(train_x, train_y, test_x, test_y, num_classes), k=k, temperature=temperature, chunk_size=7
    )
    top1 = top5 = 0
    for x, y in zip(test_x.double(), test_y.tolist()):
        similarity = F.cosine_similarity(x[None], train_x.double(), dim=1)
        nearest = similarity.argsort(descending=True)[:k]
        votes = [0.0] * num_classes
        for index in nearest.tolist():
            votes[train_y[index]] += float(torch.exp(similarity[index] / temperature))
        ranking = sorted(range(num_classes), key=lambda c: -votes[c])
        top1 += ranking[0] == y
        top5 += y in ranking[:5]
    assert result["top1"] == pytest.approx(top1 / 30) and result["top5"] == pytest.approx(top5 / 30)
    assert result["top5"] >= result["top1"]


class _ScaledCopies:
    """A stand-in augmentation: patch i of image j is image j (as float) times (i + 1), patch-major."""

    def __call__(self, images, num_patches, generator=None, **counter_keys):
        base = images.permute(0, 3, 1, 2).float() / 255
        return torch.cat([base * (i + 1) for i in range(num_patches)])


def test_features_are_the_mean_over_patches_in_eval_mode():
    torch.manual_seed(0)
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16)
    encoder.train()
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    features = extract_features(
        encoder, images, num_patches=3, augment=_ScaledCopies(), max_patches_per_forward=6, fold=False
    )
    assert encoder.training  # mode restored
    encoder.eval()
    with torch.no_grad():
        for j in range(6):
            base = images[j : j + 1].permute(0, 3, 1, 2).float() / 255
            expected = torch.stack([encoder.features(base * (i + 1))[0] for i in range(3)]).mean(0)
            torch.testing.assert_close(features[j], expected, rtol=1e-5, atol=1e-5)


def test_evaluate_end_to_end_on_tiny_synthetic():
    torch.manual_seed(0)
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16)
    data = make_synthetic(100, 40, 8, seed=0)
    result = evaluate(encoder, data, EvalConfig(num_patches=2, linear_epochs=3, progress=False))
    for key in ("linear_top1", "linear_best_epoch_top1", "knn_top1", "knn_top5"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["linear_best_epoch_top1"] >= result["linear_top1"] and result["knn_top5"] >= result["knn_top1"]
    assert result["feature_dim"] == 32 and result["num_train"] == 100 and result["num_test"] == 40
    again = evaluate(encoder, data, EvalConfig(num_patches=2, linear_epochs=3, progress=False))
    assert again["linear_top1"] == result["linear_top1"] and again["knn_top1"] == result["knn_top1"]  # seeded


def _encoder_with_trained_statistics(generator, dtype=torch.float32):
    """A small encoder whose BatchNorms have non-trivial running statistics and affine parameters."""
    torch.manual_seed(int(torch.randint(2**31, (1,), generator=generator)))
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16).to(dtype)
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
                c = module.num_features
                module.running_mean.copy_(0.5 * torch.randn(c, generator=generator))
                module.running_var.copy_(0.2 + torch.rand(c, generator=generator))
                module.weight.copy_(1 + 0.3 * torch.randn(c, generator=generator))
                module.bias.copy_(0.3 * torch.randn(c, generator=generator))
    return encoder.train()


def test_folded_encoder_equals_the_eval_mode_encoder_in_float64():
    generator = torch.Generator().manual_seed(torch.seed())
    encoder = _encoder_with_trained_statistics(generator, torch.float64)
    folded = fold_batchnorm(encoder)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in folded.modules())
    assert encoder.training and sum(isinstance(m, torch.nn.BatchNorm2d) for m in encoder.modules()) == 20  # untouched
    x = torch.randn(5, 3, 16, 16, generator=generator, dtype=torch.float64)
    encoder.eval()
    with torch.no_grad():
        torch.testing.assert_close(folded.features(x), encoder.features(x), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(folded(x), encoder(x), rtol=1e-12, atol=1e-12)


def test_features_do_not_depend_on_chunking_and_folded_equals_unfolded():
    generator = torch.Generator().manual_seed(torch.seed())
    encoder = _encoder_with_trained_statistics(generator)
    images = torch.randint(0, 256, (7, 8, 8, 3), dtype=torch.uint8, generator=generator)
    seed = int(torch.randint(1000, (1,), generator=generator))
    # 1, 3 (the last chunk padded by 2) and 8 (one chunk padded by 1) images per forward
    runs = [extract_features(encoder, images, 2, max_patches_per_forward=size, seed=seed) for size in (2, 6, 16)]
    # float32 rounding relative to the features' scale: the CPU's convolutions sum in an order that depends on the
    # batch (a chunk of 1, 3 or 8 images), so a feature near 0 may differ by a few ulps of the largest (seen: 2e-6);
    # a padded image left in the mean, or another image's patches, would differ by the scale itself
    scale = runs[0].abs().max().item()
    for other in runs[1:]:
        assert (other - runs[0]).abs().max().item() <= 1e-5 * scale
    unfolded = extract_features(encoder, images, 2, max_patches_per_forward=6, seed=seed, fold=False)
    assert (unfolded - runs[0]).abs().max().item() <= 1e-4 * scale  # folding rounds the weights once more
    assert runs[0].shape == (7, 32)
    test_split = extract_features(encoder, images, 2, seed=seed, split_key=1)
    assert not torch.allclose(test_split, runs[0])  # the split key draws other patches


def _separable_features(generator, num_classes=6, dim=24, num_train=530, num_test=200, noise=1.6):
    """Overlapping classes (accuracy well below 1), so the probe's result depends on every step."""
    centres = torch.randn(num_classes, dim, generator=generator)
    train_y = torch.randint(num_classes, (num_train,), generator=generator)
    test_y = torch.randint(num_classes, (num_test,), generator=generator)
    train_x = centres[train_y] + noise * torch.randn(num_train, dim, generator=generator)
    test_x = centres[test_y] + noise * torch.randn(num_test, dim, generator=generator)
    return train_x, train_y, test_x, test_y, num_classes


def test_probe_equals_the_python_loop_reference():
    generator = torch.Generator().manual_seed(torch.seed())
    args = _separable_features(generator)  # 530 = 5 full batches and one of 30
    seed = int(torch.randint(1000, (1,), generator=generator))
    weight, bias, top1 = fit_linear_probe(LabelledFeatures(*args), epochs=4, seed=seed)
    reference_weight, reference_bias, reference_top1 = reference_probe.fit_linear_probe(*args, epochs=4, seed=seed)
    torch.testing.assert_close(weight, reference_weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bias, reference_bias, rtol=1e-5, atol=1e-6)
    assert (top1 - reference_top1).abs().max() <= 0.005  # one test image of 200 may flip on a rounding tie
    assert 0.3 < float(top1[-1]) < 0.99
    # the whole schedule: different momentum, weight decay and batch size too
    options = dict(epochs=12, lr=0.1, momentum=0.5, weight_decay=1e-3, batch_size=64, seed=seed)
    _, _, top1 = fit_linear_probe(LabelledFeatures(*args), **options)
    _, _, reference_top1 = reference_probe.fit_linear_probe(*args, **options)
    assert abs(float(top1[-1]) - float(reference_top1[-1])) <= 0.005
    result = linear_probe(LabelledFeatures(*args), **options)
    assert result["final_top1"] == pytest.approx(float(top1[-1]))
    assert result["best_epoch_top1"] == pytest.approx(float(top1.max()))


def test_evaluation_equals_the_unfolded_encoder_and_reference_probe():
    """Today's pipeline (unfolded eval-mode encoder, autograd probe) and the fast one agree on the same patches.

    In float64, so that folding's rounding (float32: features equal to 1e-4, see above) cannot flip a
    near-tied kNN vote: the kNN results are then identical."""
    generator = torch.Generator().manual_seed(torch.seed())
    encoder = _encoder_with_trained_statistics(generator, torch.float64)
    data = make_synthetic(120, 60, 8, seed=int(torch.randint(1000, (1,), generator=generator)))
    fast, slow = {}, {}
    for split, key in SPLIT_KEYS.items():
        images = getattr(data, f"{split}_images")
        fast[split] = extract_features(encoder, images, 2, seed=3, split_key=key)
        slow[split] = extract_features(encoder, images, 2, seed=3, split_key=key, fold=False)
    fast_args = (fast["train"], data.train_labels, fast["test"], data.test_labels, data.num_classes)
    slow_args = (slow["train"], data.train_labels, slow["test"], data.test_labels, data.num_classes)
    _, _, top1 = fit_linear_probe(LabelledFeatures(*fast_args), epochs=10, seed=3)
    _, _, reference_top1 = reference_probe.fit_linear_probe(*slow_args, epochs=10, seed=3)
    assert abs(float(top1[-1]) - float(reference_top1[-1])) <= 0.005 + 1e-6
    assert knn_classify(LabelledFeatures(*fast_args)) == knn_classify(LabelledFeatures(*slow_args))
    result = evaluate(encoder, data, EvalConfig(num_patches=2, linear_epochs=10, seed=3, progress=False))
    assert result["linear_top1"] == pytest.approx(float(top1[-1]))
    assert result["knn_top1"] == knn_classify(LabelledFeatures(*fast_args))["top1"]
    assert result["probe_seconds"] > 0 and result["knn_seconds"] > 0


def test_probe_and_features_refuse_bad_input():
    with pytest.raises(ValueError, match="epochs and batch_size must be positive"):
        fit_linear_probe(
            LabelledFeatures(
                torch.randn(4, 3),
                torch.zeros(4, dtype=torch.long),
                torch.randn(2, 3),
                torch.zeros(2, dtype=torch.long),
                2,
            ),
            epochs=0,
        )
    with pytest.raises(TypeError, match="needs an EMPSSLEncoder"):
        fold_batchnorm(torch.nn.Linear(2, 2))
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16)
    with pytest.raises(ValueError, match="N > 0"):
        extract_features(encoder, torch.zeros(0, 8, 8, 3, dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="num_patches must be a positive integer"):
        extract_features(encoder, torch.zeros(2, 8, 8, 3, dtype=torch.uint8), 0)


@pytest.mark.gpu
def test_cuda_probe_replaying_its_captured_epoch_equals_the_reference():
    generator = torch.Generator().manual_seed(torch.seed())
    args = [a.cuda() if isinstance(a, torch.Tensor) else a for a in _separable_features(generator)]
    seed = int(torch.randint(1000, (1,), generator=generator))
    weight, bias, top1 = fit_linear_probe(
        LabelledFeatures(*args), epochs=5, seed=seed
    )  # epoch 0 eager, 1..4 graph replays
    eager_weight, eager_bias, eager_top1 = fit_linear_probe(
        LabelledFeatures(*args), epochs=5, seed=seed, cuda_graph=False
    )
    torch.testing.assert_close(weight, eager_weight, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(bias, eager_bias, rtol=1e-6, atol=1e-7)
    reference_weight, reference_bias, reference_top1 = reference_probe.fit_linear_probe(*args, epochs=5, seed=seed)
    torch.testing.assert_close(weight, reference_weight, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bias, reference_bias, rtol=1e-4, atol=1e-5)
    assert (top1 - reference_top1).abs().max() <= 0.005 and (top1 - eager_top1).abs().max() <= 0.005


@pytest.mark.gpu
def test_cuda_bf16_folded_features_match_the_autocast_encoder():
    generator = torch.Generator().manual_seed(torch.seed())
    encoder = _encoder_with_trained_statistics(generator).cuda().to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=generator).cuda()
    folded = extract_features(encoder, images, 8, max_patches_per_forward=64)  # 8 images a chunk
    autocast = extract_features(encoder, images, 8, max_patches_per_forward=64, fold=False)
    assert folded.dtype == torch.float32 and folded.shape == (40, 32)
    # both in bf16 (8 significant bits): equal to a few bf16 roundings, relative to the features' size
    assert (folded - autocast).norm() <= 0.05 * autocast.norm()
    float32 = extract_features(encoder, images, 8, max_patches_per_forward=64, bf16=False)
    assert (folded - float32).norm() <= 0.05 * float32.norm()


def test_fused_conv_epilogues_compute_the_folded_features_with_one_call_per_conv_and_epilogue():
    """Every conv -> ReLU and conv -> add -> ReLU of the folded ResNet-18 (the stem and the 8 blocks' two
    convolutions: 17) is one fused call; the downsampling convolutions, whose output feeds an add that is not
    theirs alone, stay plain. Off CUDA the fused calls are the same ops: the features are bitwise the folded ones,
    input checks included."""
    generator = torch.Generator().manual_seed(torch.seed())
    folded = fold_batchnorm(_encoder_with_trained_statistics(generator))
    fused = fuse_conv_epilogues(folded)
    assert fused.fused == 17
    calls = [node.target.__name__ for node in fused.graph_module.graph.nodes if node.op == "call_function"]
    assert calls.count("conv_bias_relu") == 9 and calls.count("conv_bias_add_relu") == 8
    modules = dict(fused.graph_module.named_modules())
    plain = [n.target for n in fused.graph_module.graph.nodes if n.op == "call_module"]
    assert [t for t in plain if isinstance(modules[t], torch.nn.Conv2d)] == [
        f"network.backbone.layer{i}.0.downsample.0" for i in (2, 3, 4)
    ]
    x = torch.randn(6, 3, 16, 16, generator=generator)
    with torch.no_grad():
        assert torch.equal(fused.features(x), folded.features(x))
    with pytest.raises(ValueError, match=r"shape \(N, 3, H, W\)"):
        fused.features(x[0])
    images = torch.randint(0, 256, (5, 16, 16, 3), dtype=torch.uint8, generator=generator)
    encoder = _encoder_with_trained_statistics(generator)
    assert torch.equal(
        extract_features(encoder, images, 4, fused_conv=True), extract_features(encoder, images, 4, fused_conv=False)
    )
    with pytest.raises(ValueError, match="needs fold=True"):
        extract_features(encoder, images, 4, fold=False, fused_conv=True)


def test_a_conv_whose_output_is_used_twice_is_not_fused():
    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def features(self, x):
            y = self.conv(x)
            return torch.relu(y) + y

    module = Twice()
    fused = fuse_conv_epilogues(module)
    x = torch.randn(2, 3, 8, 8)
    assert fused.fused == 0 and torch.equal(fused.features(x), module.features(x))


def test_a_network_torch_fx_cannot_trace_runs_unfused_with_a_note(capsys):
    class DataDependent(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def features(self, x):
            return torch.relu(self.conv(x)) if x.sum() > 0 else x  # a branch on the values: no graph

    module = DataDependent()
    fused = fuse_conv_epilogues(module)
    x = torch.rand(2, 3, 8, 8)
    assert fused.fused == 0 and torch.equal(fused.features(x), module.features(x))
    assert "--fused-conv: torch.fx cannot trace the DataDependent" in capsys.readouterr().err


@pytest.mark.gpu
def test_cuda_fused_conv_features_hold_the_2x_rule_against_float64():
    """cuDNN's fused conv + bias + ReLU (+ add) is as close to the float64 features as the plain folded path, in
    bf16 and in float32 (TF32 off): at most twice its error (docs/design.md section 8)."""
    torch.backends.cudnn.allow_tf32 = False  # conftest restores it after the test
    generator = torch.Generator().manual_seed(torch.seed())
    encoder = _encoder_with_trained_statistics(generator).cuda().to(memory_format=torch.channels_last)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=generator).cuda()
    features = functools.partial(extract_features, images=images, num_patches=8, max_patches_per_forward=64)
    truth = features(copy.deepcopy(encoder).double(), bf16=False)
    for bf16 in (True, False):
        plain, fused = (features(encoder, bf16=bf16, fused_conv=fused_conv) for fused_conv in (False, True))
        assert torch.isfinite(fused).all() and (plain - truth).norm() > 0
        assert (fused - truth).norm() <= 2 * (plain - truth).norm(), bf16
