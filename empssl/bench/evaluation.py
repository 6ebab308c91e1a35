"""The evaluation rows of ``empssl bench epoch``: features per second of the BatchNorm-folded extractor (plain, and on
CUDA with each convolution's bias, ReLU and residual add fused into it), the linear probe and the kNN at CIFAR-10
size (GPU; scaled down and extrapolated on a CPU), and the extrapolated 128-patch CIFAR-10 evaluation."""

from __future__ import annotations

from typing import Dict

import torch

from ..config import TrainConfig
from ..evaluation.features import MAX_PATCHES_PER_FORWARD, extract_features
from ..evaluation.probe import LabelledFeatures, knn_classify, linear_probe
from ..models.encoder import build_encoder
from . import common

# the evaluation extrapolated to: CIFAR-10's 50,000 train and 10,000 test images, 128 patches, 100 probe epochs
EVAL_TRAIN, EVAL_TEST, EVAL_PATCHES, EVAL_EPOCHS = 50000, 10000, 128, 100
EVAL_CLASSES = 10


def synthetic_images(device: torch.device, generator: torch.Generator, count: int) -> torch.Tensor:
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, device=device, generator=generator)


def time_evaluation(
    device: torch.device,
    config: TrainConfig,
    size: Dict,
    results: common.Results,
    matmul_peak: float,
    matmul_dtype: torch.dtype,
) -> None:
    """Rows: features/s (plain folded, and fused on CUDA), probe, kNN, and the 128-patch CIFAR-10 evaluation
    extrapolated from the fastest features row, the probe and the kNN. ``matmul_peak``: the dense ``matmul_dtype``
    matmul rate measured by the caller."""
    generator = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    encoder = build_encoder(config.arch, config.width, config.hidden_dim, config.z_dim).to(device)
    num_images, num_patches = size["feature_images"], size["feature_patches"]
    images = synthetic_images(device, generator, num_images)
    case = f"eval {config.arch} w{config.width} d={config.hidden_dim}"
    dtype = "bf16" if device.type == "cuda" else "float32"
    patch_rates = {}
    for fused in (False, True) if device.type == "cuda" else (False,):
        name = "fused conv+bias+ReLU(+add)" if fused else "folded"
        with results.row(case, f"features {name}", dtype):
            seconds = common.time_call(
                lambda fused=fused: extract_features(encoder, images, num_patches, fused_conv=fused),
                device,
                repeats=1,
                warmup=int(device.type == "cuda"),  # cuDNN's algorithm search
            )
            patch_rates[name] = num_images * num_patches / seconds
            results.add(
                case,
                f"features {name} ({num_images} images x {num_patches} patches)",
                seconds,
                num_images / seconds,
                "images/s",
                dtype,
                note=f"{patch_rates[name]:.4g} patch forwards/s; BatchNorm folded; chunks of "
                f"{MAX_PATCHES_PER_FORWARD.get(device.type, 8192)} patches"
                + ("; each conv's bias, ReLU and residual add in its cuDNN kernel (--fused-conv on)" if fused else ""),
            )
    num_train, num_test, epochs = size["probe"]
    train_x = torch.randn(num_train, config.hidden_dim, device=device, generator=generator).relu_()
    train_y = torch.randint(EVAL_CLASSES, (num_train,), device=device, generator=generator)
    test_x = torch.randn(num_test, config.hidden_dim, device=device, generator=generator).relu_()
    test_y = torch.randint(EVAL_CLASSES, (num_test,), device=device, generator=generator)
    labelled = LabelledFeatures(train_x, train_y, test_x, test_y, EVAL_CLASSES)
    probe_seconds = common.time_call(lambda: linear_probe(labelled, epochs=epochs), device, repeats=1, warmup=0)
    # an epoch's time grows with the train set (its mini-batches) and the test set (its top-1)
    probe_full = probe_seconds * (EVAL_EPOCHS / epochs) * (EVAL_TRAIN + EVAL_TEST) / (num_train + num_test)
    results.add(
        case,
        f"linear probe ({num_train} x {epochs} epochs)",
        probe_seconds,
        num_train * epochs / probe_seconds,
        "samples/s",
        "float32",
        note=f"CIFAR-10 probe ({EVAL_TRAIN} x {EVAL_EPOCHS} epochs) {probe_full:.3g} s"
        + ("; epochs 1.. replay one CUDA graph" if device.type == "cuda" else ""),
    )
    knn_train, knn_test = size["knn"]
    knn_subset = LabelledFeatures(
        train_x[:knn_train], train_y[:knn_train], test_x[:knn_test], test_y[:knn_test], EVAL_CLASSES
    )
    knn_seconds = common.time_call(lambda: knn_classify(knn_subset), device, repeats=1)
    knn_full = knn_seconds * (EVAL_TRAIN * EVAL_TEST) / (knn_train * knn_test)
    knn_flops = 2 * knn_train * knn_test * config.hidden_dim
    # the kNN's products are float32: its limit is the float32 matmul rate (TF32 as the row's versions say)
    knn_peak = matmul_peak if matmul_dtype == torch.float32 else common.matmul_rate(device, torch.float32)
    results.add(
        case,
        f"kNN ({knn_test} x {knn_train})",
        knn_seconds,
        knn_test / knn_seconds,
        "queries/s",
        "float32",
        knn_flops / knn_seconds / knn_peak,
        "float32 matmul",
        note=f"CIFAR-10 kNN ({EVAL_TEST} x {EVAL_TRAIN}) {knn_full:.3g} s",
    )
    if not patch_rates:  # every features row failed: no evaluation to extrapolate
        return
    fastest = max(patch_rates, key=patch_rates.get)
    features_full = (EVAL_TRAIN + EVAL_TEST) * EVAL_PATCHES / patch_rates[fastest]
    total = features_full + probe_full + knn_full
    results.add(
        case,
        f"CIFAR-10 evaluation ({EVAL_PATCHES} patches, extrapolated)",
        total,
        1.0 / total,
        "evals/s",
        dtype,
        note=f"features {features_full:.3g} s ({fastest}) + probe {probe_full:.3g} s + kNN {knn_full:.3g} s",
    )
