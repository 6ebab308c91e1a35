"""Evaluation by bag of features (docs/method.md section 6).

Each image is represented by the mean of the ``pre_feature`` outputs (4096-d in the paper's
encoder) of T augmented patches (T = 128 by default; the training augmentation), with the
encoder in eval mode. On these features: a linear probe (SGD lr 0.03, momentum 0.9, weight
decay 5e-5, batch 100, 100 epochs, cosine schedule; the final test accuracy is the result,
the best epoch's is reported as such) and a weighted kNN (cosine similarity, k = 20,
temperature 0.07, top-1 and top-5).

Built to run at device speed: features come from a copy of the encoder with every BatchNorm
folded into the convolution or linear layer before it (``empssl.models.fold_batchnorm``) (bf16 channels_last on CUDA), in chunks of
one fixed size (the last one padded), from patches of the counter-based augmentation keyed by
(seed, split, image index) -- so an image's patches do not depend on how the images are chunked
or split across processes. Under ``torch.distributed`` (world size > 1) each rank extracts the
features of its slice of the images and all ranks gather them; every rank then runs the probe
and the kNN on the same features, so every rank returns the same results. The probe's gradient
is in closed form and an epoch is a fixed sequence of tensor ops over device-resident features,
captured once as a CUDA graph and replayed for every later epoch on CUDA.
"""
from __future__ import annotations

import math
import time
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from . import distributed
from .augment import MultiPatchAugment
from .augment_config import AugmentConfig, augment_config_for
from .config import EvalConfig
from .data import ImageDataset
from .models import fold_batchnorm
from .runtime import CudaGraphCall, cudnn_benchmark

