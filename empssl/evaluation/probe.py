"""Classifiers on fixed features (docs/method.md section 6): a linear probe (SGD lr 0.03, momentum 0.9, weight decay
5e-5, batch 100, 100 epochs, cosine schedule; the final test accuracy is the result, the best epoch's is reported as
such) and a weighted kNN (cosine similarity, k = 20, temperature 0.07, top-1 and top-5).

The probe's gradient is in closed form and an epoch is a fixed sequence of tensor ops over device-resident
features, captured once as a CUDA graph and replayed for every later epoch on CUDA.
"""

from __future__ import annotations

import math
from typing import Dict, NamedTuple, Tuple

import torch
import torch.nn.functional as F

from ..config import EvalConfig
from ..device import CudaGraphCall

DEFAULTS = EvalConfig()  # the recipe's settings: the defaults below are read from here
PROBE_OPTIONS = ("lr", "momentum", "weight_decay")  # the options that decide whether the probe diverges
KNN_CHUNK_BYTES = 2**28  # a kNN chunk's similarities and votes (float32) stay under this


class LabelledFeatures(NamedTuple):
    """The features of both splits with their labels (int64 class indices in [0, num_classes)): what the linear
    probe and the kNN take. A tuple, so ``*features`` gives the reference probe's five arguments."""

    train_features: torch.Tensor
    train_labels: torch.Tensor
    test_features: torch.Tensor
    test_labels: torch.Tensor
    num_classes: int


class ProbeDivergedError(ValueError):
    """The linear probe's weights became NaN or infinite: it has no accuracy to report."""


def _probe_epoch(
    theta, momentum_buffer, train_inputs, train_labels, minus_ones, order, neg_lr, batch_size, momentum, weight_decay
) -> None:
    """One epoch of mini-batch SGD (momentum, weight decay) on mean cross-entropy, in place on ``theta``.

    ``theta`` (C, D + 1) is [weight | bias] and ``train_inputs`` (N, D + 1) the features with a ones
    column, so the logits and both gradients are one matmul each; weight decay applies to the bias
    as torch.optim.SGD applies it to every parameter. The gradient of the mean cross-entropy is
    (softmax - onehot)^T x / b; the one-hot is subtracted in place (a -1 at each label: the same floats), so no
    (N, C) one-hot matrix exists, whatever the number of classes C. A fixed sequence of ops on tensors that exist
    before the call: a CUDA graph captures it and replays it with a new ``order`` and ``neg_lr`` (0-d, minus the lr).
    """
    num_train = train_inputs.shape[0]
    for start in range(0, num_train, batch_size):
        index = order[start : start + batch_size]
        inputs = train_inputs.index_select(0, index)
        residual = torch.softmax(inputs @ theta.T, 1)
        residual.scatter_add_(1, train_labels.index_select(0, index)[:, None], minus_ones[: index.shape[0]])
        gradient = torch.addmm(theta, residual.T, inputs, beta=weight_decay, alpha=1.0 / index.shape[0])
        torch.add(gradient, momentum_buffer, alpha=momentum, out=momentum_buffer)  # buf = grad + m buf
        theta.addcmul_(momentum_buffer, neg_lr)


