"""The built-in synthetic data set: procedural shapes and textures in 10 classes, generated from a seed (the quick
start's data, and the tests')."""

from __future__ import annotations

import math
from typing import Tuple

import torch

from ..device import check_fits
from .dataset import ImageDataset

GENERATION_BYTES_PER_PIXEL = 64  # the float32 masks, colours and noise of a split while it is drawn

SYNTHETIC_CLASSES = (
    "disc",
    "square",
    "triangle",
    "ring",
    "cross",
    "stripes_horizontal",
    "stripes_vertical",
    "checker",
    "dots",
    "gradient",
)


class _Geometry:
    """Per-image shape parameters (k, 1, 1) of the images of one class, and their offsets from the centre."""

    def __init__(self, cy, cx, radius, period, phase, angle, y, x):
        self.radius, self.period, self.phase, self.angle = radius, period, phase, angle
        self.dy, self.dx = y - cy, x - cx
        self.dist = torch.sqrt(self.dx * self.dx + self.dy * self.dy)

    def wave(self, t):
        return torch.sin(2 * math.pi * (t / self.period + self.phase))


def _synthetic_split(count: int, size: int, generator: torch.Generator) -> Tuple[torch.Tensor, torch.Tensor]:
    """``count`` images (count, size, size, 3) uint8 of random classes, all drawn from ``generator``."""
    u = lambda *shape: torch.rand(*shape, generator=generator)  # noqa: E731
    labels = torch.randint(len(SYNTHETIC_CLASSES), (count,), generator=generator)
    # pixel centres in [0, 1); per-image geometry: centre, radius, texture period and phase, angle
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    y, x = coords.view(1, size, 1), coords.view(1, 1, size)
    cy, cx = (0.3 + 0.4 * u(count)).view(-1, 1, 1), (0.3 + 0.4 * u(count)).view(-1, 1, 1)
    radius = (0.18 + 0.14 * u(count)).view(-1, 1, 1)
    period = (0.16 + 0.14 * u(count)).view(-1, 1, 1)
    phase = u(count).view(-1, 1, 1)
    angle = (2 * math.pi * u(count)).view(-1, 1, 1)
    # each class's mask is computed on that class's images only (a soft mask in [0, 1] for the gradient)
    shapes = {
        "disc": lambda g: g.dist < g.radius,
        "square": lambda g: torch.maximum(g.dx.abs(), g.dy.abs()) < 0.85 * g.radius,
        # upward triangle: apex at cy - r, base at cy + r
        "triangle": lambda g: (g.dy.abs() < g.radius) & (g.dx.abs() < 0.6 * (g.dy + g.radius)),
        "ring": lambda g: (g.dist < g.radius) & (g.dist > 0.55 * g.radius),
        "cross": lambda g: (
            ((g.dx.abs() < 0.3 * g.radius) & (g.dy.abs() < g.radius))
            | ((g.dy.abs() < 0.3 * g.radius) & (g.dx.abs() < g.radius))
        ),
        "stripes_horizontal": lambda g: g.wave(y) + 0 * x > 0,
        "stripes_vertical": lambda g: g.wave(x) + 0 * y > 0,
        "checker": lambda g: g.wave(x) * g.wave(y) > 0,
        "dots": lambda g: (
            ((((x / g.period + g.phase) % 1) - 0.5) ** 2 + (((y / g.period + g.phase) % 1) - 0.5) ** 2) < 0.09
        ),
        "gradient": lambda g: (0.5 + (g.dx * torch.cos(g.angle) + g.dy * torch.sin(g.angle)) * 1.6).clamp(0, 1),
    }
    alpha = torch.zeros(count, size, size)
    for index, name in enumerate(SYNTHETIC_CLASSES):
        selected = (labels == index).nonzero().squeeze(1)
        g = _Geometry(
            cy[selected], cx[selected], radius[selected], period[selected], phase[selected], angle[selected], y, x
        )
        alpha[selected] = shapes[name](g).float()
    # colours: background anywhere, foreground shifted in every channel so the shape always shows
    background = u(count, 1, 1, 3)
    foreground = (background + 0.3 + 0.4 * u(count, 1, 1, 3)) % 1.0
    images = background + alpha.unsqueeze(-1) * (foreground - background)
    images = images + 0.06 * torch.randn(images.shape, generator=generator)  # sensor-like noise
    return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels


def make_synthetic(train_size: int = 10000, test_size: int = 2000, image_size: int = 32, seed: int = 0) -> ImageDataset:
    """Procedural labelled images: 10 classes of shapes and textures with random colours, positions, sizes.

    Deterministic from ``seed``; vectorised (10k 32x32 images in about a second on one CPU core); no files.
    """
    for name, value in (("train_size", train_size), ("test_size", test_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    pixels = image_size * image_size
    check_fits(
        max(train_size, test_size) * pixels * GENERATION_BYTES_PER_PIXEL + (train_size + test_size) * pixels * 3,
        torch.device("cpu"),
        f"the synthetic data set ({train_size} train and {test_size} test images of {image_size}x{image_size})",
        "lower --train-size, --test-size or --image-size",
    )
    generator = torch.Generator().manual_seed(seed)
    train_images, train_labels = _synthetic_split(train_size, image_size, generator)
    test_images, test_labels = _synthetic_split(test_size, image_size, generator)
    return ImageDataset(
        "synthetic", train_images, train_labels, test_images, test_labels, classes=list(SYNTHETIC_CLASSES)
    )