# patches per encoder forward: large on a GPU; on a CPU smaller chunks stay in cache (1371 vs 972
# patches/s for 512 vs 8192 16x16 patches, width 0.25, 2-core CPU)
MAX_PATCHES_PER_FORWARD = {"cuda": 8192, "cpu": 1024}
DEFAULTS = EvalConfig()  # the recipe's settings: every default below is read from here
# the counter-based augmentation's ``step`` key of each split: train and test image k get different patches
SPLIT_KEYS = {"train": 0, "test": 1}


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    num_patches: int = DEFAULTS.num_patches,
    augment: Optional[MultiPatchAugment] = None,
    generator: Optional[torch.Generator] = None,
    bf16: bool = True,
    max_patches_per_forward: Optional[int] = None,
    progress: bool = False,
    description: str = "features",
    *,
    seed: int = DEFAULTS.seed,
    split_key: int = 0,
    fold: bool = True,
) -> torch.Tensor:
    """(N, feature_dim) float32: per image, the mean ``encoder.features`` of ``num_patches`` augmented patches.

    ``images``: uint8 (N, H, W, 3) on the encoder's device. Patch i of image k is drawn from the
    counter-based source keyed by (``seed``, ``split_key``, k, i), or from ``generator`` when one is
    given (then the patches depend on the chunking, and a process group is refused). ``fold``: run a
    BatchNorm-folded copy of the encoder (``fold_batchnorm``; on CUDA in bf16 when ``bf16``, with the
    patches' memory format); otherwise the encoder itself in eval mode (its mode is restored after).
    Chunks hold ``max_patches_per_forward // num_patches`` images (default: ``MAX_PATCHES_PER_FORWARD``
    of the device type; at most a rank's share of the images); the last is padded to that size, so
    every forward has the same shape.
    Under ``torch.distributed`` (world size > 1) each rank extracts its slice and the result is
    gathered: every rank returns the features of all N images.
    """
    if not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive integer, got {num_patches!r}")
    if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[0] == 0:
        raise ValueError(f"images must be uint8 (N, H, W, 3) with N > 0, got {images.dtype} {tuple(images.shape)}")
    device = images.device
    rank, world = distributed.rank(), distributed.world_size()
    if generator is not None and world > 1:
        raise ValueError("a generator's patches depend on how the images are split across ranks: "
                         "under torch.distributed use the counter-based source (seed, no generator)")
    on_gpu_bf16 = bf16 and device.type == "cuda"
    augment = augment or MultiPatchAugment(augment_config_for(int(images.shape[1])),
                                           out_dtype=torch.bfloat16 if on_gpu_bf16 else torch.float32,
                                           channels_last=device.type == "cuda")
    if max_patches_per_forward is None:
        max_patches_per_forward = MAX_PATCHES_PER_FORWARD.get(device.type, 8192)
    num_images = images.shape[0]
    # never more than a rank's share of the images: a small set is not padded to a large chunk
    images_per_chunk = max(1, min(max_patches_per_forward // num_patches, math.ceil(num_images / world)))
    # this rank's images: a whole number of chunks; ids past the end repeat the last image and are dropped
    per_rank = math.ceil(math.ceil(num_images / world) / images_per_chunk) * images_per_chunk
    if fold:
        network = fold_batchnorm(encoder)
        if device.type == "cuda":
            network = network.to(memory_format=torch.channels_last)
            if on_gpu_bf16:
                network = network.to(torch.bfloat16)
    else:
        network = encoder
    was_training = encoder.training
    network.eval()
    local = None
    from tqdm import tqdm

    try:
        with cudnn_benchmark(device.type == "cuda"):  # one chunk shape: cuDNN's search runs once
            for start in tqdm(range(rank * per_rank, (rank + 1) * per_rank, images_per_chunk), desc=description,
                              unit="chunk", disable=not progress, leave=False):
                image_ids = torch.arange(start, start + images_per_chunk, device=device).clamp_(max=num_images - 1)
                batch = images.index_select(0, image_ids)
                if generator is not None:
                    patches = augment(batch, num_patches, generator=generator)
                else:
                    patches = augment(batch, num_patches, seed=seed, step=split_key, image_ids=image_ids)
                if not fold and on_gpu_bf16:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        features = network.features(patches)
                else:
                    features = network.features(patches.to(next(network.parameters()).dtype))
                # patch-major: row i * b + j is patch i of image j
                mean = features.reshape(num_patches, images_per_chunk, -1).mean(0, dtype=torch.float32)
                if local is None:
                    local = torch.empty(per_rank, mean.shape[1], device=device)
                local[start - rank * per_rank:start - rank * per_rank + images_per_chunk] = mean
    finally:
        encoder.train(was_training)
    if world > 1:
        import torch.distributed as dist

        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)  # equal-size padded slices, in rank order
        local = torch.cat(gathered)
    return local[:num_images]


def _probe_epoch(theta, momentum_buffer, train_inputs, train_targets, order, neg_lr, batch_size, momentum,
                 weight_decay) -> None:
    """One epoch of mini-batch SGD (momentum, weight decay) on mean cross-entropy, in place on ``theta``.

    ``theta`` (C, D + 1) is [weight | bias] and ``train_inputs`` (N, D + 1) the features with a ones
    column, so the logits and both gradients are one matmul each; weight decay applies to the bias
    as torch.optim.SGD applies it to every parameter. The gradient of the mean cross-entropy is
    (softmax - onehot)^T x / b. A fixed sequence of ops on tensors that exist before the call: a
    CUDA graph captures it and replays it with a new ``order`` and ``neg_lr`` (0-d, minus the lr).
    """
    num_train = train_inputs.shape[0]
    for start in range(0, num_train, batch_size):
        index = order[start:start + batch_size]
        inputs = train_inputs.index_select(0, index)
        residual = torch.softmax(inputs @ theta.T, 1).sub_(train_targets.index_select(0, index))
        gradient = torch.addmm(theta, residual.T, inputs, beta=weight_decay, alpha=1.0 / index.shape[0])
        torch.add(gradient, momentum_buffer, alpha=momentum, out=momentum_buffer)  # buf = grad + m buf
        theta.addcmul_(momentum_buffer, neg_lr)


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
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
    train_targets = F.one_hot(train_labels, num_classes).float()
    # CosineAnnealingLR(T_max=epochs): epoch e trains at lr (1 + cos(pi e / epochs)) / 2; one copy, up front
    neg_lrs = torch.tensor([-lr * (1 + math.cos(math.pi * e / epochs)) / 2 for e in range(epochs)], device=device)
    test_top1 = torch.zeros(epochs, device=device)

    def epoch_with(order, neg_lr):
        _probe_epoch(theta, momentum_buffer, train_inputs, train_targets, order, neg_lr, batch_size, momentum,
                     weight_decay)

    # epoch 0 eagerly (it creates the cuBLAS state), then one capture replayed with each epoch's order and lr
    run_epoch = CudaGraphCall(epoch_with, device, warmup=1) if device.type == "cuda" and cuda_graph else epoch_with
    for epoch in range(epochs):
        run_epoch(orders[epoch], neg_lrs[epoch])
        test_top1[epoch] = ((test_inputs @ theta.T).argmax(1) == test_labels).float().mean()
    return theta[:, :dim].clone(), theta[:, dim].clone(), test_top1


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    **probe_options,
) -> Dict[str, float]:
    """Train Linear(feature_dim, num_classes) on fixed features (``fit_linear_probe``, which takes
    ``probe_options``: epochs, lr, momentum, weight_decay, batch_size, seed); test top-1 after every epoch.

    Returns ``final_top1`` (the result: accuracy after the last epoch), ``best_epoch_top1`` and
    ``best_epoch`` (1-based; the maximum over epochs, which peeks at the test set: for reference only).
    """
    _, _, test_top1 = fit_linear_probe(train_features, train_labels, test_features, test_labels, num_classes,
                                       **probe_options)
    accuracies = test_top1.tolist()  # the one host read
    best = max(range(len(accuracies)), key=accuracies.__getitem__)
    return {"final_top1": accuracies[-1], "best_epoch_top1": accuracies[best], "best_epoch": best + 1}


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = DEFAULTS.knn_k,
    temperature: float = DEFAULTS.knn_temperature,
    chunk_size: int = 1024,
) -> Dict[str, float]:
    """Weighted kNN on cosine similarity: each of the k nearest train features votes for its class
    with weight exp(similarity / temperature); returns top-1 and top-5 accuracy (top-5 over
    min(5, num_classes) classes)."""
    if k < 1 or temperature <= 0:
        raise ValueError(f"k must be >= 1 and temperature > 0, got k={k}, temperature={temperature}")
    k = min(k, train_features.shape[0])
    train = F.normalize(train_features.float(), dim=1)
    test = F.normalize(test_features.float(), dim=1)
    top = min(5, num_classes)
    correct = torch.zeros(2, device=train.device)
    for start in range(0, test.shape[0], chunk_size):
        similarity = test[start:start + chunk_size] @ train.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        votes = torch.zeros(similarity.shape[0], num_classes, device=train.device)
        votes.scatter_add_(1, train_labels[top_index], torch.exp(top_similarity / temperature))
        predictions = votes.topk(top, dim=1).indices
        hits = predictions == test_labels[start:start + chunk_size, None]
        correct += torch.stack((hits[:, 0].sum(), hits.any(1).sum())).float()
    top1, top5 = (correct / test.shape[0]).tolist()
    return {"top1": top1, "top5": top5}


