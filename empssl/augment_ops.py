"""The fast augmentation backends as torch.library ops, registered with ``empssl.augment``.

- ``empssl::augment_patches``: the compiled extension (csrc/ops.cpp), whose CPU kernel is
  csrc/cpu/augment.cpp and CUDA kernel csrc/cuda/augment.cu. Backends "cpu" and "cuda".
- ``empssl::augment_patches_triton``: a ``custom_op`` around kernels/augment.py (``triton_op``
  does not run under torch.compile with the interpreter, see DESIGN.md). Backend "triton".

Both get a fake implementation, so a compiled training step traces through the augmentation.
The ops take the few configuration fields the kernels read (a dataclass cannot cross the
torch.library boundary); sampling ranges stay with the sampler.
"""
from __future__ import annotations

import functools
from typing import List, Optional

import torch

from . import backends
from .augment import register_augment_backend

EXTENSION_OP = "empssl::augment_patches"
TRITON_OP = "empssl::augment_patches_triton"

# Limits of the CUDA kernel (csrc/cuda/augment.cu): one block per 32x32 output tile holds the tile
# with its blur halo and resampling tables in shared memory; within these limits that is at most
# about 70 KiB, which every GPU from sm_80 on offers per block.
CUDA_MAX_BLUR_KERNEL_SIZE = 31
CUDA_MAX_DOWNSCALE = 16  # image side <= 16 * output_size (resampling taps per output pixel)


def _fake_patches(images, source_index, params, output_size, blur_kernel_size, solarize_threshold, mean, std,
                  jitter, out_dtype, channels_last):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty((params.shape[0], 3, output_size, output_size), dtype=out_dtype, device=images.device,
                       memory_format=memory_format)


def _config_reason(images_nhwc, config) -> Optional[str]:
    """Reasons shared by every fast backend (the reference handles these inputs)."""
    if config.blur_kernel_size // 2 >= config.output_size:
        return (f"blur_kernel_size {config.blur_kernel_size} needs output_size > {config.blur_kernel_size // 2} "
                f"(reflect padding), got {config.output_size}")
    if images_nhwc.dim() != 4 or images_nhwc.shape[-1] != 3 or images_nhwc.dtype != torch.uint8:
        return f"images must be a uint8 (N, H, W, 3) view, got {images_nhwc.dtype} {tuple(images_nhwc.shape)}"
    return None


# ---- the compiled extension --------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _extension_op_reason() -> Optional[str]:
    """None once the extension op is loaded and its fake registered, else why it cannot be."""
    reason = backends.extension_op_reason("augment_patches")
    if reason:
        return reason
    torch.library.register_fake(EXTENSION_OP)(_fake_patches)
    return None


def _extension_patches(images_nhwc, source_index, params, config, out_dtype=torch.float32, channels_last=False):
    reason = _extension_op_reason()
    if reason:
        raise backends.BackendUnavailableError(reason)
    return torch.ops.empssl.augment_patches(
        images_nhwc, source_index, params, config.output_size, config.blur_kernel_size,
        float(config.solarize_threshold), [float(m) for m in config.mean], [float(s) for s in config.std],
        config.jitter_op_mask(), out_dtype, bool(channels_last),
    )


def cpu_reason(device, images_nhwc, source_index, params, config) -> Optional[str]:
    device = torch.device(device)
    return backends.cpu_extension_reason(device) or _extension_op_reason() or _config_reason(images_nhwc, config)


def cuda_reason(device, images_nhwc, source_index, params, config) -> Optional[str]:
    device = torch.device(device)
    reason = backends.cuda_extension_reason(device) or _extension_op_reason() or _config_reason(images_nhwc, config)
    if reason:
        return reason
    if config.blur_kernel_size > CUDA_MAX_BLUR_KERNEL_SIZE:
        return (f"the CUDA augment kernel keeps a tile and its blur halo in shared memory: "
                f"blur_kernel_size <= {CUDA_MAX_BLUR_KERNEL_SIZE}, got {config.blur_kernel_size}")
    largest_side = max(images_nhwc.shape[1], images_nhwc.shape[2])
    if largest_side > CUDA_MAX_DOWNSCALE * config.output_size:
        return (f"the CUDA augment kernel keeps its resampling weights in shared memory: image side <= "
                f"{CUDA_MAX_DOWNSCALE} x output_size = {CUDA_MAX_DOWNSCALE * config.output_size}, got {largest_side}")
    if params.shape[0] > 2**31 - 1:
        return f"the CUDA augment kernel launches one block row per patch: at most 2^31 - 1 patches, got {params.shape[0]}"
    return None


# ---- the Triton kernel -----------------------------------------------------------------------

def _triton_module():
    return backends.triton_kernel_module("augment", "augment", ("augment_patches", "unsupported_reason"))


@torch.library.custom_op(TRITON_OP, mutates_args=())
def augment_patches_triton(
    images: torch.Tensor, source_index: torch.Tensor, params: torch.Tensor, output_size: int, blur_kernel_size: int,
    solarize_threshold: float, mean: List[float], std: List[float], jitter: List[float], out_dtype: torch.dtype,
    channels_last: bool,
) -> torch.Tensor:
    module, reason = _triton_module()
    if module is None:
        raise backends.BackendUnavailableError(reason)
    from .augment import AugmentConfig  # the op's arguments are plain values: rebuild the fields the kernel reads

    brightness, contrast, saturation, hue = jitter
    kernel_config = AugmentConfig(
        output_size=output_size, blur_kernel_size=blur_kernel_size, solarize_threshold=solarize_threshold,
        mean=tuple(mean), std=tuple(std), brightness=brightness, contrast=contrast, saturation=saturation, hue=hue,
    )
    return module.augment_patches(images, source_index, params, kernel_config, out_dtype, channels_last)


augment_patches_triton.register_fake(_fake_patches)


def _triton_patches(images_nhwc, source_index, params, config, out_dtype=torch.float32, channels_last=False):
    return augment_patches_triton(
        images_nhwc, source_index, params, config.output_size, config.blur_kernel_size,
        float(config.solarize_threshold), [float(m) for m in config.mean], [float(s) for s in config.std],
        list(config.jitter_strengths()), out_dtype, bool(channels_last),
    )


def triton_reason(device, images_nhwc, source_index, params, config) -> Optional[str]:
    device = torch.device(device)
    reason = backends.triton_reason(device)
    if reason:
        return reason
    module, reason = _triton_module()
    if module is None:
        return reason
    return module.unsupported_reason(device, images_nhwc, source_index, params, config)


register_augment_backend("cpu", _extension_patches, cpu_reason)
register_augment_backend("cuda", _extension_patches, cuda_reason)
register_augment_backend("triton", _triton_patches, triton_reason)
