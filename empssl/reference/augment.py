"""Per-patch augmentation in plain PyTorch (docs/method.md section 4): the specification in code.

``apply_augment`` turns sampled parameters (layout in ``empssl.augment.params``) into
normalised patches. It is batched over patches, each with its own parameter row, and does
its math in float32 with the formulas of ``torchvision.transforms.v2.functional`` on float
images in [0, 1]; tests/test_augment_reference.py checks every step against torchvision.

Steps, in order: resized crop (antialiased bilinear), horizontal flip, colour jitter (four
ops in the per-patch order), grayscale, Gaussian blur, solarize, normalize.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augment import params as AP

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2 luma, as torchvision's rgb_to_grayscale

# Patches are processed in chunks so the float32 copy of their source images stays bounded.
_CHUNK_ELEMENTS = 1 << 24


def resize_weights(in_size: int, out_size: int, crop_start: torch.Tensor, crop_len: torch.Tensor) -> torch.Tensor:
    """Resampling matrices (P, out_size, in_size) of a crop followed by an antialiased bilinear resize.

    Row i of patch p holds the weights of the ``in_size`` source pixels for output pixel i,
    zero outside ``[crop_start, crop_start + crop_len)``. The weights are those of
    ``torch.nn.functional.interpolate(mode="bilinear", align_corners=False, antialias=True)``
    applied to the crop (ATen's ``_compute_indices_min_size_weights_aa``): with
    ``scale = crop_len / out_size``, output pixel i is centred at ``scale * (i + 0.5)`` in
    crop coordinates, and source pixel j gets the triangle filter
    ``max(0, 1 - |(j + 0.5 - center) / support|)`` with ``support = max(scale, 1)`` (the filter
    is widened when downscaling, plain bilinear when upscaling), normalised over the pixels of
    the crop. ATen's window ``[xmin, xmin + xsize)`` contains every pixel where the filter is
    non-zero, so the clipped triangle gives the same weights. Computed in float64.
    """
    crop_start = crop_start.to(torch.float64).view(-1, 1, 1)
    crop_len = crop_len.to(torch.float64).view(-1, 1, 1)
    device = crop_start.device
    out_index = torch.arange(out_size, dtype=torch.float64, device=device).view(1, -1, 1)
    in_index = torch.arange(in_size, dtype=torch.float64, device=device).view(1, 1, -1)

    scale = crop_len / out_size
    support = scale.clamp(min=1.0)
    center = scale * (out_index + 0.5)
    local = in_index - crop_start  # source pixel index inside the crop
    weights = (1.0 - ((local + 0.5 - center) / support).abs()).clamp(min=0.0)
    weights = weights * ((local >= 0) & (local < crop_len))
    # the pixel nearest the centre always has weight >= 1/2, so the sum is never zero
    return weights / weights.sum(dim=-1, keepdim=True)


def resized_crop(images: torch.Tensor, params: torch.Tensor, out_size: int) -> torch.Tensor:
    """Float images (P, H, W, 3) -> (P, 3, S, S): out = Wy @ img @ Wx^T per patch and channel."""
    _, height, width, _ = images.shape
    wy = resize_weights(height, out_size, params[:, AP.CROP_TOP], params[:, AP.CROP_HEIGHT]).float()
    wx = resize_weights(width, out_size, params[:, AP.CROP_LEFT], params[:, AP.CROP_WIDTH]).float()
    rows = torch.einsum("pxw,phwc->phxc", wx, images)  # horizontal pass first, as ATen does
    return torch.einsum("pyh,phxc->pcyx", wy, rows)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """(P, 3, S, S) -> (P, 1, S, S): 0.2989 R + 0.587 G + 0.114 B."""
    r, g, b = x.unbind(dim=1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """torchvision's _blend for float images: clamp(f * x + (1 - f) * other, 0, 1)."""
    return (x * factor + other * (1.0 - factor)).clamp(0.0, 1.0)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (x * factor).clamp(0.0, 1.0)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    # one mean per patch: of its grayscale image over all pixels
    mean = grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
    return _blend(x, mean, factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return _blend(x, grayscale(x), factor)


def rgb_to_hsv(x: torch.Tensor) -> torch.Tensor:
    """torchvision's _rgb_to_hsv (after Pillow): (P, 3, S, S) RGB -> HSV, all in [0, 1]."""
    r, g, _ = x.unbind(dim=1)
    minc, maxc = torch.aminmax(x, dim=1)
    gray_pixel = maxc == minc  # hue and saturation are 0 there; avoid dividing by 0
    chroma = maxc - minc
    ones = torch.ones_like(maxc)
    saturation = chroma / torch.where(gray_pixel, ones, maxc)
    rc, gc, bc = ((maxc.unsqueeze(1) - x) / torch.where(gray_pixel, ones, chroma).unsqueeze(1)).unbind(dim=1)
    max_is_r = maxc == r
    max_is_g = (maxc == g) & ~max_is_r
    max_is_b = ~max_is_r & ~max_is_g
    hue = (bc - gc) * max_is_r + (rc + 2.0 - bc) * max_is_g + (gc + 4.0 - rc) * max_is_b
    hue = (hue * (1.0 / 6.0) + 1.0).fmod(1.0)
    return torch.stack((hue, saturation, maxc), dim=1)


# output channel c takes candidate _HSV_SELECT[c][sector] of (v, p, q, t)
_HSV_SELECT = ((0, 2, 1, 1, 3, 0), (3, 0, 0, 2, 1, 1), (1, 1, 3, 0, 0, 2))


def hsv_to_rgb(x: torch.Tensor) -> torch.Tensor:
    """torchvision's _hsv_to_rgb: (P, 3, S, S) HSV -> RGB."""
    h, s, v = x.unbind(dim=1)
    h6 = h * 6.0
    sector = torch.floor(h6)
    frac = h6 - sector
    sector = sector.to(torch.int64).remainder(6)
    p = (v * (1.0 - s)).clamp(0.0, 1.0)
    q = (v * (1.0 - s * frac)).clamp(0.0, 1.0)
    t = (v * (s * frac + (1.0 - s))).clamp(0.0, 1.0)
    candidates = torch.stack((v, p, q, t), dim=1)
    select = torch.tensor(_HSV_SELECT, dtype=torch.int64, device=x.device)[:, sector]  # (3, P, S, S)
    return candidates.gather(1, select.transpose(0, 1))


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Shift the hue of each patch by its ``shift`` (one value per patch, any shape of P elements)."""
    h, s, v = rgb_to_hsv(x).unbind(dim=1)
    h = (h + shift.view(-1, 1, 1)).remainder(1.0)
    return hsv_to_rgb(torch.stack((h, s, v), dim=1))


# jitter op id (augment_params.OP_*) -> (function, parameter column, config strength field)
JITTER_OPS = {
    AP.OP_BRIGHTNESS: (adjust_brightness, AP.BRIGHTNESS, "brightness"),
    AP.OP_CONTRAST: (adjust_contrast, AP.CONTRAST, "contrast"),
    AP.OP_SATURATION: (adjust_saturation, AP.SATURATION, "saturation"),
    AP.OP_HUE: (adjust_hue, AP.HUE, "hue"),
}
ORDER_COLUMNS = (AP.ORDER_0, AP.ORDER_1, AP.ORDER_2, AP.ORDER_3)


def color_jitter(x: torch.Tensor, params: torch.Tensor, config) -> torch.Tensor:
    """The four jitter ops, each patch in its own order, on the patches whose JITTER flag is set.

    Batched: at each of the four positions every op is computed for all patches and kept
    where it is that patch's op at that position. An op whose strength in ``config`` is 0 is
    skipped, as torchvision's ColorJitter drops it (only hue would differ: its HSV round trip
    is not bit-exact).
    """
    jitter = params[:, AP.JITTER] == 1.0
    for column in ORDER_COLUMNS:
        op_here = params[:, column]
        for op_id, (op, factor_column, strength) in JITTER_OPS.items():
            if getattr(config, strength) == 0:
                continue
            factor = params[:, factor_column].view(-1, 1, 1, 1)
            chosen = (jitter & (op_here == op_id)).view(-1, 1, 1, 1)
            x = torch.where(chosen, op(x, factor), x)
    return x


def gaussian_kernels(sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(P,) sigmas -> (P, kernel_size) normalised 1-D Gaussians exp(-0.5 (t / sigma)^2), t centred on 0.

    torchvision 0.29 writes the same kernel as softmax(-(t / (sqrt(2) sigma))^2).
    """
    t = torch.linspace(-(kernel_size - 1) / 2, (kernel_size - 1) / 2, kernel_size, device=sigma.device)
    pdf = torch.exp(-0.5 * (t / sigma.view(-1, 1)) ** 2)
    return pdf / pdf.sum(dim=1, keepdim=True)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Separable Gaussian blur with reflect padding; patches with sigma == 0 are returned unchanged."""
    blurred_patch = sigma > 0
    kernels = gaussian_kernels(torch.where(blurred_patch, sigma, torch.ones_like(sigma)), kernel_size)
    radius, size = kernel_size // 2, x.shape[-1]
    padded = F.pad(x, (radius, radius, radius, radius), mode="reflect")
    taps = kernels.view(-1, 1, 1, kernel_size)
    horizontal = sum(taps[..., k : k + 1] * padded[..., :, k : k + size] for k in range(kernel_size))
    blurred = sum(taps[..., k : k + 1] * horizontal[..., k : k + size, :] for k in range(kernel_size))
    return torch.where(blurred_patch.view(-1, 1, 1, 1), blurred, x)


def solarize(x: torch.Tensor, threshold: float) -> torch.Tensor:
    # the comparison is in float32, as torchvision's on a float32 image
    return torch.where(x >= torch.tensor(threshold, dtype=x.dtype, device=x.device), 1.0 - x, x)


def normalize(x: torch.Tensor, mean, std) -> torch.Tensor:
    mean = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def augment_float(images: torch.Tensor, params: torch.Tensor, config) -> torch.Tensor:
    """Float source images (P, H, W, 3) in [0, 1], one per patch -> normalised float32 patches (P, 3, S, S)."""
    x = resized_crop(images, params, config.output_size)
    x = torch.where((params[:, AP.FLIP] == 1.0).view(-1, 1, 1, 1), x.flip(-1), x)
    x = color_jitter(x, params, config)
    x = torch.where((params[:, AP.GRAYSCALE] == 1.0).view(-1, 1, 1, 1), grayscale(x).expand_as(x), x)
    x = gaussian_blur(x, params[:, AP.BLUR_SIGMA], config.blur_kernel_size)
    x = torch.where((params[:, AP.SOLARIZE] == 1.0).view(-1, 1, 1, 1), solarize(x, config.solarize_threshold), x)
    return normalize(x, config.mean, config.std)


def apply_augment(
    images_nhwc: torch.Tensor,
    source_index: torch.Tensor,
    params: torch.Tensor,
    config,
    out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """The reference backend: uint8 images (N, H, W, 3) of any strides -> patches (P, 3, S, S).

    Patch p is cut from ``images_nhwc[source_index[p]]`` with parameter row ``params[p]``.
    Math in float32, cast to ``out_dtype`` at the end, in channels_last memory format if asked.
    """
    num_patches = params.shape[0]
    _, height, width, _ = images_nhwc.shape
    size = config.output_size
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.empty(
        (num_patches, 3, size, size), dtype=out_dtype, device=images_nhwc.device, memory_format=memory_format
    )
    chunk = max(1, _CHUNK_ELEMENTS // (height * width * 3 + size * size * 3))
    for start in range(0, num_patches, chunk):
        stop = min(start + chunk, num_patches)
        # uint8 -> [0, 1] as torchvision's to_dtype(scale=True)
        sources = images_nhwc[source_index[start:stop]].to(torch.float32).mul_(1.0 / 255)
        out[start:stop] = augment_float(sources, params[start:stop], config)
    return out
