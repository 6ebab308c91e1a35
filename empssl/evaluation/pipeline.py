"""``evaluate``: the bag-of-features evaluation of an encoder on a data set (docs/method.md section 6): the
features of both splits (``empssl.evaluation.features``: bags of patches, whole images, or both views), then the
linear probe and the weighted kNN on them (``empssl.evaluation.probe``)."""

from __future__ import annotations

import time
import warnings
from typing import Dict, Optional

import torch

from ..augment.config import AugmentConfig, augment_config_for
from ..augment.multipatch import MultiPatchAugment
from ..config import EVAL_VIEWS, EvalConfig
from ..data.dataset import DataError, ImageDataset
from ..device import check_fits
from .features import (
    MAX_PATCHES_PER_FORWARD,
    SPLIT_KEYS,
    extract_features,
    extract_whole_image_features,
    forward_bytes_per_patch,
)
from .probe import LabelledFeatures, knn_classify, linear_probe, probe_memory


def evaluate(
    encoder: torch.nn.Module,
    data: ImageDataset,
    config: Optional[EvalConfig] = None,
    augment_config: Optional[AugmentConfig] = None,
    patch_size: Optional[int] = None,
) -> Dict[str, float]:
    """Bag-of-features evaluation of ``encoder`` on ``data`` with the settings of ``config`` (default: the
    recipe's, ``EvalConfig()``); accuracies are fractions in [0, 1]. Runs on the encoder's device (``empssl eval``
    puts it on ``config.device``); ``augment_config``: the recipe of the patches (default: the one for
    ``patch_size``, whose default is the data set's recipe's, ``data.recipe_patch_size``). A split may be held in
    memory or in its on-disk store. Unlabelled data is refused: the probe and the kNN need labels.

    Keys: linear_top1 (the result), linear_best_epoch_top1 and linear_best_epoch (reference only),
    knn_top1, knn_top5, plus num_patches, num_train, num_test, feature_dim and timings. ``config.views``: "patches"
    (the method's bag of patches: the keys above), "whole" (each whole image resized to the recipe's patch size: the
    same keys prefixed ``whole_``) or "both".
    """
    start = time.perf_counter()
    config = config or EvalConfig()
    config.validate()
    if config.views not in EVAL_VIEWS:
        raise ValueError(f"views must be one of {EVAL_VIEWS}, got {config.views!r}")
    device = next(encoder.parameters()).device
    if not data.labelled:
        raise DataError(
            f"{data.name} has no labels ({data.layout or 'unlabelled images'}): evaluation trains a linear probe and "
            f"a kNN on labelled features; evaluate on a labelled data set (--dataset folder:PATH with class "
            f"folders, tinyimagenet:PATH, imagenet100:PATH, cifar10, ...)"
        )
    data = data.to(device)
    check_test_classes(data)
    patch_size = patch_size or data.recipe_patch_size
    check_evaluation_fits(encoder, data, config, device, patch_size)
    recipe = augment_config or augment_config_for(patch_size)
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
                    encoder,
                    images,
                    recipe,
                    bf16=config.bf16,
                    progress=config.progress,
                    description=description,
                    image_sizes=getattr(data, f"{split}_sizes"),
                    device=device,
                    fused_conv=config.fused_conv,
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
                    image_sizes=getattr(data, f"{split}_sizes"),
                    device=device,
                    fused_conv=config.fused_conv,
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


def check_test_classes(data: ImageDataset) -> None:
    """A warning when test images are of classes the training split lacks (the probe and the kNN cannot predict
    them: each counts as an error); DataError when no test image is of a training class (every prediction would be
    wrong, the accuracy 0 by construction)."""
    train_classes = set(data.train_labels.unique().tolist())
    test_labels = data.test_labels.unique().tolist()
    unknown = [label for label in test_labels if label not in train_classes]
    if not unknown:
        return

    def named(labels):
        names = [data.classes[label] if label < len(data.classes) else str(label) for label in labels[:5]]
        return ", ".join(names) + (f" and {len(labels) - 5} more" if len(labels) > 5 else "")

    if len(unknown) == len(test_labels):
        raise DataError(
            f"{data.name}: no test image is of a class of the training split (the test split's classes "
            f"{named(unknown)} are not among the training split's {named(sorted(train_classes))}): every prediction "
            f"would be wrong; evaluate on a test split of the training split's classes"
        )
    missing = int(torch.isin(data.test_labels, torch.tensor(unknown, device=data.test_labels.device)).sum())
    warnings.warn(
        f"{data.name}: {missing} of the {len(data.test_labels)} test images are of classes the training split lacks "
        f"({named(unknown)}): no classifier trained on it can predict them, so they count as errors (the accuracy is "
        f"at most {1 - missing / len(data.test_labels):.3f})"
    )


def check_evaluation_fits(
    encoder: torch.nn.Module, data: ImageDataset, config: EvalConfig, device, patch_size: int
) -> None:
    """ValueError, before any work, if the features' forward, the linear probe or the kNN cannot fit in the memory
    left on ``device`` (an absurd --num-patches, or labels that make millions of classes)."""
    num_train, num_test = int(data.train_labels.shape[0]), int(data.test_labels.shape[0])
    dim = getattr(encoder, "hidden_dim", None)
    if isinstance(dim, int):
        used = int(data.train_labels.unique().numel())
        advice = (
            f"labels are class indices, so {data.num_classes} classes exist for {used} used: number the classes 0 to "
            f"{used - 1}"
            if data.num_classes > 2 * used
            else "lower --linear-epochs, or evaluate fewer images (--train-size, --test-size)"
        )
        need = probe_memory(
            num_train, num_test, dim, data.num_classes, config.linear_epochs, config.linear_batch_size
        ) + 4 * dim * (num_train + num_test)
        check_fits(
            need,
            device,
            f"the linear probe and kNN over {data.num_classes} classes of {dim}-d features of {num_train} + "
            f"{num_test} images",
            advice,
        )
    # a forward holds one image's patches at least (more fill the tuned chunk of MAX_PATCHES_PER_FORWARD)
    per_patch = None
    if config.num_patches > MAX_PATCHES_PER_FORWARD.get(device.type, 8192):
        per_patch = forward_bytes_per_patch(encoder, patch_size)
    if per_patch is not None:
        patches = config.num_patches
        check_fits(
            patches * per_patch,
            device,
            f"the features' forward of {config.num_patches} patches per image",
            "lower --num-patches",
        )
