"""Bag-of-features extraction (docs/method.md section 6): each image as the mean ``pre_feature`` output of T
augmented patches, with the encoder in eval mode; and the whole-image view beside it (``extract_whole_image_features``:
the image resized to the recipe's patch size).

Built to run at device speed: features come from a copy of the encoder with every BatchNorm folded into the
convolution or linear layer before it (``empssl.models.fold``: the pairs found by tracing, so any backbone; one
without such pairs, a LayerNorm transformer, runs as it is; bf16 channels_last on CUDA), in chunks of one fixed
size (the last one padded), from patches of the counter-based augmentation keyed by (seed, split, image index), so
an image's patches do not depend on how the images are chunked or split across processes. Under
``torch.distributed`` (world size > 1) each rank extracts the features of its slice of the images and all ranks
gather them.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from .. import distributed
from ..augment.config import AugmentConfig, augment_config_for
from ..augment.multipatch import MultiPatchAugment
from ..config import EvalConfig
from ..data.batches import take_images
from ..device import cudnn_benchmark
from ..models.fold import fold_batchnorm
from ..models.fused import fuse_conv_epilogues

DEFAULTS = EvalConfig()  # the recipe's settings: the defaults below are read from here


# patches per encoder forward: large on a GPU; on a CPU smaller chunks stay in cache (1371 vs 972
# patches/s for 512 vs 8192 16x16 patches, width 0.25, 2-core CPU)
MAX_PATCHES_PER_FORWARD = {"cuda": 8192, "cpu": 1024}


# the counter-based augmentation's ``step`` key of each split: train and test image k get different patches
SPLIT_KEYS = {"train": 0, "test": 1}


def forward_bytes_per_patch(encoder: torch.nn.Module, image_size: int) -> Optional[int]:
    """An upper bound of the bytes a no-grad forward of ``encoder`` holds per patch of ``image_size``: twice the
    largest input plus output of one layer per patch (a residual keeps its input alive), in float32, plus the patch.
    Measured by one forward on the meta device (no memory, no compute); None if the encoder does not run there."""
    from torch.func import functional_call

    named = [*encoder.named_parameters(), *encoder.named_buffers()]
    on_meta = {name: torch.empty_like(tensor, device="meta") for name, tensor in named}
    peak = 0

    def record(module, inputs, output):
        nonlocal peak
        peak = max(peak, sum(t.numel() for t in (*inputs, output) if isinstance(t, torch.Tensor)))

    leaves = [module for module in encoder.modules() if not list(module.children())]
    handles = [module.register_forward_hook(record) for module in leaves]
    try:
        with torch.no_grad():
            functional_call(encoder, on_meta, (torch.empty(2, 3, image_size, image_size, device="meta"),))
    except Exception:  # an encoder with host-side logic the meta device cannot run: no estimate
        return None
    finally:
        for handle in handles:
            handle.remove()
    return 4 * peak + 4 * 3 * image_size * image_size  # the forward ran 2 patches: twice its peak per patch is 4x


@torch.no_grad()
def extract_features(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    num_patches: int = DEFAULTS.num_patches,
    augment: Optional[MultiPatchAugment] = None,
    generator: Optional[torch.Generator] = None,
    bf16: bool = True,
    max_patches_per_forward: Optional[int] = None,
    progress: bool = False,
    description: str = "features",
    *,
    seed: int = DEFAULTS.seed,
    split_key: int = 0,
    fold: bool = True,
    fused_conv: bool = False,
    image_keys: Optional[torch.Tensor] = None,
    image_sizes: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """(N, feature_dim) float32: per image, the mean ``encoder.features`` of ``num_patches`` augmented patches.

    ``images``: uint8 (N, H, W, 3) on the encoder's device, or an ``ImageStore`` (each chunk read from disk and
    moved to ``device``, default the encoder's); ``image_sizes``: int64 (N, 2) on that device, each image's (height,
    width) in its canvas (None: every image fills it). Patch i of image k is drawn from the
    counter-based source keyed by (``seed``, ``split_key``, k, i), or from ``generator`` when one is
    given (then the patches depend on the chunking, and a process group is refused). ``image_keys`` (int64 (N,),
    on the images' device): the k of each image (its index in its split, when ``images`` is a subset of one), so
    that an image gets its patches whatever subset it is embedded in; default: its position in ``images``.
    ``fold``: run a BatchNorm-folded copy of the encoder (``fold_batchnorm``; on CUDA in bf16 when ``bf16``, with the
    patches' memory format; ``fused_conv``: each convolution with its bias, ReLU and residual add in one cuDNN
    kernel, ``models.fused``); otherwise the encoder itself in eval mode (its mode is restored after).
    Chunks hold ``max_patches_per_forward // num_patches`` images (default: ``MAX_PATCHES_PER_FORWARD``
    of the device type; at most a rank's share of the images); the last is padded to that size, so
    every forward has the same shape.
    Under ``torch.distributed`` (world size > 1) each rank extracts its slice and the result is
    gathered: every rank returns the features of all N images.
    """
    if not isinstance(num_patches, int) or num_patches < 1:
        raise ValueError(f"num_patches must be a positive integer, got {num_patches!r}")
    _check_images(images)
    if fused_conv and not fold:
        raise ValueError("fused_conv fuses the BatchNorm-folded encoder's convolutions: it needs fold=True")
    device = _device_of(images, encoder, device)
    if generator is not None and distributed.world_size() > 1:
        raise ValueError(
            "a generator's patches depend on how the images are split across ranks: "
            "under torch.distributed use the counter-based source (seed, no generator)"
        )
    augment = augment or MultiPatchAugment(
        augment_config_for(int(images.shape[1])),
        out_dtype=torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32,
        channels_last=device.type == "cuda",
    )

    def patches_of(batch, image_ids):
        sizes = None if image_sizes is None else image_sizes.index_select(0, image_ids)
        if generator is not None:
            return augment(batch, num_patches, generator=generator, image_sizes=sizes)
        keys = image_ids if image_keys is None else image_keys.index_select(0, image_ids)
        return augment(batch, num_patches, seed=seed, step=split_key, image_ids=keys, image_sizes=sizes)

    return _chunked_features(
        encoder,
        images,
        patches_of,
        num_patches,
        bf16,
        max_patches_per_forward,
        progress,
        description,
        fold,
        fused_conv,
        device,
    )


@torch.no_grad()
def extract_whole_image_features(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    recipe: Optional[AugmentConfig] = None,
    bf16: bool = True,
    max_images_per_forward: Optional[int] = None,
    progress: bool = False,
    description: str = "features",
    *,
    fold: bool = True,
    fused_conv: bool = False,
    image_sizes: Optional[torch.Tensor] = None,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """(N, feature_dim) float32: ``encoder.features`` of each whole image, resized to the patch size of ``recipe``
    (default: the recipe for the images' size) as torchvision's ``Resize`` does (bilinear, antialiased) and
    normalised with the recipe's mean and std: the whole-image view of ``empssl eval --views whole``. The encoder,
    its chunks and the ranks' slices as in ``extract_features``; ``images``, ``image_sizes``, ``device`` and
    ``fused_conv`` too (an image of its own size is resized from its region of the canvas)."""
    _check_images(images)
    if fused_conv and not fold:
        raise ValueError("fused_conv fuses the BatchNorm-folded encoder's convolutions: it needs fold=True")
    recipe = recipe or augment_config_for(int(images.shape[1]))
    device = _device_of(images, encoder, device)
    dtype = torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32
    mean = torch.tensor(recipe.mean, device=device).view(1, 3, 1, 1)
    std = torch.tensor(recipe.std, device=device).view(1, 3, 1, 1)
    size = recipe.output_size

    def whole_images_of(batch, image_ids):
        x = batch.permute(0, 3, 1, 2).float().div_(255)
        if image_sizes is not None:  # each image's own region of its canvas (one resize per image: eval only)
            regions = image_sizes.index_select(0, image_ids).tolist()
            x = torch.cat([_resized(x[k : k + 1, :, :h, :w], size) for k, (h, w) in enumerate(regions)])
        elif tuple(x.shape[2:]) != (size, size):
            x = _resized(x, size)
        x = ((x - mean) / std).to(dtype)
        return x.contiguous(memory_format=torch.channels_last) if device.type == "cuda" else x.contiguous()

    max_per_forward = max_images_per_forward or MAX_PATCHES_PER_FORWARD.get(device.type, 8192)
    return _chunked_features(
        encoder, images, whole_images_of, 1, bf16, max_per_forward, progress, description, fold, fused_conv, device
    )


def _resized(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def _device_of(images, encoder: torch.nn.Module, device: Optional[torch.device]) -> torch.device:
    """Where the features are computed: the images' device; for images in a store, ``device`` or the encoder's."""
    if isinstance(images, torch.Tensor):
        return images.device
    return torch.device(device) if device is not None else next(encoder.parameters()).device


def _check_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.dtype != torch.uint8 or images.shape[0] == 0:
        raise ValueError(f"images must be uint8 (N, H, W, 3) with N > 0, got {images.dtype} {tuple(images.shape)}")


def _chunked_features(
    encoder: torch.nn.Module,
    images: torch.Tensor,
    inputs_of: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    per_image: int,
    bf16: bool,
    max_per_forward: Optional[int],
    progress: bool,
    description: str,
    fold: bool,
    fused_conv: bool = False,
    device: Optional[torch.device] = None,
) -> torch.Tensor:
    """(N, feature_dim) float32 on ``device`` (default: the images'): the mean ``features`` of the ``per_image``
    network inputs ``inputs_of(batch, image_ids)`` makes of each image (patch-major), in equal chunks, each rank its
    slice (``extract_features``)."""
    device = _device_of(images, encoder, device)
    rank, world = distributed.rank(), distributed.world_size()
    on_gpu_bf16 = bf16 and device.type == "cuda"
    if max_per_forward is None:
        max_per_forward = MAX_PATCHES_PER_FORWARD.get(device.type, 8192)
    num_images = images.shape[0]
    # never more than a rank's share of the images: a small set is not padded to a large chunk
    images_per_chunk = max(1, min(max_per_forward // per_image, math.ceil(num_images / world)))
    # this rank's images: a whole number of chunks; ids past the end repeat the last image and are dropped
    per_rank = math.ceil(math.ceil(num_images / world) / images_per_chunk) * images_per_chunk
    if fold:
        network = fold_batchnorm(encoder)
        if device.type == "cuda":
            network = network.to(memory_format=torch.channels_last)
            if on_gpu_bf16:
                network = network.to(torch.bfloat16)
        if fused_conv:
            network = fuse_conv_epilogues(network)
    else:
        network = encoder
    was_training = encoder.training
    network.eval()
    local = None
    from tqdm import tqdm

    try:
        with cudnn_benchmark(device.type == "cuda"):  # one chunk shape: cuDNN's search runs once
            for start in tqdm(
                range(rank * per_rank, (rank + 1) * per_rank, images_per_chunk),
                desc=description,
                unit="chunk",
                disable=not progress,
                leave=False,
            ):
                image_ids = torch.arange(start, start + images_per_chunk, device=device).clamp_(max=num_images - 1)
                inputs = inputs_of(take_images(images, image_ids, device), image_ids)
                if not fold and on_gpu_bf16:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        features = network.features(inputs)
                else:
                    features = network.features(inputs.to(next(network.parameters()).dtype))
                # patch-major: row i * b + j is input i of image j
                mean = features.reshape(per_image, images_per_chunk, -1).mean(0, dtype=torch.float32)
                if local is None:
                    local = torch.empty(per_rank, mean.shape[1], device=device)
                local[start - rank * per_rank : start - rank * per_rank + images_per_chunk] = mean
    finally:
        encoder.train(was_training)
    if world > 1:
        import torch.distributed as dist

        gathered = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(gathered, local)  # equal-size padded slices, in rank order
        local = torch.cat(gathered)
    return local[:num_images]
