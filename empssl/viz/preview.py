"""``empssl preview``: the augmented patches of a few images next to the originals (docs/training.md section 11).

The patches are the trainer's: the recipe for the images' size, the backend ``--augment-backend`` resolves to on
the device (named in the output), and the counter-based random numbers keyed by (seed, step, image index), so
``--step S`` shows the patches training step S cut from those images (when they are in its batch).
"""

from __future__ import annotations

from typing import List, Tuple

import torch

from .. import backends
from ..augment import params as AP
from ..augment.config import AugmentConfig
from ..augment.multipatch import MultiPatchAugment
from .common import ImageSet, to_display
from .grids import GridLayout, draw_grid, scale_for

PARAM_COLUMNS = tuple(name.lower() for name in list(AP.constants())[: AP.NUM_PARAMS])  # the layout's column names
# (column, caption) of the random choices a patch's caption lists when they fired
_FIRED = (
    (AP.FLIP, "flip"),
    (AP.JITTER, "jitter"),
    (AP.GRAYSCALE, "gray"),
    (AP.BLUR_SIGMA, "blur"),
    (AP.SOLARIZE, "sol"),
)


def augmentation_preview(
    images: ImageSet,
    recipe: AugmentConfig,
    backend: str,
    num_patches: int,
    seed: int,
    step: int,
    out_dtype: torch.dtype = torch.float32,
) -> Tuple[object, GridLayout, List[list], str, torch.Tensor]:
    """(PIL picture, its layout, CSV rows, the backend that cut the patches, the patches (P, 3, S, S) patch-major)
    for ``images`` (their ``keys``, their indices in their split, key their random numbers). Row j shows
    image j, then its ``num_patches`` patches; CSV rows: image, name, patch, then the patch's parameters
    (PARAM_COLUMNS)."""
    pixels, image_ids = images.images, images.keys
    device = pixels.device
    channels_last = device.type == "cuda"
    sampler = MultiPatchAugment(recipe, backend=backend, out_dtype=out_dtype, channels_last=channels_last)
    source_index, params = sampler.sample(
        pixels, num_patches, seed=seed, step=step, image_ids=image_ids, image_sizes=images.sizes
    )
    name = backends.select_backend("augment", backend, device, pixels, source_index, params, recipe)
    patches = MultiPatchAugment(recipe, backend=name, out_dtype=out_dtype, channels_last=channels_last).apply(
        pixels, source_index, params
    )
    shown = to_display(patches, recipe.mean, recipe.std)
    count = len(images)
    layout = GridLayout(
        rows=count, columns=num_patches + 1, cell=recipe.output_size * scale_for(recipe.output_size), separated=(0,)
    )
    originals = pixels.cpu().numpy()
    labels = images.label_names()
    table = params.cpu().tolist()
    grid, captions, rows = [], [], []
    for j in range(count):
        grid.append([originals[j]] + [shown[i * count + j] for i in range(num_patches)])
        captions.append([labels[j] or f"image {int(image_ids[j])}"])
        for i in range(num_patches):
            row = table[i * count + j]
            captions[-1].append(" ".join(text for column, text in _FIRED if row[column] != 0))
            rows.append([int(image_ids[j]), images.names[j], i, *row])
    return draw_grid(layout, grid, captions=captions), layout, rows, name, patches


PREVIEW_COLUMNS = ("image", "name", "patch", *PARAM_COLUMNS)