def evaluate(encoder: torch.nn.Module, data: ImageDataset, config: Optional[EvalConfig] = None,
             augment_config: Optional[AugmentConfig] = None) -> Dict[str, float]:
    """Bag-of-features evaluation of ``encoder`` on ``data`` with the settings of ``config`` (default: the
    recipe's, ``EvalConfig()``); accuracies are fractions in [0, 1]. Runs on the encoder's device (``empssl eval``
    puts it on ``config.device``); ``augment_config``: the recipe of the patches (default: the one for the images'
    size).

    Keys: linear_top1 (the result), linear_best_epoch_top1 and linear_best_epoch (reference only),
    knn_top1, knn_top5, plus num_patches, num_train, num_test, feature_dim and timings.
    """
    start = time.perf_counter()
    config = config or EvalConfig()
    device = next(encoder.parameters()).device
    data = data.to(device)
    recipe = augment_config or augment_config_for(data.image_size[0])
    use_amp = config.bf16 and device.type == "cuda"
    augment = MultiPatchAugment(recipe, backend=config.augment_backend,
                                out_dtype=torch.bfloat16 if use_amp else torch.float32, channels_last=device.type == "cuda")
    features = {
        split: extract_features(encoder, getattr(data, f"{split}_images"), config.num_patches, augment, bf16=config.bf16,
                                progress=config.progress, description=f"{split} features", seed=config.seed,
                                split_key=key)
        for split, key in SPLIT_KEYS.items()
    }
    for split, value in features.items():
        if not torch.isfinite(value).all():  # also the wait for the features: feature_seconds is their time
            raise ValueError(f"the encoder produced non-finite {split} features; the checkpoint is probably diverged")
    feature_seconds = time.perf_counter() - start
    args = (features["train"], data.train_labels, features["test"], data.test_labels, data.num_classes)
    probe = linear_probe(*args, epochs=config.linear_epochs, lr=config.linear_lr, momentum=config.linear_momentum,
                         weight_decay=config.linear_weight_decay, batch_size=config.linear_batch_size, seed=config.seed)
    probe_seconds = time.perf_counter() - start - feature_seconds
    knn = knn_classify(*args, k=config.knn_k, temperature=config.knn_temperature)
    knn_seconds = time.perf_counter() - start - feature_seconds - probe_seconds
    return {
        "linear_top1": probe["final_top1"],
        "linear_best_epoch_top1": probe["best_epoch_top1"],
        "linear_best_epoch": probe["best_epoch"],
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "num_patches": config.num_patches,
        "num_train": int(data.train_labels.shape[0]),
        "num_test": int(data.test_labels.shape[0]),
        "num_classes": data.num_classes,
        "feature_dim": int(features["train"].shape[1]),
        "feature_seconds": feature_seconds,
        "probe_seconds": probe_seconds,
        "knn_seconds": knn_seconds,
        "total_seconds": time.perf_counter() - start,
    }


# fold_batchnorm lives beside the encoder (empssl.models); here as the extractor's
__all__ = ["evaluate", "extract_features", "fold_batchnorm", "fit_linear_probe", "linear_probe", "knn_classify"]
