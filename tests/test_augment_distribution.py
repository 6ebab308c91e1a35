"""The fused augmentation (cpu backend, else the reference) against the published pipeline:
torchvision transforms on PIL images, as in the EMP-SSL authors' code, from the same source images.

Compared over many patches, within 4 standard errors: per-channel mean and second moment of
the output pixels (so mean and std), the fraction of grayscale patches and of solarized patches.
Remaining differences that these statistics tolerate: PIL's GaussianBlur is a box-filter
approximation of a Gaussian (ours is exact), PIL rounds to uint8 after every step (ours stays in
float32 until the end), and PIL's hue shift works on uint8 HSV; each changes single pixels by
about 1/255 with no bias visible at this sample size.
"""

import dataclasses
import random

import pytest
import torch

from empssl import backends
from empssl.augment.config import AugmentConfig
from empssl.augment.multipatch import MultiPatchAugment

PIL = pytest.importorskip("PIL")
import torchvision.transforms as T  # noqa: E402
import torchvision.transforms.functional as TF  # noqa: E402
from PIL import Image, ImageFilter  # noqa: E402

NUM_IMAGES = 200
FUSED_PATCHES_PER_IMAGE = 100  # 20k patches
PIL_PATCHES_PER_IMAGE = 15  # 3k patches: about 1 ms each on one core
MAX_Z = 4.0


class _PilGaussianBlur:
    """The authors' blur: PIL's GaussianBlur with radius U(0.1, 2)."""

    def __call__(self, image):
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))


class _RecordedSolarize:
    """RandomSolarize(128, p) that records whether it fired (for the solarized fraction)."""

    def __init__(self, p):
        self.p, self.fired = p, []

    def __call__(self, image):
        fire = random.random() < self.p
        self.fired.append(fire)
        return TF.solarize(image, 128) if fire else image


def _published_pipeline(solarize):
    return T.Compose(
        [
            T.RandomResizedCrop(32, scale=(0.25, 0.25), ratio=(1, 1)),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([_PilGaussianBlur()], p=0.1),
            solarize,
            T.ToTensor(),
            T.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
        ]
    )


def _source_images(generator):
    """Smooth colour images (8x8 noise upsampled to 32x32) with some flat saturated areas, as uint8 NHWC."""
    coarse = torch.rand(NUM_IMAGES, 3, 8, 8, generator=generator)
    images = torch.nn.functional.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
    images[:, :, :6, :6] = 1.0
    return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def _statistics(patches):
    """Per patch: the channel means (3), channel second moments (3), and whether it is gray."""
    flat = patches.flatten(2).double()
    gray = ((patches[:, 0] == patches[:, 1]) & (patches[:, 1] == patches[:, 2])).flatten(1).all(dim=1)
    return flat.mean(dim=2), (flat**2).mean(dim=2), gray.double()


def _z(a, b):
    """|mean(a) - mean(b)| in standard errors of the difference, per column."""
    se = (a.var(dim=0) / a.shape[0] + b.var(dim=0) / b.shape[0]).sqrt()
    return (a.mean(dim=0) - b.mean(dim=0)).abs() / se.clamp(min=1e-12)


def test_matches_published_pipeline_in_distribution():
    torch.manual_seed(0)
    random.seed(0)
    generator = torch.Generator().manual_seed(0)
    images = _source_images(generator)
    config = AugmentConfig.cifar()
    backend = (
        "cpu"
        if backends.reasons(
            "augment", torch.device("cpu"), images, torch.zeros(1, dtype=torch.int64), torch.zeros(1, 17), config
        )["cpu"]
        is None
        else "reference"
    )
    augment = MultiPatchAugment(config, backend=backend)
    source_index, params = augment.sample(images, FUSED_PATCHES_PER_IMAGE, generator=generator)
    fused = augment.apply(images, source_index, params)
    fused_solarized = params[:, 16].double()  # augment_params.SOLARIZE

    solarize = _RecordedSolarize(0.1)
    pipeline = _published_pipeline(solarize)
    pil_images = [Image.fromarray(image.numpy()) for image in images]
    published = torch.stack([pipeline(pil_images[j]) for _ in range(PIL_PATCHES_PER_IMAGE) for j in range(NUM_IMAGES)])
    published_solarized = torch.tensor(solarize.fired, dtype=torch.float64)

    fused_stats, published_stats = _statistics(fused), _statistics(published)
    names = ("channel means", "channel second moments", "grayscale fraction")
    for name, a, b in zip(names, fused_stats, published_stats):
        z = _z(a.view(a.shape[0], -1), b.view(b.shape[0], -1))
        assert (z < MAX_Z).all(), (
            f"{name}: fused {a.mean(0).tolist()} vs published {b.mean(0).tolist()}, z = {z.tolist()}"
        )
    z = _z(fused_solarized.view(-1, 1), published_solarized.view(-1, 1))
    assert z.item() < MAX_Z, f"solarized fraction {fused_solarized.mean():.4f} vs {published_solarized.mean():.4f}"
    # the statistics have power: the same pipeline without colour jitter is told apart
    no_jitter = MultiPatchAugment(dataclasses.replace(config, jitter_p=0.0), backend=backend)
    plain = _statistics(no_jitter(images, FUSED_PATCHES_PER_IMAGE, generator=generator))
    z_plain = torch.cat(
        [_z(a.view(a.shape[0], -1), b.view(b.shape[0], -1)) for a, b in zip(plain[:2], published_stats[:2])]
    )
    assert z_plain.max() > MAX_Z
