"""Crop boxes distributed as torchvision's ``RandomResizedCrop.get_params``, drawn vectorised on the device."""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

from ..checks import check_positive_int
from .rng import check_generator, default_device, draw_uniforms

_CROP_ATTEMPTS = 10  # torchvision's RandomResizedCrop.get_params


def _fallback_crop_box(height: int, width: int, ratio: Tuple[float, float]) -> Tuple[int, int, int, int]:
    """torchvision's centre crop when no attempt fits: the whole image with its ratio clamped into ``ratio``."""
    in_ratio = float(width) / float(height)
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _fixed_crop_size(area: int, scale: Tuple[float, float], ratio: Tuple[float, float]) -> Optional[Tuple[int, int]]:
    """(h, w) of every attempt when scale and ratio are single values (all attempts are then equal), else None."""
    if scale[0] != scale[1] or ratio[0] != ratio[1]:
        return None
    target_area, aspect = area * scale[0], math.exp(math.log(ratio[0]))
    return int(round(math.sqrt(target_area / aspect))), int(round(math.sqrt(target_area * aspect)))


def crop_uniform_count(scale: Tuple[float, float], ratio: Tuple[float, float]) -> int:
    """Uniforms one box consumes: 2 for the position, plus 2 per attempt unless the size is fixed."""
    return 2 if _fixed_crop_size(1, scale, ratio) is not None else 2 + 2 * _CROP_ATTEMPTS


def _constant_columns(like: torch.Tensor, values) -> torch.Tensor:
    """(len(like), len(values)): every row equal to ``values``, made by fills (no host-to-device copy)."""
    return torch.stack([torch.full_like(like, float(v)) for v in values], dim=1)


def crop_boxes_from_uniforms(
    u: torch.Tensor, image_height, image_width, scale: Tuple[float, float], ratio: Tuple[float, float]
) -> torch.Tensor:
    """Boxes (see ``sample_crop_boxes``) from float64 uniforms ``u`` of shape (num_boxes, crop_uniform_count).

    ``image_height`` and ``image_width``: one size for every box (ints), or each box's own image size (float64 or
    integer tensors of shape (num_boxes,): images of several sizes in one batch, each stored in the top-left corner
    of a larger canvas). Every constant is a Python scalar and every result a new tensor (no copies of Python data
    to the device, no writes into views), so the function is one traceable graph with no host sync.
    """
    if isinstance(image_height, torch.Tensor) or isinstance(image_width, torch.Tensor):
        return _crop_boxes_per_image(u, image_height, image_width, scale, ratio)
    fallback_top, fallback_left, fallback_h, fallback_w = _fallback_crop_box(image_height, image_width, ratio)
    fixed = _fixed_crop_size(image_height * image_width, scale, ratio)
    if fixed is not None:
        # every attempt draws the same (h, w), so the first one decides for all boxes
        h, w = fixed
        if not (0 < w <= image_width and 0 < h <= image_height):
            return _constant_columns(u[:, 0], (fallback_top, fallback_left, fallback_h, fallback_w))
        # top ~ randint(0, H - h + 1), left ~ randint(0, W - w + 1)
        top = torch.floor(u[:, 0] * (image_height - h + 1)).clamp_(max=image_height - h)
        left = torch.floor(u[:, 1] * (image_width - w + 1)).clamp_(max=image_width - w)
        return torch.stack((top, left, torch.full_like(top, h), torch.full_like(top, w)), dim=1)
    attempts, area = _CROP_ATTEMPTS, image_height * image_width
    target_area = u[:, :attempts] * (area * (scale[1] - scale[0])) + area * scale[0]
    log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
    aspect = (u[:, attempts : 2 * attempts] * (log_high - log_low) + log_low).exp()
    # (num_boxes, attempts): rounded heights and widths of every attempt
    h_try, w_try = (target_area / aspect).sqrt().round(), (target_area * aspect).sqrt().round()
    fits = (h_try > 0) & (h_try <= image_height) & (w_try > 0) & (w_try <= image_width)
    first_fit = fits.to(torch.uint8).argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    found = fits.any(dim=1)
    h = torch.where(found, h_try.gather(1, first_fit).squeeze(1), float(fallback_h))
    w = torch.where(found, w_try.gather(1, first_fit).squeeze(1), float(fallback_w))
    free_h, free_w = image_height - h, image_width - w
    top = torch.minimum(torch.floor(u[:, 2 * attempts] * (free_h + 1)), free_h)
    left = torch.minimum(torch.floor(u[:, 2 * attempts + 1] * (free_w + 1)), free_w)
    top = torch.where(found, top, float(fallback_top))
    left = torch.where(found, left, float(fallback_left))
    return torch.stack((top, left, h, w), dim=1)


