"""Multi-patch augmentation (docs/method.md section 4): parameter sampling and the module.

Sampling and applying are separate. ``sample_augment_params`` draws every random choice
of every patch on the device, vectorised, from a ``torch.Generator`` or from counter-based random
numbers (a hash of seed, step, image, patch and draw: ``counter_uniforms`` in empssl.augment.rng),
into a float32 tensor (P, NUM_PARAMS) laid out as in ``empssl.augment.params``; the crop boxes come
from empssl.augment.crops and the recipe (``AugmentConfig``) from empssl.augment.config. A backend (reference, Triton,
CUDA, CPU C++) is a deterministic function of (images, source_index, params, config), so
every backend gives the same patches for the same parameters. ``MultiPatchAugment`` is the
public entry point: it validates its inputs, samples, and calls the op, whose backends and
dispatch are in ``empssl.ops.augment``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import nn

from ..checks import check_positive_int
from ..ops import augment as augment_op
from . import params as AP
from .config import AugmentConfig
from .crops import crop_boxes_from_uniforms, crop_uniform_count
from .rng import check_generator, default_device, draw_uniforms

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The order in which sample_augment_params concatenates its columns: the layout of augment_params.
_PARAM_COLUMNS = (
    AP.CROP_TOP,
    AP.CROP_LEFT,
    AP.CROP_HEIGHT,
    AP.CROP_WIDTH,
    AP.FLIP,
    AP.JITTER,
    AP.BRIGHTNESS,
    AP.CONTRAST,
    AP.SATURATION,
    AP.HUE,
    AP.ORDER_0,
    AP.ORDER_1,
    AP.ORDER_2,
    AP.ORDER_3,
    AP.GRAYSCALE,
    AP.BLUR_SIGMA,
    AP.SOLARIZE,
)
assert _PARAM_COLUMNS == tuple(range(AP.NUM_PARAMS)), "augment_params changed its layout: update sample_augment_params"


def sample_augment_params(
    config: AugmentConfig,
    num_images: int,
    num_patches: int,
    image_height: int,
    image_width: int,
    generator: Optional[torch.Generator] = None,
    device=None,
    *,
    seed=None,
    step=0,
    image_ids: Optional[torch.Tensor] = None,
    image_sizes: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Random parameters of ``num_patches`` patches of each of ``num_images`` images.

    Returns ``(source_index, params)``: int64 (P,) and float32 (P, NUM_PARAMS) with
    P = num_patches * num_images, patch-major (patch ``i * num_images + j`` is the i-th
    patch of image j). Each row is distributed as torchvision's RandomResizedCrop,
    RandomHorizontalFlip, RandomApply(ColorJitter), RandomGrayscale, Gaussian blur with a
    random sigma, and RandomSolarize with the probabilities of ``config``.

    Two random sources:

    - ``generator`` (or the global generator when it is None and no seed is given): ``torch.rand``;
    - ``seed`` (int or 0-d int64 tensor), with ``step`` (int or 0-d int64 tensor, default 0) and
      ``image_ids`` (int64 (num_images,), default 0..num_images-1): ``counter_uniforms``, a hash
      of (seed, step, image id, patch, draw). Patch i of an image with a given id gets the same
      parameters whatever the rest of the batch is, and a CUDA graph replays the draws (pass step
      as a device tensor and advance it in place).

    ``image_sizes``: int64 (num_images, 2), the (height, width) of each image where the images have several
    sizes, each stored in the top-left corner of the ``image_height`` x ``image_width`` canvas (the rest of the
    canvas is never read; sizes are clamped into the canvas): each box is drawn as RandomResizedCrop draws it on its
    image alone. None: every image fills the canvas.

    Drawn on ``device`` (default: the device of image_ids or step, else the generator's, else
    CPU) with no host synchronisation and no copy of Python data to the device; with ``seed``
    it traces as one graph under ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(config, AugmentConfig):
        raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
    for value, name in (
        (num_images, "num_images"),
        (num_patches, "num_patches"),
        (image_height, "image_height"),
        (image_width, "image_width"),
    ):
        check_positive_int(value, name)
    device = default_device(generator, step, image_ids, device)
    check_generator(generator, device)

    # one float64 draw per call: the crop's uniforms, then 5 gates, 4 jitter factors, 4 order keys, 1 sigma
    crop_uniforms = crop_uniform_count(config.crop_scale, config.crop_ratio)
    u = draw_uniforms(num_images, num_patches, crop_uniforms + 14, generator, device, seed, step, image_ids)
    if image_sizes is not None:  # patch-major rows: row i * num_images + j is image j's
        _check_image_sizes(image_sizes, num_images, image_height, image_width, device)
        sizes = image_sizes.to(torch.float64).repeat(num_patches, 1)
        # clamped into the canvas without a sync: no box can leave the images whatever the sizes say
        image_height, image_width = sizes[:, 0].clamp(1, image_height), sizes[:, 1].clamp(1, image_width)
    boxes = crop_boxes_from_uniforms(
        u[:, :crop_uniforms], image_height, image_width, config.crop_scale, config.crop_ratio
    )
    gate_p, factor_low, factor_span = _sampling_constants(config)
    gate = [
        u[:, crop_uniforms + k : crop_uniforms + k + 1] < gate_p[k] for k in range(5)
    ]  # flip, jitter, grayscale, blur, solarize
    # brightness, contrast, saturation factors in [max(0, 1 - s), 1 + s]; hue shift in [-hue, hue]
    factors = [u[:, crop_uniforms + 5 + k : crop_uniforms + 6 + k] * factor_span[k] + factor_low[k] for k in range(4)]
    # a uniformly random permutation of the four ops per patch (torch.randperm(4) in torchvision)
    order = torch.argsort(u[:, crop_uniforms + 9 : crop_uniforms + 13], dim=1)
    sigma_low, sigma_high = config.blur_sigma
    sigma = (u[:, crop_uniforms + 13 :] * (sigma_high - sigma_low) + sigma_low) * gate[
        3
    ]  # 0 where the blur gate is off
    columns = [boxes, gate[0], gate[1], *factors, order, gate[2], sigma, gate[4]]  # in _PARAM_COLUMNS order
    params = torch.cat(columns, dim=1).to(torch.float32)  # cat promotes the flags and the order to float64
    source_index = torch.arange(num_images, device=device).repeat(num_patches)
    return source_index, params


def _check_image_sizes(image_sizes, num_images: int, height: int, width: int, device: torch.device) -> None:
    """Type, shape and device of ``image_sizes`` (their values are the loader's: checking them would sync)."""
    if not isinstance(image_sizes, torch.Tensor):
        raise TypeError(f"image_sizes must be a torch.Tensor or None, got {type(image_sizes).__name__}")
    if image_sizes.dtype not in (torch.int64, torch.int32) or image_sizes.shape != (num_images, 2):
        raise ValueError(
            f"image_sizes must be int64 (height, width) of shape ({num_images}, 2) within the {height}x{width} "
            f"canvas, got {image_sizes.dtype} of shape {tuple(image_sizes.shape)}"
        )
    if image_sizes.device != device:
        raise ValueError(f"image_sizes is on {image_sizes.device} but the parameters are sampled on {device}")


def _sampling_constants(config: AugmentConfig) -> Tuple[Tuple[float, ...], Tuple[float, ...], Tuple[float, ...]]:
    """Python floats (no device tensor per call): the gate probabilities (flip, jitter, grayscale,
    blur, solarize), and the low ends and spans of the jitter factors (brightness, contrast,
    saturation, hue)."""
    lows, spans = [], []
    for strength in (config.brightness, config.contrast, config.saturation):
        low, high = max(0.0, 1.0 - strength), 1.0 + strength
        lows.append(low)
        spans.append(high - low)
    lows.append(-config.hue)
    spans.append(2.0 * config.hue)
    gate_p = (config.flip_p, config.jitter_p, config.grayscale_p, config.blur_p, config.solarize_p)
    return gate_p, tuple(lows), tuple(spans)


# ---------------------------------------------------------------------------------------------
# Validation and the module (the op, its backends and its dispatch: empssl.ops.augment)


def _as_nhwc(images) -> torch.Tensor:
    """Validate a uint8 image batch and view it as (B, H, W, 3) without copying."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor, got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (values 0..255), got {images.dtype}")
    if images.ndim != 4:
        raise ValueError(f"images must have shape (B, H, W, 3) or (B, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[1] == 3 and images.shape[3] == 3:
        batch, _, middle, _ = images.shape
        raise ValueError(
            f"images of shape {tuple(images.shape)} are ambiguous: as (B, 3, H, W) they are {batch} images of "
            f"{middle}x3 pixels, as (B, H, W, 3) {batch} images of 3x{middle}; say which: pass "
            f"images.permute(0, 2, 3, 1) for the first reading (then (B, H, W, 3)), images.permute(0, 3, 1, 2) for "
            f"the second (then (B, 3, H, W))"
        )
    if images.shape[1] == 3:
        nhwc = images.permute(0, 2, 3, 1)
    elif images.shape[3] == 3:
        nhwc = images
    else:
        raise ValueError(
            f"images must have 3 colour channels, as shape (B, H, W, 3) or (B, 3, H, W), got shape "
            f"{tuple(images.shape)}"
        )
    if nhwc.numel() == 0:
        raise ValueError(f"images must not be empty, got shape {tuple(images.shape)}")
    return nhwc


def _check_params(images_nhwc: torch.Tensor, source_index, params, check_values: bool) -> None:
    """Shapes, dtypes and devices always; values (one host synchronisation) when ``check_values``."""
    for value, name in ((source_index, "source_index"), (params, "params")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
        if value.device != images_nhwc.device:
            raise ValueError(f"{name} is on {value.device} but images are on {images_nhwc.device}")
    if source_index.dtype != torch.int64 or source_index.ndim != 1 or source_index.numel() == 0:
        raise ValueError(
            f"source_index must be a non-empty 1-D int64 tensor, got {source_index.dtype} of shape "
            f"{tuple(source_index.shape)}"
        )
    if params.dtype != torch.float32:
        raise TypeError(f"params must be float32, got {params.dtype}")
    if params.shape != (source_index.shape[0], AP.NUM_PARAMS):
        raise ValueError(
            f"params must have shape (P, {AP.NUM_PARAMS}) with P = len(source_index) = {source_index.shape[0]}, "
            f"got {tuple(params.shape)}"
        )
    if not check_values:
        return
    num_images, height, width, _ = images_nhwc.shape
    top, left, h, w = (params[:, c] for c in (AP.CROP_TOP, AP.CROP_LEFT, AP.CROP_HEIGHT, AP.CROP_WIDTH))
    box = params[:, AP.CROP_TOP : AP.CROP_WIDTH + 1]
    order = params[:, AP.ORDER_0 : AP.ORDER_3 + 1]
    flags = params[:, [AP.FLIP, AP.JITTER, AP.GRAYSCALE, AP.SOLARIZE]]
    factors = params[:, [AP.BRIGHTNESS, AP.CONTRAST, AP.SATURATION]]
    identity_order = torch.arange(4, dtype=params.dtype, device=params.device)
    # each check is written so that NaN fails it
    checks = {
        f"source_index out of range [0, {num_images})": (source_index >= 0) & (source_index < num_images),
        "crop box not integer-valued": (box == torch.round(box)).all(dim=1),
        f"crop box outside the {height}x{width} image (need top, left >= 0, height, width >= 1, "
        f"top + height <= {height}, left + width <= {width})": (top >= 0)
        & (left >= 0)
        & (h >= 1)
        & (w >= 1)
        & (top + h <= height)
        & (left + w <= width),
        "FLIP/JITTER/GRAYSCALE/SOLARIZE flags not 0 or 1": ((flags == 0) | (flags == 1)).all(dim=1),
        "ORDER_0..3 not a permutation of 0..3": (torch.sort(order, dim=1).values == identity_order).all(dim=1),
        "brightness/contrast/saturation factor negative": (factors >= 0).all(dim=1)
        & torch.isfinite(factors).all(dim=1),
        "hue shift outside [-0.5, 0.5]": (params[:, AP.HUE] >= -0.5) & (params[:, AP.HUE] <= 0.5),
        "BLUR_SIGMA negative": (params[:, AP.BLUR_SIGMA] >= 0) & torch.isfinite(params[:, AP.BLUR_SIGMA]),
    }
    bad = ~torch.stack(list(checks.values()), dim=1)
    any_bad, first_bad = torch.stack((bad.any(dim=0).long(), bad.long().argmax(dim=0))).tolist()
    for message, failed, index in zip(checks, any_bad, first_bad):
        if failed:
            raise ValueError(f"{message}: first bad patch is {index}")


class MultiPatchAugment(nn.Module):
    """Cut ``num_patches`` augmented patches from every image of a uint8 batch (docs/method.md section 4).

    ``images`` is uint8, (B, H, W, 3) or (B, 3, H, W); the layout is told by which dimension
    has size 3; a batch where both dimension 1 and dimension 3 have size 3 is refused as ambiguous, naming both
    readings (its permutation to the other layout is not).
    ``augment(images, num_patches, generator=None)`` returns float patches of shape
    (num_patches * B, 3, S, S), patch-major: patch ``i * B + j`` comes from image j.
    ``augment(images, num_patches, seed=..., step=..., image_ids=...)`` draws from the
    counter-based source instead (see ``sample_augment_params``): no generator state, replayable
    by a CUDA graph, independent of how the batch is split. ``image_sizes`` (int64 (B, 2)): each image's
    (height, width) where the images have several sizes, each in the top-left corner of the batch's H x W.
    ``sample`` and ``apply`` do the two halves separately: any backend given the same
    parameters returns the same patches.

    ``backend``: "auto" (the fastest available for the device), "cuda", "triton", "cpu" or
    "reference"; ``out_dtype``: float32, bfloat16 or float16; ``channels_last``: return the
    patches in ``torch.channels_last`` memory format.
    """

    def __init__(
        self,
        config: AugmentConfig = AugmentConfig.cifar(),
        backend: str = "auto",
        out_dtype: torch.dtype = torch.float32,
        channels_last: bool = False,
    ):
        super().__init__()
        if not isinstance(config, AugmentConfig):
            raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
        if backend not in augment_op.BACKEND_CHOICES:
            raise ValueError(
                f"unknown backend {backend!r}; choose one of " + ", ".join(map(repr, augment_op.BACKEND_CHOICES))
            )
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
        self.config, self.backend, self.out_dtype, self.channels_last = config, backend, out_dtype, bool(channels_last)

    def extra_repr(self) -> str:
        return (
            f"config={self.config}, backend={self.backend!r}, out_dtype={self.out_dtype}, "
            f"channels_last={self.channels_last}"
        )

    def _sample(self, images_nhwc: torch.Tensor, num_patches, generator, seed, step, image_ids, image_sizes=None):
        check_positive_int(num_patches, "num_patches")
        check_generator(generator, images_nhwc.device)
        num_images, height, width, _ = images_nhwc.shape
        return sample_augment_params(
            self.config,
            num_images,
            num_patches,
            height,
            width,
            generator,
            images_nhwc.device,
            seed=seed,
            step=step,
            image_ids=image_ids,
            image_sizes=image_sizes,
        )

    def _run_backend(self, images_nhwc: torch.Tensor, source_index: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        # not named _apply: that is nn.Module's hook for .to() / .float() / .cuda()
        return augment_op.augment_patches(
            images_nhwc, source_index, params, self.config, self.out_dtype, self.channels_last, self.backend
        )

    def sample(
        self,
        images: torch.Tensor,
        num_patches: int,
        generator: Optional[torch.Generator] = None,
        *,
        seed=None,
        step=0,
        image_ids: Optional[torch.Tensor] = None,
        image_sizes: Optional[torch.Tensor] = None,
    ):
        """(source_index, params) for ``num_patches`` patches of every image, on the images' device;
        the random source is ``generator`` or the counter keys, as in ``sample_augment_params``."""
        return self._sample(_as_nhwc(images), num_patches, generator, seed, step, image_ids, image_sizes)

    def apply(self, images: torch.Tensor, source_index: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Patches (P, 3, S, S) for given parameters. Checks their values first (one host synchronisation)."""
        images_nhwc = _as_nhwc(images)
        _check_params(images_nhwc, source_index, params, check_values=True)
        return self._run_backend(images_nhwc, source_index, params)

    def forward(
        self,
        images: torch.Tensor,
        num_patches: int,
        generator: Optional[torch.Generator] = None,
        *,
        seed=None,
        step=0,
        image_ids: Optional[torch.Tensor] = None,
        image_sizes: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        images_nhwc = _as_nhwc(images)
        source_index, params = self._sample(images_nhwc, num_patches, generator, seed, step, image_ids, image_sizes)
        return self._run_backend(images_nhwc, source_index, params)  # valid by construction: no value check, no sync
