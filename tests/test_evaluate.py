"""Bag-of-features evaluation: feature averaging, linear probe, weighted kNN."""
import pytest
import torch
import torch.nn.functional as F

from empssl import evaluate as E
from empssl.data import make_synthetic
from empssl.models import build_encoder


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
    probe = E.linear_probe(train_x, train_y, test_x, test_y, 5, epochs=20)
    assert probe["final_top1"] == 1.0 and probe["best_epoch_top1"] == 1.0
    knn = E.knn_classify(train_x, train_y, test_x, test_y, 5)
    assert knn["top1"] == 1.0 and knn["top5"] == 1.0


def test_random_labels_give_chance_accuracy():
    generator = torch.Generator().manual_seed(torch.seed())
    train_x, test_x = torch.randn(800, 64, generator=generator), torch.randn(800, 64, generator=generator)
    train_y, test_y = torch.randint(4, (800,), generator=generator), torch.randint(4, (800,), generator=generator)
    probe = E.linear_probe(train_x, train_y, test_x, test_y, 4, epochs=10)
    knn = E.knn_classify(train_x, train_y, test_x, test_y, 4)
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
    result = E.knn_classify(train_x, train_y, test_x, test_y, num_classes, k=k, temperature=temperature, chunk_size=7)
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

    def __call__(self, images, num_patches, generator=None):
        base = images.permute(0, 3, 1, 2).float() / 255
        return torch.cat([base * (i + 1) for i in range(num_patches)])


def test_features_are_the_mean_over_patches_in_eval_mode():
    torch.manual_seed(0)
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16)
    encoder.train()
    images = torch.randint(0, 256, (6, 8, 8, 3), dtype=torch.uint8)
    features = E.extract_features(encoder, images, num_patches=3, augment=_ScaledCopies(), max_patches_per_forward=6)
    assert encoder.training  # mode restored
    encoder.eval()
    with torch.no_grad():
        for j in range(6):
            base = images[j:j + 1].permute(0, 3, 1, 2).float() / 255
            expected = torch.stack([encoder.features(base * (i + 1))[0] for i in range(3)]).mean(0)
            torch.testing.assert_close(features[j], expected, rtol=1e-5, atol=1e-5)


def test_evaluate_end_to_end_on_tiny_synthetic():
    torch.manual_seed(0)
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16)
    data = make_synthetic(100, 40, 8, seed=0)
    result = E.evaluate(encoder, data, num_patches=2, linear_epochs=3)
    for key in ("linear_top1", "linear_best_epoch_top1", "knn_top1", "knn_top5"):
        assert 0.0 <= result[key] <= 1.0, key
    assert result["linear_best_epoch_top1"] >= result["linear_top1"] and result["knn_top5"] >= result["knn_top1"]
    assert result["feature_dim"] == 32 and result["num_train"] == 100 and result["num_test"] == 40
    again = E.evaluate(encoder, data, num_patches=2, linear_epochs=3)
    assert again["linear_top1"] == result["linear_top1"] and again["knn_top1"] == result["knn_top1"]  # seeded
