"""Multi-patch augmentation (SPEC.md section 4): recipes, parameter sampling, the module.

Sampling and applying are separate. ``sample_augment_params`` draws every random choice
of every patch on the device, vectorised, from a ``torch.Generator`` or from counter-based random numbers (a hash of seed,
step, image, patch and draw: ``counter_uniforms``), into a float32 tensor
(P, NUM_PARAMS) laid out as in ``empssl.augment_params``. A backend (reference, Triton,
CUDA, CPU C++) is a deterministic function of (images, source_index, params, config), so
every backend gives the same patches for the same parameters. ``MultiPatchAugment`` is the
public entry point: it validates its inputs, samples, and calls the op, whose backends and
dispatch are in ``empssl.ops.augment``.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import torch
from torch import nn

from . import augment_params as AP
from . import backends
from .ops import augment as augment_op

OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """One augmentation recipe. The defaults are the CIFAR recipe of SPEC.md section 4.

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
                raise ValueError(f"AugmentConfig.{name} must be a range (low, high) with 0 < low <= high, got {(low, high)}")
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
        if any(s <= 0 for s in self.std):
            raise ValueError(f"AugmentConfig.std must be positive, got {self.std!r}")


# ---------------------------------------------------------------------------------------------
# Sampling


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


def _crop_uniform_count(scale: Tuple[float, float], ratio: Tuple[float, float]) -> int:
    """Uniforms one box consumes: 2 for the position, plus 2 per attempt unless the size is fixed."""
    return 2 if _fixed_crop_size(1, scale, ratio) is not None else 2 + 2 * _CROP_ATTEMPTS


def _constant_columns(like: torch.Tensor, values) -> torch.Tensor:
    """(len(like), len(values)): every row equal to ``values``, made by fills (no host-to-device copy)."""
    return torch.stack([torch.full_like(like, float(v)) for v in values], dim=1)


def _crop_boxes_from_uniforms(u: torch.Tensor, image_height: int, image_width: int,
                              scale: Tuple[float, float], ratio: Tuple[float, float]) -> torch.Tensor:
    """Boxes (see ``sample_crop_boxes``) from float64 uniforms ``u`` of shape (num_boxes, _crop_uniform_count).

    Every constant is a Python scalar and every result a new tensor (no copies of Python data to
    the device, no writes into views), so the function is one traceable graph with no host sync.
    """
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
    aspect = (u[:, attempts:2 * attempts] * (log_high - log_low) + log_low).exp()
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


# ---------------------------------------------------------------------------------------------
# Counter-based random numbers: no generator state, so a CUDA graph replays them and an image's
# draws do not depend on which process or which slice of the batch samples it.

_MASK64 = (1 << 64) - 1


def _int64(value: int) -> int:
    """The signed 64-bit integer with the low 64 bits of ``value`` (what an int64 tensor holds)."""
    value &= _MASK64
    return value - (1 << 64) if value >= 1 << 63 else value


_GOLDEN = _int64(0x9E3779B97F4A7C15)  # splitmix64's increment; odd, so multiplying by it is a bijection
_MIX_1, _MIX_2 = _int64(0xBF58476D1CE4E5B9), _int64(0x94D049BB133111EB)


def _wrap64(x):
    """int64 tensors wrap by themselves; Python ints are brought back into [-2^63, 2^63)."""
    return x if isinstance(x, torch.Tensor) else _int64(x)


