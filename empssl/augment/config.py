"""The augmentation recipes (docs/method.md section 4): ``AugmentConfig`` and the recipe for an image size.

A recipe says what the sampler draws and what the kernels apply; the column layout of the sampled
parameters is ``empssl.augment.params``. This module imports only the package's validators
(``empssl.checks``), so the sampler (empssl.augment) and the op (empssl.ops.augment) both take the recipe
from here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Tuple

from ..checks import FLOAT32_MAX, FLOAT32_TINY


def _is_number(value) -> bool:
    """A real number the kernels' float32 holds: finite, within float32's range."""
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and abs(value) <= FLOAT32_MAX
    )


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """One augmentation recipe. The defaults are the CIFAR recipe of docs/method.md section 4.

    Probabilities are ``*_p``; ``brightness``, ``contrast``, ``saturation``, ``hue`` are
    torchvision ColorJitter strengths (factors U(max(0, 1-v), 1+v), hue shift U(-hue, hue));
    ``blur_sigma`` is the range of the Gaussian sigma, ``blur_kernel_size`` its odd kernel size;
    ``mean`` and ``std`` are the per-channel normalisation of the output.
    """

    output_size: int = 32
    crop_scale: Tuple[float, float] = (0.25, 0.25)
    crop_ratio: Tuple[float, float] = (1.0, 1.0)
    flip_p: float = 0.5
    jitter_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.2
    grayscale_p: float = 0.2
    blur_p: float = 0.1
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel_size: int = 13
    solarize_p: float = 0.1
    solarize_threshold: float = 128 / 255
    mean: Tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: Tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def cifar(cls) -> "AugmentConfig":
        """32x32 output from a 16x16 crop of a 32x32 image (scale 0.25, ratio 1)."""
        return cls()

    @classmethod
    def tinyimagenet(cls) -> "AugmentConfig":
        """The CIFAR list at 64x64: a 32x32 crop of a 64x64 image."""
        return cls(output_size=64)

    @classmethod
    def imagenet(cls) -> "AugmentConfig":
        """RandomResizedCrop(224, scale=(0.25, 0.25), ratio=(3/4, 4/3)), otherwise the CIFAR list."""
        return cls(output_size=224, crop_ratio=(3 / 4, 4 / 3))

    def jitter_strengths(self) -> Tuple[float, float, float, float]:
        """ColorJitter strengths in the order of augment_params.OP_* (brightness, contrast, saturation, hue)."""
        return (float(self.brightness), float(self.contrast), float(self.saturation), float(self.hue))

    def jitter_op_mask(self) -> int:
        """Bit k set when jitter op k (augment_params.OP_*) has a non-zero strength: ColorJitter drops the others."""
        return sum(1 << op for op, strength in enumerate(self.jitter_strengths()) if strength != 0)

    def __post_init__(self):
        if not (isinstance(self.output_size, int) and not isinstance(self.output_size, bool) and self.output_size >= 1):
            raise ValueError(f"AugmentConfig.output_size must be a positive int, got {self.output_size!r}")
        for name, length in (("crop_scale", 2), ("crop_ratio", 2), ("blur_sigma", 2), ("mean", 3), ("std", 3)):
            value = getattr(self, name)
            if not (isinstance(value, (tuple, list)) and len(value) == length and all(_is_number(v) for v in value)):
                raise ValueError(f"AugmentConfig.{name} must be {length} finite numbers, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))  # hashable, and lists become tuples
        for name in ("crop_scale", "crop_ratio", "blur_sigma"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise ValueError(
                    f"AugmentConfig.{name} must be a range (low, high) with 0 < low <= high, got {(low, high)}"
                )
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p", "solarize_threshold"):
            value = getattr(self, name)
            if not (_is_number(value) and 0 <= value <= 1):
                raise ValueError(f"AugmentConfig.{name} must be a number in [0, 1], got {value!r}")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            if not (_is_number(value) and value >= 0):
                raise ValueError(f"AugmentConfig.{name} must be a non-negative number, got {value!r}")
        if not (_is_number(self.hue) and 0 <= self.hue <= 0.5):
            raise ValueError(f"AugmentConfig.hue must be a number in [0, 0.5], got {self.hue!r}")
        kernel = self.blur_kernel_size
        if not (isinstance(kernel, int) and not isinstance(kernel, bool) and kernel >= 1 and kernel % 2 == 1):
            raise ValueError(f"AugmentConfig.blur_kernel_size must be a positive odd int, got {kernel!r}")
        if self.blur_p > 0 and kernel // 2 >= self.output_size:
            # reflect padding needs a pad smaller than the patch
            raise ValueError(
                f"AugmentConfig.blur_kernel_size {kernel} is too large for output_size {self.output_size}: "
                f"kernel_size // 2 must be < output_size"
            )
        # (x - mean) / std for x in [0, 1] must be a finite float32, and std a normal float32 (a GPU flushes smaller)
        if any(not (s >= FLOAT32_TINY and (1 + abs(m)) / s <= FLOAT32_MAX) for s, m in zip(self.std, self.mean)):
            raise ValueError(
                f"AugmentConfig.std must be positive and large enough that (x - mean) / std stays a finite float32 "
                f"(std >= (1 + |mean|) / 3.4e38, and >= 1.2e-38), got {self.std!r}"
            )


def augment_config_for(image_size: int) -> AugmentConfig:
    """The augmentation recipe for square images of this size (docs/method.md section 4).

    32: CIFAR; 64: Tiny ImageNet; >= 128: the ImageNet recipe at that size; otherwise the CIFAR
    list at that size (a quarter-area crop resized back to the image size).
    """
    if image_size == 32:
        return AugmentConfig.cifar()
    if image_size == 64:
        return AugmentConfig.tinyimagenet()
    if image_size >= 128:
        return dataclasses.replace(AugmentConfig.imagenet(), output_size=image_size)
    return dataclasses.replace(AugmentConfig.cifar(), output_size=image_size)


def smallest_image_size() -> int:
    """The smallest square image ``augment_config_for`` takes (the blur kernel's reflect padding needs room)."""
    for size in range(1, 129):
        try:
            augment_config_for(size)
        except ValueError:
            continue
        return size
    return 128
