"""Evaluation by bag of features (SPEC.md section 6).

Each image is represented by the mean of the ``pre_feature`` outputs (4096-d in the paper's
encoder) of T augmented patches (T = 128 by default; the training augmentation), with the
encoder in eval mode. On these features: a linear probe (SGD lr 0.03, momentum 0.9, weight
decay 5e-5, batch 100, 100 epochs, cosine schedule; the final test accuracy is the result,
the best epoch's is reported as such) and a weighted kNN (cosine similarity, k = 20,
temperature 0.07, top-1 and top-5). Features stay on the device; the probe takes index
slices of full tensors.
"""
from __future__ import annotations

import time
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .augment import AugmentConfig, MultiPatchAugment
from .data import ImageDataset
from .train import augment_config_for, autocast_context

# patches per encoder forward: large on a GPU; on a CPU smaller chunks stay in cache (1371 vs 972
# patches/s for 512 vs 8192 16x16 patches, width 0.25, 2-core CPU)
MAX_PATCHES_PER_FORWARD = {"cuda": 8192, "cpu": 1024}


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    num_patches: int = 128,
    augment: Optional[MultiPatchAugment] = None,
    generator: Optional[torch.Generator] = None,
    bf16: bool = True,
    max_patches_per_forward: Optional[int] = None,
    progress: bool = False,
    description: str = "features",
) -> torch.Tensor:
    """(N, feature_dim) float32: per image, the mean ``encoder.features`` of ``num_patches`` augmented patches.

    ``images``: uint8 (N, H, W, 3) on the encoder's device. The encoder runs in eval mode
    (its previous mode is restored) on chunks of at most ``max_patches_per_forward`` patches
    (default: ``MAX_PATCHES_PER_FORWARD`` of the device type).
    """
    if not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive integer, got {num_patches!r}")
    if images.ndim != 4 or images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 (N, H, W, 3), got {images.dtype} {tuple(images.shape)}")
    device = images.device
    augment = augment or MultiPatchAugment(augment_config_for(int(images.shape[1])))
    if max_patches_per_forward is None:
        max_patches_per_forward = MAX_PATCHES_PER_FORWARD.get(device.type, 8192)
    images_per_chunk = max(1, max_patches_per_forward // num_patches)
    was_training = encoder.training
    encoder.eval()
    chunks = []
    from tqdm import tqdm

    try:
        for start in tqdm(range(0, images.shape[0], images_per_chunk), desc=description, unit="chunk",
                          disable=not progress, leave=False):
            batch = images[start:start + images_per_chunk]
            patches = augment(batch, num_patches, generator=generator)
            with autocast_context(device, bf16):
                features = encoder.features(patches)
            # patch-major: row i * b + j is patch i of image j
            chunks.append(features.float().reshape(num_patches, batch.shape[0], -1).mean(0))
    finally:
        encoder.train(was_training)
    return torch.cat(chunks)


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.03,
    momentum: float = 0.9,
    weight_decay: float = 5e-5,
    batch_size: int = 100,
    seed: int = 0,
) -> Dict[str, float]:
    """Train Linear(feature_dim, num_classes) on fixed features; test top-1 after every epoch.

    Returns ``final_top1`` (the result: accuracy after the last epoch), ``best_epoch_top1`` and
    ``best_epoch`` (1-based; the maximum over epochs, which peeks at the test set: for reference only).
    The learning rate follows a cosine over the epochs (CosineAnnealingLR(T_max=epochs)).
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be positive, got {epochs} and {batch_size}")
    device = train_features.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(train_features.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    num_train = train_features.shape[0]
    test_top1 = torch.zeros(epochs, device=device)  # read once at the end: no host sync per epoch
    for epoch in range(epochs):
        order = torch.randperm(num_train, device=device, generator=generator)
        for start in range(0, num_train, batch_size):
            index = order[start:start + batch_size]
            loss = F.cross_entropy(probe(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            test_top1[epoch] = (probe(test_features).argmax(1) == test_labels).float().mean()
    accuracies = test_top1.tolist()
    best = max(range(epochs), key=lambda e: accuracies[e])
    return {"final_top1": accuracies[-1], "best_epoch_top1": accuracies[best], "best_epoch": best + 1}


@torch.no_grad()
def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
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


def evaluate(
    encoder: torch.nn.Module,
    data: ImageDataset,
    num_patches: int = 128,
    augment_config: Optional[AugmentConfig] = None,
    augment_backend: str = "auto",
    device=None,
    seed: int = 0,
    bf16: bool = True,
    linear_epochs: int = 100,
    linear_lr: float = 0.03,
    linear_batch_size: int = 100,
    knn_k: int = 20,
    knn_temperature: float = 0.07,
    progress: bool = False,
) -> Dict[str, float]:
    """Bag-of-features evaluation of ``encoder`` on ``data``; accuracies are fractions in [0, 1].

    Keys: linear_top1 (the result), linear_best_epoch_top1 and linear_best_epoch (reference only),
    knn_top1, knn_top5, plus num_patches, num_train, num_test, feature_dim and timings.
    """
    start = time.perf_counter()
    device = torch.device(device) if device is not None else next(encoder.parameters()).device
    encoder = encoder.to(device)
    data = data.to(device)
    config = augment_config or augment_config_for(data.image_size[0])
    use_amp = bf16 and device.type == "cuda"
    augment = MultiPatchAugment(config, backend=augment_backend, out_dtype=torch.bfloat16 if use_amp else torch.float32)
    generator = torch.Generator(device=device).manual_seed(seed)
    features = {
        split: extract_features(encoder, getattr(data, f"{split}_images"), num_patches, augment, generator, bf16,
                                progress=progress, description=f"{split} features")
        for split in ("train", "test")
    }
    feature_seconds = time.perf_counter() - start
    for split, value in features.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"the encoder produced non-finite {split} features; the checkpoint is probably diverged")
    args = (features["train"], data.train_labels, features["test"], data.test_labels, data.num_classes)
    probe = linear_probe(*args, epochs=linear_epochs, lr=linear_lr, batch_size=linear_batch_size, seed=seed)
    knn = knn_classify(*args, k=knn_k, temperature=knn_temperature)
    return {
        "linear_top1": probe["final_top1"],
        "linear_best_epoch_top1": probe["best_epoch_top1"],
        "linear_best_epoch": probe["best_epoch"],
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
        "num_patches": num_patches,
        "num_train": int(data.train_labels.shape[0]),
        "num_test": int(data.test_labels.shape[0]),
        "num_classes": data.num_classes,
        "feature_dim": int(features["train"].shape[1]),
        "feature_seconds": feature_seconds,
        "total_seconds": time.perf_counter() - start,
    }


__all__ = ["evaluate", "extract_features", "linear_probe", "knn_classify"]