def _shift_right(x, bits: int):
    """Logical right shift of signed 64-bit words: the arithmetic shift with the copied sign bits masked off."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def _mix64(x):
    """splitmix64's finaliser, a bijection of 64-bit words, on int64 tensors and Python ints alike
    (the same bits either way, so constant keys fold into Python scalars)."""
    x = _wrap64(x)
    x = x ^ _shift_right(x, 30)
    x = _wrap64(x * _MIX_1)
    x = x ^ _shift_right(x, 27)
    x = _wrap64(x * _MIX_2)
    return x ^ _shift_right(x, 31)


def _absorb(state, word):
    """A new state from ``state`` and one key word: word ``word`` of the splitmix64 stream seeded by ``state``."""
    return _mix64(_wrap64(state + _wrap64(word * _GOLDEN)))


def _check_int_key(value, name: str, device: torch.device) -> None:
    if isinstance(value, torch.Tensor):
        if value.dtype != torch.int64 or value.ndim != 0:
            raise ValueError(f"{name} must be an int or a 0-d int64 tensor, got {value.dtype} of shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name} is on {value.device} but the parameters are sampled on {device}")
    elif not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a 0-d int64 tensor, got {type(value).__name__}")


def _check_counter_keys(seed, step, image_ids, num_images: int, device: torch.device) -> None:
    _check_int_key(seed, "seed", device)
    _check_int_key(step, "step", device)
    if image_ids is None:
        return
    if not isinstance(image_ids, torch.Tensor):
        raise TypeError(f"image_ids must be a 1-D int64 tensor or None, got {type(image_ids).__name__}")
    if image_ids.dtype != torch.int64 or image_ids.shape != (num_images,):
        raise ValueError(f"image_ids must be an int64 tensor of shape ({num_images},), got {image_ids.dtype} of shape {tuple(image_ids.shape)}")
    if image_ids.device != device:
        raise ValueError(f"image_ids is on {image_ids.device} but the parameters are sampled on {device}")


def counter_uniforms(num_images: int, num_patches: int, num_draws: int, seed, step=0, image_ids=None,
                     device=None) -> torch.Tensor:
    """float64 uniforms in [0, 1), (num_patches * num_images, num_draws), patch-major like the
    parameters: row ``i * num_images + j`` holds the draws of patch i of image j.

    Each value is a hash of (seed, step, image_ids[j], i, draw) with 53 random bits: seed and
    step are absorbed into a state, the image id into the image's state, and the image's draws
    are the splitmix64 stream of that state at positions ``i * num_draws + draw``.
    ``seed`` and ``step`` are ints or 0-d int64 tensors (a device tensor lets a captured CUDA graph
    advance the step); ``image_ids`` (default 0..num_images-1) keys each image, e.g. by its
    position in the global batch, so a batch split across processes draws what one process would.
    Plain int64 tensor ops: no generator, no host sync, one traceable graph.
    """
    for value, name in ((num_images, "num_images"), (num_patches, "num_patches"), (num_draws, "num_draws")):
        _check_positive_int(value, name)
    device = _default_device(None, step, image_ids, device)
    _check_counter_keys(seed, step, image_ids, num_images, device)
    if image_ids is None:
        image_ids = torch.arange(num_images, device=device)
    state = _absorb(_mix64(seed), step)  # folded to a Python int when seed and step are ints
    image_state = _absorb(state, image_ids)  # (num_images,)
    position = torch.arange(num_patches * num_draws, device=device).view(num_patches, 1, num_draws)
    words = _absorb(image_state[None, :, None], position)  # (patch, image, draw): patch-major rows
    uniforms = _shift_right(words, 11).to(torch.float64) * 2.0 ** -53  # the top 53 bits: exact in float64
    return uniforms.view(num_patches * num_images, num_draws)


def _draw_uniforms(num_images: int, num_patches: int, num_draws: int, generator, device: torch.device,
                   seed, step, image_ids) -> torch.Tensor:
    """(num_patches * num_images, num_draws) float64 uniforms from the generator or from the counter keys."""
    if seed is None:
        if not (isinstance(step, int) and step == 0 and image_ids is None):
            raise ValueError("step and image_ids are keys of the counter-based source: pass seed as well")
        return torch.rand(num_images * num_patches, num_draws, dtype=torch.float64, generator=generator, device=device)
    if generator is not None:
        raise ValueError("pass either generator or seed (the counter-based source), not both")
    return counter_uniforms(num_images, num_patches, num_draws, seed, step, image_ids, device)


def _default_device(generator, step, image_ids, device) -> torch.device:
    if device is None:
        for source in (image_ids, step):
            if isinstance(source, torch.Tensor):
                return source.device
        device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    return torch.device(device)


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
    _check_positive_int(num_boxes, "num_boxes")
    device = _default_device(generator, step, image_ids, device)
    _check_generator(generator, device)
    u = _draw_uniforms(num_boxes, 1, _crop_uniform_count(scale, ratio), generator, device, seed, step, image_ids)
    return _crop_boxes_from_uniforms(u, image_height, image_width, scale, ratio)


def _check_positive_int(value, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")


def _check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if torch.device(generator.device).type != device.type or (
        device.index is not None and torch.device(generator.device).index not in (None, device.index)
    ):
        raise ValueError(f"generator is on {generator.device} but the parameters are sampled on {device}")


# The order in which sample_augment_params concatenates its columns: the layout of augment_params.
_PARAM_COLUMNS = (AP.CROP_TOP, AP.CROP_LEFT, AP.CROP_HEIGHT, AP.CROP_WIDTH, AP.FLIP, AP.JITTER,
                  AP.BRIGHTNESS, AP.CONTRAST, AP.SATURATION, AP.HUE, AP.ORDER_0, AP.ORDER_1, AP.ORDER_2,
                  AP.ORDER_3, AP.GRAYSCALE, AP.BLUR_SIGMA, AP.SOLARIZE)
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

    Drawn on ``device`` (default: the device of image_ids or step, else the generator's, else
    CPU) with no host synchronisation and no copy of Python data to the device; with ``seed``
    it traces as one graph under ``torch.compile(fullgraph=True)``.
    """
    if not isinstance(config, AugmentConfig):
        raise TypeError(f"config must be an AugmentConfig, got {type(config).__name__}")
    for value, name in ((num_images, "num_images"), (num_patches, "num_patches"),
                        (image_height, "image_height"), (image_width, "image_width")):
        _check_positive_int(value, name)
    device = _default_device(generator, step, image_ids, device)
    _check_generator(generator, device)

    # one float64 draw per call: the crop's uniforms, then 5 gates, 4 jitter factors, 4 order keys, 1 sigma
    crop_uniforms = _crop_uniform_count(config.crop_scale, config.crop_ratio)
    u = _draw_uniforms(num_images, num_patches, crop_uniforms + 14, generator, device, seed, step, image_ids)
    boxes = _crop_boxes_from_uniforms(u[:, :crop_uniforms], image_height, image_width,
                                      config.crop_scale, config.crop_ratio)
    gate_p, factor_low, factor_span = _sampling_constants(config)
    gate = [u[:, crop_uniforms + k:crop_uniforms + k + 1] < gate_p[k] for k in range(5)]  # flip, jitter, grayscale, blur, solarize
    # brightness, contrast, saturation factors in [max(0, 1 - s), 1 + s]; hue shift in [-hue, hue]
    factors = [u[:, crop_uniforms + 5 + k:crop_uniforms + 6 + k] * factor_span[k] + factor_low[k] for k in range(4)]
    # a uniformly random permutation of the four ops per patch (torch.randperm(4) in torchvision)
    order = torch.argsort(u[:, crop_uniforms + 9:crop_uniforms + 13], dim=1)
    sigma_low, sigma_high = config.blur_sigma
    sigma = (u[:, crop_uniforms + 13:] * (sigma_high - sigma_low) + sigma_low) * gate[3]  # 0 where the blur gate is off
    columns = [boxes, gate[0], gate[1], *factors, order, gate[2], sigma, gate[4]]  # in _PARAM_COLUMNS order
    params = torch.cat(columns, dim=1).to(torch.float32)  # cat promotes the flags and the order to float64
    source_index = torch.arange(num_images, device=device).repeat(num_patches)
    return source_index, params


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
    if images.shape[1] == 3:
        nhwc = images.permute(0, 2, 3, 1)
    elif images.shape[3] == 3:
        nhwc = images
    else:
        raise ValueError(
            f"images must have 3 colour channels, as shape (B, H, W, 3) or (B, 3, H, W), got shape {tuple(images.shape)}"
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
        raise ValueError(f"source_index must be a non-empty 1-D int64 tensor, got {source_index.dtype} of shape {tuple(source_index.shape)}")
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
        f"top + height <= {height}, left + width <= {width})": (top >= 0) & (left >= 0) & (h >= 1) & (w >= 1)
        & (top + h <= height) & (left + w <= width),
        "FLIP/JITTER/GRAYSCALE/SOLARIZE flags not 0 or 1": ((flags == 0) | (flags == 1)).all(dim=1),
        "ORDER_0..3 not a permutation of 0..3": (torch.sort(order, dim=1).values == identity_order).all(dim=1),
        "brightness/contrast/saturation factor negative": (factors >= 0).all(dim=1) & torch.isfinite(factors).all(dim=1),
        "hue shift outside [-0.5, 0.5]": (params[:, AP.HUE] >= -0.5) & (params[:, AP.HUE] <= 0.5),
        "BLUR_SIGMA negative": (params[:, AP.BLUR_SIGMA] >= 0) & torch.isfinite(params[:, AP.BLUR_SIGMA]),
    }
    bad = ~torch.stack(list(checks.values()), dim=1)
    any_bad, first_bad = torch.stack((bad.any(dim=0).long(), bad.long().argmax(dim=0))).tolist()
    for message, failed, index in zip(checks, any_bad, first_bad):
        if failed:
            raise ValueError(f"{message}: first bad patch is {index}")


