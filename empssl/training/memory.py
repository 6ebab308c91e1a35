"""How much memory a training step needs, estimated before anything is allocated on the device.

The encoder runs once on the ``meta`` device (no memory, no compute) under a saved-tensor hook at two
batch sizes: the difference is what backward keeps per patch (activations), the rest is per step
(weights that are saved by reference, not copies, so not counted). Weights, gradients, momentum, the
patches and a margin for workspaces and the allocator's slack are added; the optimiser's step, after the
activations are freed, needs the weights, gradients, momentum and LARS's temporaries. It works for any
backbone (``--arch``) whose ops all have meta kernels, and is an upper bound within 2x of the measured peak (on
the CPU: tests/test_backbone_runs.py::test_the_step_memory_estimate_is_within_its_factor_of_the_measured_peak),
enough to refuse a cell that cannot fit before a sweep spends hours on the cells before it.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Dict

import torch

from ..device import available_memory, gib
from ..models.backbones import BackboneError

MARGIN = 1.25  # cuDNN workspaces, the caching allocator's rounding and fragmentation
# each the size of the weights. In backward: the weights, the last step's gradients (kept until this step's replace
# them), this step's, the momentum. In LARS.step, once the activations are freed: the weights, gradients, momentum
# and three temporaries (each weight's factor spread over its values, the scaled direction, the lr-scaled update).
BACKWARD_COPIES = 4
OPTIMIZER_COPIES = 6


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes a training step needs: ``per_patch`` times the patches of a step plus ``fixed`` in backward, or
    ``optimizer`` in the optimiser's step, whichever is larger."""

    per_patch: int
    fixed: int
    patches: int
    optimizer: int = 0

    @property
    def total(self) -> int:
        return int(MARGIN * max(self.per_patch * self.patches + self.fixed, self.optimizer))

    def largest_num_patches(self, available: int, batch_size: int) -> int:
        """The most patches per image whose step fits in ``available`` bytes (0 if not even one)."""
        if self.optimizer > available / MARGIN:
            return 0
        room = available / MARGIN - self.fixed
        return max(0, int(room // (self.per_patch * batch_size)))


_SAVED_BYTES_PER_PATCH: Dict[str, int] = {}  # by (model config, image size): one meta build per configuration


def _meta_encoder(model_config: Dict[str, Any]):
    from ..models.encoder import build_encoder

    with torch.device("meta"):  # never allocated: an absurd size is estimated, not attempted
        return build_encoder(**model_config)


def _saved_bytes_per_patch(model_config: Dict[str, Any], image_size: int) -> int:
    """Bytes backward keeps per patch (float32), from two meta forwards under a saved-tensor hook."""
    from torch.autograd.graph import saved_tensors_hooks

    key = repr((sorted(model_config.items()), image_size))
    if key in _SAVED_BYTES_PER_PATCH:
        return _SAVED_BYTES_PER_PATCH[key]
    encoder = _meta_encoder(model_config)

    def saved(batch: int) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with saved_tensors_hooks(pack, lambda tensor: tensor):
            try:
                encoder(torch.empty(batch, 3, image_size, image_size, device="meta"))
            except NotImplementedError:  # an op without a meta kernel at this size: no estimate (check_step_fits)
                raise
            except (RuntimeError, AssertionError, ValueError, TypeError) as err:
                raise ImageSizeError(
                    f"--arch {model_config['arch']} does not take {image_size}x{image_size} images "
                    f"({str(err).splitlines()[0] if str(err) else type(err).__name__}); a transformer is built for "
                    f"one size: pass it with --backbone-args (timm: img_size={image_size}; torchvision ViTs: "
                    f"image_size={image_size})"
                ) from None
        return total

    _SAVED_BYTES_PER_PATCH[key] = (saved(8) - saved(4)) // 4
    return _SAVED_BYTES_PER_PATCH[key]


class ImageSizeError(ValueError):
    """The backbone does not take the training images' size."""


def estimate_step_memory(
    *,
    arch: str,
    width: float,
    hidden_dim: int,
    z_dim: int,
    image_size: int,
    batch_size: int,
    num_patches: int,
    bf16: bool,
    stem: str = "default",
    backbone_args=None,
) -> StepMemory:
    """What one step of this configuration needs (bf16: activations and patches in bfloat16, under autocast)."""
    from ..models.backbones import parse_backbone_args

    model_config = dict(
        arch=arch,
        width=float(width),
        hidden_dim=int(hidden_dim),
        z_dim=int(z_dim),
        stem=stem,
        backbone_args=parse_backbone_args(backbone_args),
    )
    activation_scale = 0.5 if bf16 else 1.0  # the hook saw float32 tensors; autocast keeps them in bfloat16
    per_patch = _saved_bytes_per_patch(model_config, int(image_size))
    patch_bytes = 3 * image_size * image_size * (2 if bf16 else 4)
    weights = sum(p.numel() * 4 for p in _meta_encoder(model_config).parameters())
    embedding_bytes = 4 * (z_dim + hidden_dim) * 4  # z, its gradient and the loss's float32 copies, per patch
    return StepMemory(
        per_patch=int(per_patch * activation_scale) + patch_bytes + embedding_bytes,
        fixed=BACKWARD_COPIES * weights,
        patches=batch_size * num_patches,
        optimizer=OPTIMIZER_COPIES * weights,
    )


def check_step_fits(config, device: torch.device, image_size: int, world_size: int = 1) -> None:
    """ValueError, before the model is built, if one step of ``config`` (a TrainConfig) cannot fit in ``device``'s
    memory, or its encoder has tensors too large to exist."""
    available = available_memory(device)
    if available is None:
        return
    local_batch = config.batch_size // world_size
    try:
        need = estimate_step_memory(
            **config.model_config(),
            image_size=image_size,
            batch_size=local_batch,
            num_patches=config.num_patches,
            bf16=config.bf16 and device.type == "cuda",
        )
    except (BackboneError, ImageSizeError):  # their messages say what to do
        raise
    except NotImplementedError as err:
        warnings.warn(
            f"the memory a step of --arch {config.arch} needs is not checked before training: an op has no meta "
            f"kernel at {image_size}x{image_size} ({str(err).splitlines()[0] if str(err) else 'NotImplementedError'})"
        )
        return
    except (RuntimeError, OverflowError, TypeError, ValueError) as err:  # sizes no tensor can have
        raise ValueError(
            f"an encoder of --arch {config.arch} --width {config.width:g} --hidden-dim {config.hidden_dim} --z-dim "
            f"{config.z_dim} cannot be built: its tensors are too large ({str(err).splitlines()[0]})"
        ) from None
    if need.total > available:
        fits = need.largest_num_patches(available, local_batch)
        raise ValueError(
            f"a training step of this configuration needs about {gib(need.total)} on {device} "
            f"(--arch {config.arch} --width {config.width:g} --hidden-dim {config.hidden_dim} --z-dim {config.z_dim}, "
            f"{config.num_patches} patches of {local_batch} images of {image_size}x{image_size}), but "
            f"only {gib(available)} is available: at most {fits} patches per image fit; lower these, "
            f"or use a larger device"
        )
