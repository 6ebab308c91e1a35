"""The multi-patch augmentation op: patches (P, 3, S, S) from uint8 images, source_index and params, and its backends.

A backend is a deterministic function of (images, source_index, params, recipe): every backend gives
the same patches for the same parameters (empssl.augment samples them). Ops (each with a fake, so a
compiled training step traces through the augmentation), both taking the same arguments:

- ``empssl::augment_patches``: the compiled extension (schema in csrc/ops.cpp), CPU kernel
  csrc/cpu/augment.cpp and CUDA kernel csrc/cuda/augment.cu. Backends "cpu" and "cuda".
- ``empssl::augment_patches_triton``: a ``custom_op`` around kernels/augment.py (``triton_op``
  does not run under torch.compile with the interpreter, see docs/design.md section 3). Backend "triton".

The reference (empssl/reference/augment.py) is backend "reference". The ops take the few fields of
the recipe the kernels read (``KernelConfig``; a dataclass cannot cross the torch.library boundary);
sampling ranges stay with the sampler. ``augment_patches`` dispatches: the backend is resolved once
per (request, device, image layout, patch count, KernelConfig). The recipe (``AugmentConfig``) comes
from empssl.augment.config.
"""

from __future__ import annotations

import functools
from typing import List, NamedTuple, Optional, Tuple

import torch

from .. import backends
from ..augment import params as AP
from ..augment.config import AugmentConfig
from ..reference import augment as reference_augment

EXTENSION_OP = "empssl::augment_patches"
TRITON_OP = "empssl::augment_patches_triton"

# Limits of the CUDA kernel (csrc/cuda/augment.cu): one block per 32x32 output tile holds the tile
# with its blur halo and resampling tables in shared memory; within these limits that is at most
# about 70 KiB, which every GPU from sm_80 on offers per block.
CUDA_MAX_BLUR_KERNEL_SIZE = 31
CUDA_MAX_DOWNSCALE = 16  # image side <= 16 * output_size (resampling taps per output pixel)


class KernelConfig(NamedTuple):
    """The fields of an AugmentConfig that the kernels and their checks read: constants, so a torch.compile
    trace can key the backend choice by them (as a plain tuple: a named tuple made a constant by Dynamo lost its
    fields) and the ops can take them as plain arguments."""

    output_size: int
    blur_kernel_size: int
    solarize_threshold: float
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    jitter_ops: int  # bit k set when ColorJitter op k (augment_params.OP_*) has a non-zero strength

    @classmethod
    def of(cls, config) -> "KernelConfig":
        return cls(
            int(config.output_size),
            int(config.blur_kernel_size),
            float(config.solarize_threshold),
            tuple(float(m) for m in config.mean),
            tuple(float(s) for s in config.std),
            int(config.jitter_op_mask()),
        )

    def jitter_op_mask(self) -> int:
        return self.jitter_ops


def _op_arguments(config) -> tuple:
    """The recipe arguments of both ops, after (images, source_index, params) and before (out_dtype, channels_last)."""
    kernel = KernelConfig.of(config)
    return (
        kernel.output_size,
        kernel.blur_kernel_size,
        kernel.solarize_threshold,
        list(kernel.mean),
        list(kernel.std),
        kernel.jitter_ops,
    )


def _fake_patches(
    images,
    source_index,
    params,
    output_size,
    blur_kernel_size,
    solarize_threshold,
    mean,
    std,
    jitter_op_mask,
    out_dtype,
    channels_last,
):
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return torch.empty(
        (params.shape[0], 3, output_size, output_size),
        dtype=out_dtype,
        device=images.device,
        memory_format=memory_format,
    )


# ---- the Triton kernel as a custom op ------------------------------------------------------


def _triton_module():
    return backends.triton_kernel_module("augment", "augment", ("augment_patches", "unsupported_reason"))


@torch.library.custom_op(TRITON_OP, mutates_args=())
def augment_patches_triton(
    images: torch.Tensor,
    source_index: torch.Tensor,
    params: torch.Tensor,
    output_size: int,
    blur_kernel_size: int,
    solarize_threshold: float,
    mean: List[float],
    std: List[float],
    jitter_op_mask: int,
    out_dtype: torch.dtype,
    channels_last: bool,
) -> torch.Tensor:
    module, reason = _triton_module()
    if module is None:
        raise backends.BackendUnavailableError(reason)
    kernel_config = KernelConfig(
        output_size, blur_kernel_size, solarize_threshold, tuple(mean), tuple(std), jitter_op_mask
    )
    return module.augment_patches(images, source_index, params, kernel_config, out_dtype, channels_last)


augment_patches_triton.register_fake(_fake_patches)

# the extension defines its op when it loads (here, if it is built); its fake is registered with it
_EXTENSION_REASON = backends.extension_op_reason("augment_patches")
if _EXTENSION_REASON is None:
    torch.library.register_fake(EXTENSION_OP)(_fake_patches)


# ---- the backends: what each takes and why it refuses ------------------------------------


def _recipe_reason(images_nhwc, config) -> Optional[str]:
    """Reasons shared by every fast backend (the reference handles these inputs)."""
    if config.blur_kernel_size // 2 >= config.output_size:
        return (
            f"blur_kernel_size {config.blur_kernel_size} needs output_size > {config.blur_kernel_size // 2} "
            f"(reflect padding), got {config.output_size}"
        )
    if images_nhwc.dim() != 4 or images_nhwc.shape[-1] != 3 or images_nhwc.dtype != torch.uint8:
        return f"images must be a uint8 (N, H, W, 3) view, got {images_nhwc.dtype} {tuple(images_nhwc.shape)}"
    return None


