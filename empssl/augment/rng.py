"""The uniforms the augmentation sampler draws: counter-based random numbers, or a ``torch.Generator``.

Counter-based numbers (``counter_uniforms``, a splitmix64 hash of seed, step, image, patch and draw)
have no generator state, so a CUDA graph replays them and an image's draws do not depend on which
process or which slice of the batch samples it. ``draw_uniforms`` picks the source the caller asked for.
"""

from __future__ import annotations

import torch

from ..checks import check_positive_int

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
            raise ValueError(
                f"{name} must be an int or a 0-d int64 tensor, got {value.dtype} of shape {tuple(value.shape)}"
            )
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
        raise ValueError(
            f"image_ids must be an int64 tensor of shape ({num_images},), got {image_ids.dtype} of shape "
            f"{tuple(image_ids.shape)}"
        )
    if image_ids.device != device:
        raise ValueError(f"image_ids is on {image_ids.device} but the parameters are sampled on {device}")


def counter_uniforms(
    num_images: int, num_patches: int, num_draws: int, seed, step=0, image_ids=None, device=None
) -> torch.Tensor:
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
        check_positive_int(value, name)
    device = default_device(None, step, image_ids, device)
    _check_counter_keys(seed, step, image_ids, num_images, device)
    if image_ids is None:
        image_ids = torch.arange(num_images, device=device)
    state = _absorb(_mix64(seed), step)  # folded to a Python int when seed and step are ints
    image_state = _absorb(state, image_ids)  # (num_images,)
    position = torch.arange(num_patches * num_draws, device=device).view(num_patches, 1, num_draws)
    words = _absorb(image_state[None, :, None], position)  # (patch, image, draw): patch-major rows
    uniforms = _shift_right(words, 11).to(torch.float64) * 2.0**-53  # the top 53 bits: exact in float64
    return uniforms.view(num_patches * num_images, num_draws)


def draw_uniforms(
    num_images: int, num_patches: int, num_draws: int, generator, device: torch.device, seed, step, image_ids
) -> torch.Tensor:
    """(num_patches * num_images, num_draws) float64 uniforms from the generator or from the counter keys."""
    if seed is None:
        if not (isinstance(step, int) and step == 0 and image_ids is None):
            raise ValueError("step and image_ids are keys of the counter-based source: pass seed as well")
        return torch.rand(num_images * num_patches, num_draws, dtype=torch.float64, generator=generator, device=device)
    if generator is not None:
        raise ValueError("pass either generator or seed (the counter-based source), not both")
    return counter_uniforms(num_images, num_patches, num_draws, seed, step, image_ids, device)


def default_device(generator, step, image_ids, device) -> torch.device:
    """``device``, else the device of image_ids or step (device tensors), else the generator's, else the CPU."""
    if device is None:
        for source in (image_ids, step):
            if isinstance(source, torch.Tensor):
                return source.device
        device = generator.device if isinstance(generator, torch.Generator) else "cpu"
    return torch.device(device)


def check_generator(generator, device: torch.device) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    if torch.device(generator.device).type != device.type or (
        device.index is not None and torch.device(generator.device).index not in (None, device.index)
    ):
        raise ValueError(f"generator is on {generator.device} but the parameters are sampled on {device}")