class MultiPatchAugment(nn.Module):
    """Cut ``num_patches`` augmented patches from every image of a uint8 batch (SPEC.md section 4).

    ``images`` is uint8, (B, H, W, 3) or (B, 3, H, W); the layout is told by which dimension
    has size 3, and a batch where both dimension 1 and dimension 3 have size 3 is read as
    (B, 3, H, W). ``augment(images, num_patches, generator=None)`` returns float patches of
    shape (num_patches * B, 3, S, S), patch-major: patch ``i * B + j`` comes from image j.
    ``augment(images, num_patches, seed=..., step=..., image_ids=...)`` draws from the
    counter-based source instead (see ``sample_augment_params``): no generator state, replayable
    by a CUDA graph, independent of how the batch is split.
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
        if backend != "auto" and backend not in backends.BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; choose one of 'auto', " + ", ".join(repr(b) for b in backends.BACKENDS))
        if out_dtype not in OUT_DTYPES:
            raise ValueError(f"out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
        self.config, self.backend, self.out_dtype, self.channels_last = config, backend, out_dtype, bool(channels_last)

    def extra_repr(self) -> str:
        return f"config={self.config}, backend={self.backend!r}, out_dtype={self.out_dtype}, channels_last={self.channels_last}"

    def _sample(self, images_nhwc: torch.Tensor, num_patches, generator, seed, step, image_ids):
        _check_positive_int(num_patches, "num_patches")
        _check_generator(generator, images_nhwc.device)
        num_images, height, width, _ = images_nhwc.shape
        return sample_augment_params(self.config, num_images, num_patches, height, width, generator, images_nhwc.device,
                                     seed=seed, step=step, image_ids=image_ids)

    def _run_backend(self, images_nhwc: torch.Tensor, source_index: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        # not named _apply: that is nn.Module's hook for .to() / .float() / .cuda()
        return augment_op.augment_patches(images_nhwc, source_index, params, self.config, self.out_dtype,
                                          self.channels_last, self.backend)

    def sample(self, images: torch.Tensor, num_patches: int, generator: Optional[torch.Generator] = None, *,
               seed=None, step=0, image_ids: Optional[torch.Tensor] = None):
        """(source_index, params) for ``num_patches`` patches of every image, on the images' device;
        the random source is ``generator`` or the counter keys, as in ``sample_augment_params``."""
        return self._sample(_as_nhwc(images), num_patches, generator, seed, step, image_ids)

    def apply(self, images: torch.Tensor, source_index: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Patches (P, 3, S, S) for given parameters. Checks their values first (one host synchronisation)."""
        images_nhwc = _as_nhwc(images)
        _check_params(images_nhwc, source_index, params, check_values=True)
        return self._run_backend(images_nhwc, source_index, params)

    def forward(self, images: torch.Tensor, num_patches: int, generator: Optional[torch.Generator] = None, *,
                seed=None, step=0, image_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
        images_nhwc = _as_nhwc(images)
        source_index, params = self._sample(images_nhwc, num_patches, generator, seed, step, image_ids)
        return self._run_backend(images_nhwc, source_index, params)  # valid by construction: no value check, no sync
