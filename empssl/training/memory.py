"""How much memory a training step needs, estimated before anything is allocated on the device.

The encoder runs once on the ``meta`` device (no memory, no compute) under a saved-tensor hook at two
batch sizes: the difference is what backward keeps per patch (activations), the rest is per step
(weights that are saved by reference, not copies, so not counted). Weights, gradients, momentum and
LARS's scratch, the patches and a margin for workspaces and the allocator's slack are added. The
estimate is an upper bound within tens of percent, enough to refuse a cell that cannot fit before a
sweep spends hours on the cells before it.
"""

from __future__ import annotations

import dataclasses
import functools

import torch

from ..device import available_memory, gib

MARGIN = 1.25  # cuDNN workspaces, the caching allocator's rounding and fragmentation
OPTIMIZER_COPIES = 4  # weight, gradient, momentum, LARS's per-step scratch: each the size of the weights


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Bytes a training step needs: ``per_patch`` times the patches of a step, plus ``fixed``."""

    per_patch: int
    fixed: int
    patches: int

    @property
    def total(self) -> int:
        return int(MARGIN * (self.per_patch * self.patches + self.fixed))

    def largest_num_patches(self, available: int, batch_size: int) -> int:
        """The most patches per image whose step fits in ``available`` bytes (0 if not even one)."""
        room = available / MARGIN - self.fixed
        return max(0, int(room // (self.per_patch * batch_size)))


@functools.lru_cache(maxsize=None)
def _saved_bytes_per_patch(arch: str, width: float, hidden_dim: int, z_dim: int, image_size: int) -> int:
    from torch.autograd.graph import saved_tensors_hooks

    from ..models.encoder import build_encoder

    with torch.device("meta"):  # never allocated: an absurd size is estimated, not attempted
        encoder = build_encoder(arch, width=width, hidden_dim=hidden_dim, z_dim=z_dim)

    def saved(batch: int) -> int:
        total = 0

        def pack(tensor):
            nonlocal total
            total += tensor.numel() * tensor.element_size()
            return tensor

        with saved_tensors_hooks(pack, lambda tensor: tensor):
            encoder(torch.empty(batch, 3, image_size, image_size, device="meta"))
        return total

    return (saved(8) - saved(4)) // 4


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
) -> StepMemory:
    """What one step of this configuration needs (bf16: activations and patches in bfloat16, under autocast)."""
    from ..models.encoder import build_encoder

    activation_scale = 0.5 if bf16 else 1.0  # the hook saw float32 tensors; autocast keeps them in bfloat16
    per_patch = _saved_bytes_per_patch(arch, float(width), int(hidden_dim), int(z_dim), int(image_size))
    patch_bytes = 3 * image_size * image_size * (2 if bf16 else 4)
    with torch.device("meta"):
        weights = sum(
            p.numel() * 4 for p in build_encoder(arch, width=width, hidden_dim=hidden_dim, z_dim=z_dim).parameters()
        )
    embedding_bytes = 4 * (z_dim + hidden_dim) * 4  # z, its gradient and the loss's float32 copies, per patch
    return StepMemory(
        per_patch=int(per_patch * activation_scale) + patch_bytes + embedding_bytes,
        fixed=OPTIMIZER_COPIES * weights,
        patches=batch_size * num_patches,
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
            arch=config.arch,
            width=config.width,
            hidden_dim=config.hidden_dim,
            z_dim=config.z_dim,
            image_size=image_size,
            batch_size=local_batch,
            num_patches=config.num_patches,
            bf16=config.bf16 and device.type == "cuda",
        )
    except (RuntimeError, OverflowError, TypeError, ValueError) as err:  # sizes no tensor can have
        raise ValueError(
            f"an encoder of --width {config.width:g} --hidden-dim {config.hidden_dim} --z-dim "
            f"{config.z_dim} cannot be built: its tensors are too large ({str(err).splitlines()[0]})"
        ) from None
    if need.total > available:
        fits = need.largest_num_patches(available, local_batch)
        raise ValueError(
            f"a training step of this configuration needs about {gib(need.total)} on {device} "
            f"(--width {config.width:g} --hidden-dim {config.hidden_dim} --z-dim {config.z_dim}, "
            f"{config.num_patches} patches of {local_batch} images of {image_size}x{image_size}), but "
            f"only {gib(available)} is available: at most {fits} patches per image fit; lower these, "
            f"or use a larger device"
        )