def _crop_boxes_per_image(
    u: torch.Tensor, image_height, image_width, scale: Tuple[float, float], ratio: Tuple[float, float]
) -> torch.Tensor:
    """``crop_boxes_from_uniforms`` with each box's own image size (H, W as (num_boxes,) tensors): the same draws,
    with the same arithmetic in float64, so a box equals the one the single-size path gives for its size."""
    as_column = lambda size: torch.as_tensor(size, dtype=torch.float64, device=u.device).expand(u.shape[0])  # noqa: E731
    height, width = as_column(image_height), as_column(image_width)
    # torchvision's fallback, per box: the whole image with its ratio clamped into ratio
    low_ratio, high_ratio = min(ratio), max(ratio)
    in_ratio = width / height
    too_narrow, too_wide = in_ratio < low_ratio, in_ratio > high_ratio
    fallback_w = torch.where(too_wide, (height * high_ratio).round(), width)
    fallback_h = torch.where(too_narrow, (width / low_ratio).round(), height)
    fallback_top = torch.div(height - fallback_h, 2, rounding_mode="floor")
    fallback_left = torch.div(width - fallback_w, 2, rounding_mode="floor")
    area = height * width
    if scale[0] == scale[1] and ratio[0] == ratio[1]:  # fixed size: one attempt decides (see _fixed_crop_size)
        aspect = math.exp(math.log(ratio[0]))
        target_area = area * scale[0]
        h_try, w_try = (target_area / aspect).sqrt().round(), (target_area * aspect).sqrt().round()
        position = u[:, 0], u[:, 1]
        found = (h_try > 0) & (h_try <= height) & (w_try > 0) & (w_try <= width)
        h, w = torch.where(found, h_try, fallback_h), torch.where(found, w_try, fallback_w)
    else:
        attempts = _CROP_ATTEMPTS
        target_area = u[:, :attempts] * (area * (scale[1] - scale[0])).unsqueeze(1) + (area * scale[0]).unsqueeze(1)
        log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
        aspect = (u[:, attempts : 2 * attempts] * (log_high - log_low) + log_low).exp()
        h_try, w_try = (target_area / aspect).sqrt().round(), (target_area * aspect).sqrt().round()
        fits = (h_try > 0) & (h_try <= height.unsqueeze(1)) & (w_try > 0) & (w_try <= width.unsqueeze(1))
        first_fit = fits.to(torch.uint8).argmax(dim=1, keepdim=True)
        found = fits.any(dim=1)
        h = torch.where(found, h_try.gather(1, first_fit).squeeze(1), fallback_h)
        w = torch.where(found, w_try.gather(1, first_fit).squeeze(1), fallback_w)
        position = u[:, 2 * attempts], u[:, 2 * attempts + 1]
    free_h, free_w = height - h, width - w
    top = torch.where(found, torch.minimum(torch.floor(position[0] * (free_h + 1)), free_h), fallback_top)
    left = torch.where(found, torch.minimum(torch.floor(position[1] * (free_w + 1)), free_w), fallback_left)
    return torch.stack((top, left, h, w), dim=1)


def sample_crop_boxes(
    num_boxes: int,
    image_height: int,
    image_width: int,
    scale: Tuple[float, float],
    ratio: Tuple[float, float],
    generator: Optional[torch.Generator] = None,
    device=None,
    *,
    seed=None,
    step=0,
    image_ids: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """(num_boxes, 4) float64 boxes (top, left, height, width), each distributed as
    ``torchvision.transforms.RandomResizedCrop.get_params``.

    All 10 attempts of every box are drawn at once; a box takes its first attempt that fits
    (``0 < w <= W and 0 < h <= H``), or torchvision's centre-crop fallback if none does.
    ``torch.round`` rounds half to even, like Python's ``round``. When scale and ratio are
    single values every attempt has the same size, so only the position is drawn. The uniforms
    come from ``generator`` or, with ``seed``, from ``counter_uniforms`` (box k is patch 0 of
    image ``image_ids[k]``).
    """
    check_positive_int(num_boxes, "num_boxes")
    device = default_device(generator, step, image_ids, device)
    check_generator(generator, device)
    u = draw_uniforms(num_boxes, 1, crop_uniform_count(scale, ratio), generator, device, seed, step, image_ids)
    return crop_boxes_from_uniforms(u, image_height, image_width, scale, ratio)
