"""Patches at the source's resolution: the stored size and the patch size are separate, each image keeps its own
aspect ratio, and a patch is a crop of the stored image resized to the patch size, so a high-frequency pattern
survives as it does under torchvision's RandomResizedCrop on the full-resolution original."""

import os

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF

from empssl.augment.config import AugmentConfig
from empssl.augment.crops import crop_boxes_from_uniforms, crop_uniform_count
from empssl.augment.multipatch import MultiPatchAugment
from empssl.data.load import load_dataset

PATCH = 48
# only the crop: no flip, jitter, grayscale, blur or solarize; no normalisation
CROP_ONLY = AugmentConfig(
    output_size=PATCH, crop_ratio=(3 / 4, 4 / 3), flip_p=0, jitter_p=0, grayscale_p=0, blur_p=0, solarize_p=0,
    mean=(0, 0, 0), std=(1, 1, 1),
)  # fmt: skip


def _originals(root):
    """A landscape 180x240 and a portrait 240x180 photo of a fine pattern (periods of 5 to 7 pixels), as PNGs."""
    from PIL import Image

    rng = np.random.default_rng(0)
    originals = []
    for index, (height, width) in enumerate(((180, 240), (240, 180))):
        y, x = np.mgrid[0:height, 0:width]
        pattern = 0.5 + 0.3 * np.sin(2 * np.pi * x / 5.0 + index) * np.sin(2 * np.pi * y / 7.0)
        pixels = np.stack([pattern, 1 - pattern, 0.5 * pattern + 0.25], -1) + 0.02 * rng.standard_normal(
            (height, width, 3)
        )
        pixels = np.clip(np.round(255 * pixels), 0, 255).astype(np.uint8)
        for split in ("train", "val"):
            os.makedirs(root / split / f"c{index}", exist_ok=True)
            Image.fromarray(pixels).save(root / split / f"c{index}" / "photo.png")
        originals.append(torch.from_numpy(pixels).permute(2, 0, 1).float() / 255)
    return originals


def _high_frequency(image):
    return image - torch.nn.functional.avg_pool2d(image[None], 3, 1, 1, count_include_pad=False)[0]


def _against_torchvision(root, originals, image_size, max_aspect):
    """Mean absolute error and the high-frequency energy ratio of every patch against torchvision's resized crop
    of the same box (mapped to the original's pixels) on the full-resolution original."""
    data = load_dataset(
        f"folder:{root}", image_size=image_size, max_aspect=max_aspect, cache_dir=str(root / f"c{image_size}"),
        show_progress=False,
    )  # fmt: skip
    sizes = data.train_sizes if data.train_sizes is not None else torch.tensor([data.image_size] * 2)
    augment = MultiPatchAugment(CROP_ONLY, backend="cpu")
    source, params = augment.sample(data.train_images, 40, seed=1, image_sizes=data.train_sizes)
    patches = augment.apply(data.train_images, source, params)
    errors, kept = [], []
    for row, image in enumerate(source.tolist()):
        original = originals[image]
        height, width = original.shape[1:]
        stored_h, stored_w = sizes[image].tolist()
        kept_h = kept_w = min(height, width) if stored_h == stored_w and height != width else None
        scale = min(height, width) / min(stored_h, stored_w)  # original pixels per stored pixel
        kept_h, kept_w = (kept_h or height), (kept_w or width)
        top0, left0 = (height - kept_h) / 2, (width - kept_w) / 2  # the centre crop of the stored region
        top, left, h, w = params[row, :4].tolist()
        box = [round(top0 + top * scale), round(left0 + left * scale), round(h * scale), round(w * scale)]
        reference = TF.resized_crop(original, *box, [PATCH, PATCH], antialias=True)
        errors.append((patches[row] - reference).abs().mean().item())
        kept.append((_high_frequency(patches[row]).std() / _high_frequency(reference).std()).item())
    return float(np.mean(errors)), float(np.min(kept))


def test_a_fine_pattern_survives_crop_and_resize_as_under_torchvision_on_the_original(tmp_path):
    originals = _originals(tmp_path)
    # stored at the originals' resolution, whole (4:3 and 3:4 kept): the patches are torchvision's on the original
    error, kept = _against_torchvision(tmp_path, originals, 180, 4 / 3)
    assert error < 1e-5 and kept > 0.999
    # stored at 3/4 of it: within a tolerance (the storage's own resize), the fine pattern kept
    error_three_quarters, kept_three_quarters = _against_torchvision(tmp_path, originals, 135, 4 / 3)
    assert error_three_quarters < 0.03 and kept_three_quarters > 0.55
    # what the patches were before the storage size was separate: images stored as centre squares at the patch
    # size, so a quarter-area crop is upsampled 2x and the pattern is gone
    error_old, kept_old = _against_torchvision(tmp_path, originals, PATCH, 1.0)
    assert error_old > 2 * error_three_quarters and kept_old < 0.35


@pytest.mark.parametrize(
    "scale, ratio", [((0.25, 0.25), (1.0, 1.0)), ((0.25, 0.25), (3 / 4, 4 / 3)), ((0.08, 1.0), (3 / 4, 4 / 3))]
)
def test_a_box_drawn_for_an_image_of_its_own_size_is_the_box_of_an_image_of_that_size(scale, ratio):
    """Per-image sizes: each box equals the one the single-size path (tested against torchvision's get_params)
    draws from the same uniforms for an image of that size, fallbacks included."""
    sizes = [(32, 32), (20, 37), (37, 20), (5, 90), (1, 1), (64, 48)]
    u = torch.rand(len(sizes) * 200, crop_uniform_count(scale, ratio), dtype=torch.float64)
    heights = torch.tensor([h for h, _ in sizes]).repeat_interleave(200)
    widths = torch.tensor([w for _, w in sizes]).repeat_interleave(200)
    boxes = crop_boxes_from_uniforms(u, heights, widths, scale, ratio)
    for index, (height, width) in enumerate(sizes):
        rows = slice(200 * index, 200 * (index + 1))
        assert torch.equal(boxes[rows], crop_boxes_from_uniforms(u[rows], height, width, scale, ratio))
        assert (boxes[rows, 0] + boxes[rows, 2] <= height).all() and (boxes[rows, 1] + boxes[rows, 3] <= width).all()


def test_sizes_beyond_the_canvas_are_clamped_into_it():
    augment = MultiPatchAugment(CROP_ONLY, backend="reference")
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    _, params = augment.sample(images, 50, seed=0, image_sizes=torch.tensor([[400, 9], [16, 1000]]))
    top, left, h, w = params[:, :4].unbind(1)
    assert (top + h <= 16).all() and (left + w <= 16).all() and (left[0::2] + w[0::2] <= 9).all()