def fit_linear_probe(
    features: LabelledFeatures,
    epochs: int = DEFAULTS.linear_epochs,
    lr: float = DEFAULTS.linear_lr,
    momentum: float = DEFAULTS.linear_momentum,
    weight_decay: float = DEFAULTS.linear_weight_decay,
    batch_size: int = DEFAULTS.linear_batch_size,
    seed: int = DEFAULTS.seed,
    cuda_graph: bool = True,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,), test top-1 after every epoch (epochs,)) of a linear probe.

    The algorithm of ``empssl.reference.probe.fit_linear_probe`` (nn.Linear initialisation under
    ``torch.manual_seed(seed)``, SGD with momentum and weight decay, CosineAnnealingLR over the
    epochs, the same per-epoch ``randperm`` orders, all drawn up front) with the gradient in closed
    form and no autograd or optimiser objects. On CUDA (``cuda_graph``) epoch 0 runs eagerly (it
    creates the cuBLAS state), the epoch is captured once as a CUDA graph and replayed for every
    later epoch: no Python per mini-batch and no host synchronisation until the accuracies are read.
    """
    train_features, train_labels, test_features, test_labels, num_classes = features
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    device = train_features.device
    num_train, dim = train_features.shape
    generator = torch.Generator(device=device).manual_seed(seed)
    orders = torch.stack([torch.randperm(num_train, device=device, generator=generator) for _ in range(epochs)])
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        init = torch.nn.Linear(dim, num_classes).to(device)
    theta = torch.cat((init.weight.detach(), init.bias.detach()[:, None]), 1)
    momentum_buffer = torch.zeros_like(theta)  # SGD's first step sets buf = grad: the same as 0 * m + grad

    def with_ones(features):
        return torch.cat((features.float(), torch.ones(features.shape[0], 1, device=device)), 1)

    train_inputs, test_inputs = with_ones(train_features), with_ones(test_features)
    minus_ones = torch.full((min(batch_size, num_train), 1), -1.0, device=device)
    # CosineAnnealingLR(T_max=epochs): epoch e trains at lr (1 + cos(pi e / epochs)) / 2; one copy, up front
    neg_lrs = torch.tensor([-lr * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)], device=device)
    test_top1 = torch.zeros(epochs, device=device)

    def epoch_with(order, neg_lr):
        _probe_epoch(
            theta,
            momentum_buffer,
            train_inputs,
            train_labels,
            minus_ones,
            order,
            neg_lr,
            batch_size,
            momentum,
            weight_decay,
        )

    # epoch 0 eagerly (it creates the cuBLAS state), then one capture replayed with each epoch's order and lr
    run_epoch = CudaGraphCall(epoch_with, device, warmup=1) if device.type == "cuda" and cuda_graph else epoch_with
    for epoch in range(epochs):
        run_epoch(orders[epoch], neg_lrs[epoch])
        test_top1[epoch] = ((test_inputs @ theta.T).argmax(1) == test_labels).float().mean()
    return theta[:, :dim].clone(), theta[:, dim].clone(), test_top1


def linear_probe(
    features: LabelledFeatures,
    **probe_options,
) -> Dict[str, float]:
    """Train Linear(feature_dim, num_classes) on fixed features (``fit_linear_probe``, which takes
    ``probe_options``: epochs, lr, momentum, weight_decay, batch_size, seed); test top-1 after every epoch.

    Returns ``final_top1`` (the result: accuracy after the last epoch), ``best_epoch_top1`` and
    ``best_epoch`` (1-based; the maximum over epochs, which peeks at the test set: for reference only).
    ProbeDivergedError if the weights became NaN or infinite (an accuracy of such weights means nothing).
    """
    weight, bias, test_top1 = fit_linear_probe(features, **probe_options)
    finite = (torch.isfinite(weight).all() & torch.isfinite(bias).all()).float()[None]
    *accuracies, weights_finite = torch.cat((test_top1, finite)).tolist()  # the one host read
    if not weights_finite:
        options = {name: probe_options.get(name, getattr(DEFAULTS, f"linear_{name}")) for name in PROBE_OPTIONS}
        raise ProbeDivergedError(
            "the linear probe diverged: its weights became NaN or infinite (at "
            + ", ".join(f"--linear-{name.replace('_', '-')} {value:g}" for name, value in options.items())
            + f"), so it has no accuracy to report; lower --linear-lr (the recipe's is {DEFAULTS.linear_lr:g})"
        )
    best = max(range(len(accuracies)), key=accuracies.__getitem__)
    return {"final_top1": accuracies[-1], "best_epoch_top1": accuracies[best], "best_epoch": best + 1}


def probe_memory(num_train: int, num_test: int, dim: int, num_classes: int, epochs: int, batch_size: int) -> int:
    """Bytes the linear probe and the kNN allocate for these sizes (``fit_linear_probe``, ``knn_classify``)."""
    width = dim + 1
    floats = (
        4 * num_classes * width  # theta, its momentum buffer, the gradient, the initial nn.Linear
        + 2 * (num_train + num_test) * width  # the features with a ones column; the kNN's normalised copies
        + 2 * min(batch_size, num_train) * num_classes  # a mini-batch's logits and residual
        + num_test * num_classes  # the test logits after each epoch
    )
    return 4 * floats + 8 * epochs * num_train + KNN_CHUNK_BYTES  # every epoch's order, drawn up front


@torch.no_grad()
def knn_classify(
    features: LabelledFeatures,
    k: int = DEFAULTS.knn_k,
    temperature: float = DEFAULTS.knn_temperature,
    chunk_size: int = 1024,
) -> Dict[str, float]:
    """Weighted kNN on cosine similarity: each of the k nearest train features votes for its class
    with weight exp(similarity / temperature); returns top-1 and top-5 accuracy (top-5 over
    min(5, num_classes) classes)."""
    train_features, train_labels, test_features, test_labels, num_classes = features
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    top = min(5, num_classes)
    chunk_size = max(1, min(chunk_size, KNN_CHUNK_BYTES // (4 * (train.shape[0] + num_classes))))
    correct = torch.zeros(2, device=train.device)
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start : start + chunk_size] @ train.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(similarity.shape[0], num_classes, device=train.device)
        # each row's weights divided by its largest, exp(max / temperature): the same ranking, and no overflow to
        # inf for any temperature (topk sorts, so column 0 holds the largest similarity)
        weights = torch.exp((top_similarity - top_similarity[:, :1]) / temperature)
        votes.scatter_add_(1, train_labels[top_index], weights)
        predictions = votes.topk(top, dim=1).indices
        hits = predictions == test_labels[start : start + chunk_size, None]
        correct += torch.stack((hits[:, 0].sum(), hits.any(1).sum())).float()
    top1, top5 = (correct / test.shape[0]).tolist()
    return {"top1": top1, "top5": top5}