def cpu_reason(device, images_nhwc, source_index, params, config) -> Optional[str]:
    device = torch.device(device)
    return backends.cpu_extension_reason(device) or _EXTENSION_REASON or _recipe_reason(images_nhwc, config)


def cuda_reason(device, images_nhwc, source_index, params, config) -> Optional[str]:
    device = torch.device(device)
    reason = backends.cuda_extension_reason(device) or _EXTENSION_REASON or _recipe_reason(images_nhwc, config)
    if reason:
        return reason
    if config.blur_kernel_size > CUDA_MAX_BLUR_KERNEL_SIZE:
        return (
            f"the CUDA augment kernel keeps a tile and its blur halo in shared memory: "
            f"blur_kernel_size <= {CUDA_MAX_BLUR_KERNEL_SIZE}, got {config.blur_kernel_size}"
        )
    largest_side = max(images_nhwc.shape[1], images_nhwc.shape[2])
    if largest_side > CUDA_MAX_DOWNSCALE * config.output_size:
        return (
            f"the CUDA augment kernel keeps its resampling weights in shared memory: image side <= "
            f"{CUDA_MAX_DOWNSCALE} x output_size = {CUDA_MAX_DOWNSCALE * config.output_size}, got {largest_side}"
        )
    if params.shape[0] > 2**31 - 1:
        return (
            f"the CUDA augment kernel launches one block row per patch: at most 2^31 - 1 patches, got {params.shape[0]}"
        )
    return None


def triton_reason(device, images_nhwc, source_index, params, config) -> Optional[str]:
    device = torch.device(device)
    reason = backends.triton_reason(device)
    if reason:
        return reason
    module, reason = _triton_module()
    if module is None:
        return reason
    return module.unsupported_reason(device, images_nhwc, source_index, params, config)


def _fused_patches(
    op_name: str, images_nhwc, source_index, params, config, out_dtype=torch.float32, channels_last=False
) -> torch.Tensor:
    op = getattr(torch.ops.empssl, op_name)  # looked up per call: the extension's op exists once it is loaded
    return op(images_nhwc, source_index, params, *_op_arguments(config), out_dtype, bool(channels_last))


_extension_patches = functools.partial(_fused_patches, "augment_patches")
_triton_patches = functools.partial(_fused_patches, "augment_patches_triton")

BACKENDS = {
    "cuda": backends.Backend(
        f"CUDA; uint8 images of any strides; blur_kernel_size <= {CUDA_MAX_BLUR_KERNEL_SIZE}, image side <= "
        f"{CUDA_MAX_DOWNSCALE} x output_size (shared memory per tile)",
        cuda_reason,
        _extension_patches,
    ),
    "triton": backends.Backend(
        "CUDA (CPU under TRITON_INTERPRET=1); uint8 images with int32 strides; output_size <= 64 (a whole "
        "patch in one program's registers)",
        triton_reason,
        _triton_patches,
    ),
    "cpu": backends.Backend("CPU; uint8 images of any strides, any size", cpu_reason, _extension_patches),
    "reference": backends.Backend(
        "any device; any recipe (torch ops, chunked over patches)",
        lambda device, images_nhwc, source_index, params, config: None,
        reference_augment.apply_augment,
    ),
}
BACKEND_CHOICES = backends.choices(BACKENDS)  # what backend= and --augment-backend accept


def _stand_ins(
    device: torch.device, dtype: torch.dtype, shape: tuple, stride: tuple, num_patches: int, config_fields: tuple
) -> tuple:
    images = torch.empty_strided(shape, stride, dtype=dtype, device=device)
    source_index = torch.empty((num_patches,), dtype=torch.int64, device=device)
    params = torch.empty((num_patches, AP.NUM_PARAMS), dtype=torch.float32, device=device)
    return images, source_index, params, KernelConfig(*config_fields)


def _example_inputs() -> tuple:
    """Typical inputs for `empssl info`: 100 CIFAR images, 20 patches each, the CIFAR recipe."""
    count = 20 * 100
    return (
        torch.zeros(100, 32, 32, 3, dtype=torch.uint8),
        torch.zeros(count, dtype=torch.int64),
        torch.zeros(count, AP.NUM_PARAMS),
        AugmentConfig.cifar(),
    )


backends.register_op("augment", BACKENDS, _stand_ins, example=_example_inputs)


def augment_patches(
    images_nhwc: torch.Tensor,
    source_index: torch.Tensor,
    params: torch.Tensor,
    config,
    out_dtype: torch.dtype,
    channels_last: bool,
    backend: str = "auto",
) -> torch.Tensor:
    """Patches (P, 3, S, S) for inputs validated by the caller (empssl.augment.MultiPatchAugment), through
    ``backend`` or the first that fits. ``config`` is an AugmentConfig. In a torch.compile trace the recipe's
    fields key the choice as constants: automatic dynamic shapes keep them so, but ``dynamic=True`` makes its
    floats symbolic, which Dynamo refuses there (a graph break; an error with fullgraph=True)."""
    name = backends.resolve(
        "augment",
        backend,
        images_nhwc.device,
        images_nhwc.dtype,
        backends.static_sizes(images_nhwc.shape),
        backends.static_sizes(images_nhwc.stride()),
        backends.static_sizes(params.shape[:1])[0],
        tuple(KernelConfig.of(config)),
    )
    return backends.get_backend("augment", name).run(
        images_nhwc, source_index, params, config, out_dtype, channels_last
    )
