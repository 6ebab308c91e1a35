"""``evaluate``: the bag-of-features evaluation of an encoder on a data set (docs/method.md section 6): the
features of both splits (``empssl.evaluation.features``), then the linear probe and the weighted kNN on them
(``empssl.evaluation.probe``)."""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from ..augment.config import AugmentConfig, augment_config_for
from ..augment.multipatch import MultiPatchAugment
from ..config import EvalConfig
from ..data.dataset import ImageDataset
from .features import SPLIT_KEYS, extract_features
from .probe import LabelledFeatures, knn_classify, linear_probe


def evaluate(
    encoder: torch.nn.Module,
    data: ImageDataset,
    config: Optional[EvalConfig] = None,
    augment_config: Optional[AugmentConfig] = None,
) -> Dict[str, float]:
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
    augment = MultiPatchAugment(
        recipe,
        backend=config.augment_backend,
        out_dtype=torch.bfloat16 if use_amp else torch.float32,
        channels_last=device.type == "cuda",
    )
    features = {
        split: extract_features(
            encoder,
            getattr(data, f"{split}_images"),
            config.num_patches,
            augment,
            bf16=config.bf16,
            progress=config.progress,
            description=f"{split} features",
            seed=config.seed,
            split_key=key,
            fused_conv=config.fused_conv,
        )
        for split, key in SPLIT_KEYS.items()
    }
    for split, value in features.items():
        if not torch.isfinite(value).all():  # also the wait for the features: feature_seconds is their time
            raise ValueError(f"the encoder produced non-finite {split} features; the checkpoint is probably diverged")
    feature_seconds = time.perf_counter() - start
    labelled = LabelledFeatures(
        features["train"], data.train_labels, features["test"], data.test_labels, data.num_classes
    )
    probe = linear_probe(
        labelled,
        epochs=config.linear_epochs,
        lr=config.linear_lr,
        momentum=config.linear_momentum,
        weight_decay=config.linear_weight_decay,
        batch_size=config.linear_batch_size,
        seed=config.seed,
    )
    probe_seconds = time.perf_counter() - start - feature_seconds
    knn = knn_classify(labelled, k=config.knn_k, temperature=config.knn_temperature)
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
