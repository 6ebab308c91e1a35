"""``evaluate``: the bag-of-features evaluation of an encoder on a data set (docs/method.md section 6): the
features of both splits (``empssl.evaluation.features``: bags of patches, whole images, or both views), then the
linear probe and the weighted kNN on them (``empssl.evaluation.probe``)."""

from __future__ import annotations

import time
from typing import Dict, Optional

import torch

from ..augment.config import AugmentConfig, augment_config_for
from ..augment.multipatch import MultiPatchAugment
from ..config import EVAL_VIEWS, EvalConfig
from ..data.dataset import ImageDataset
from .features import SPLIT_KEYS, extract_features, extract_whole_image_features
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
    knn_top1, knn_top5, plus num_patches, num_train, num_test, feature_dim and timings. ``config.views``: "patches"
    (the method's bag of patches: the keys above), "whole" (each whole image resized to the recipe's patch size: the
    same keys prefixed ``whole_``) or "both".
    """
    start = time.perf_counter()
    config = config or EvalConfig()
    if config.views not in EVAL_VIEWS:
        raise ValueError(f"views must be one of {EVAL_VIEWS}, got {config.views!r}")
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
    views = ("patches", "whole") if config.views == "both" else (config.views,)
    results: Dict[str, float] = {}
    seconds = {"feature_seconds": 0.0, "probe_seconds": 0.0, "knn_seconds": 0.0}
    for view in views:
        features = {}
        for split, key in SPLIT_KEYS.items():
            clock = time.perf_counter()
            images = getattr(data, f"{split}_images")
            description = f"{split} features" + (" (whole images)" if view == "whole" else "")
            if view == "whole":
                features[split] = extract_whole_image_features(
                    encoder, images, recipe, bf16=config.bf16, progress=config.progress, description=description
                )
            else:
                features[split] = extract_features(
                    encoder,
                    images,
                    config.num_patches,
                    augment,
                    bf16=config.bf16,
                    progress=config.progress,
                    description=description,
                    seed=config.seed,
                    split_key=key,
                )
            if not torch.isfinite(features[split]).all():  # also the wait for the features: their time is theirs
                raise ValueError(
                    f"the encoder produced non-finite {split} features; the checkpoint is probably diverged"
                )
            seconds["feature_seconds"] += time.perf_counter() - clock
        prefix = "whole_" if view == "whole" else ""
        results.update({prefix + key: value for key, value in _classify(features, data, config, seconds).items()})
    return {
        **results,
        "views": config.views,
        "num_patches": config.num_patches,
        "num_train": int(data.train_labels.shape[0]),
        "num_test": int(data.test_labels.shape[0]),
        "num_classes": data.num_classes,
        "feature_dim": int(features["train"].shape[1]),
        **seconds,
        "total_seconds": time.perf_counter() - start,
    }


def _classify(
    features: Dict[str, torch.Tensor], data: ImageDataset, config: EvalConfig, seconds: Dict[str, float]
) -> Dict[str, float]:
    """The linear probe and the kNN on one view's features (their times added to ``seconds``)."""
    clock = time.perf_counter()
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
    seconds["probe_seconds"] += time.perf_counter() - clock
    clock = time.perf_counter()
    knn = knn_classify(labelled, k=config.knn_k, temperature=config.knn_temperature)
    seconds["knn_seconds"] += time.perf_counter() - clock
    return {
        "linear_top1": probe["final_top1"],
        "linear_best_epoch_top1": probe["best_epoch_top1"],
        "linear_best_epoch": probe["best_epoch"],
        "knn_top1": knn["top1"],
        "knn_top5": knn["top5"],
    }
