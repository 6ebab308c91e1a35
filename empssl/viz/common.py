"""What the picture commands share (docs/training.md section 11): the images and embeddings they draw from, the
checks of their output files, and atomic PNG and CSV writing.

A picture command reads images from a data set split (``--dataset``, the checkpoint's by default) or from any
folder of image files (``--images DIR``), embeds them as ``empssl eval`` does (the bag of features: the mean
``pre_feature`` output of T augmented patches, from the BatchNorm-folded encoder), and writes a PNG to ``--out``
with the numbers behind it beside it (the same name with ``.csv``). Labels are used where the images have them (a
data set's classes, or the class folders of an image tree) and left out where they do not.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import io
import os
import warnings
from typing import List, Optional, Sequence

import numpy as np
import torch

from ..augment.config import augment_config_for
from ..augment.multipatch import MultiPatchAugment
from ..config import EvalConfig
from ..data.dataset import MAX_DEFAULT_PATCH, DataError, ImageDataset
from ..data.folder import canvas_size, decode_image
from ..data.layouts import IMAGE_EXTENSIONS
from ..evaluation.features import SPLIT_KEYS, extract_features
from ..files import same_file, write_atomically
from ..training.monitor import is_labelled


@dataclasses.dataclass
class ImageSet:
    """Images (N, H, W, 3) uint8 with a name for each (a file path, or ``DATASET:SPLIT/INDEX``), and their labels
    (int64 (N,)) and class names where they have them. Their patches are keyed as ``empssl eval`` keys them:
    ``split_key`` and ``keys`` (each image's index in its split or folder), so that a subset embeds each image as the
    whole set does."""

    images: torch.Tensor
    names: List[str]
    labels: Optional[torch.Tensor]
    classes: List[str]
    split_key: int = 0
    keys: Optional[torch.Tensor] = None  # int64 (N,) on the images' device; None: 0..N-1
    # int64 (N, 2): each image's (height, width) in its canvas, where images keep their own sizes (None: they fill
    # it); the patch size of their recipe (None: the images' size)
    sizes: Optional[torch.Tensor] = None
    patch_size: Optional[int] = None

    def __post_init__(self):
        if self.keys is None:
            self.keys = torch.arange(self.images.shape[0], device=self.images.device)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def subset(self, index: torch.Tensor) -> "ImageSet":
        index = index.cpu()
        return ImageSet(
            self.images.index_select(0, index.to(self.images.device)),
            [self.names[i] for i in index.tolist()],
            None if self.labels is None else self.labels.index_select(0, index.to(self.labels.device)),
            self.classes,
            self.split_key,
            self.keys.index_select(0, index.to(self.keys.device)),
            None if self.sizes is None else self.sizes.index_select(0, index.to(self.sizes.device)),
            self.patch_size,
        )

    def label_names(self) -> List[Optional[str]]:
        if self.labels is None:
            return [None] * len(self)
        return [self.classes[i] if i < len(self.classes) else str(i) for i in self.labels.tolist()]


def split_images(data: ImageDataset, patch_size: Optional[int], split: str) -> ImageSet:
    """One split of a data set (held in memory), with its labels when it has them, its images' sizes and the patch
    size of its recipe (``patch_size``; None: the data set's)."""
    images = getattr(data, f"{split}_images")
    labelled = is_labelled(data)
    return ImageSet(
        images,
        [f"{data.name}:{split}/{index}" for index in range(images.shape[0])],
        getattr(data, f"{split}_labels") if labelled else None,
        list(data.classes) if labelled else [],
        SPLIT_KEYS[split],
        sizes=getattr(data, f"{split}_sizes"),
        patch_size=patch_size or data.recipe_patch_size,
    )


def folder_images(
    path: str,
    image_size: int,
    device,
    progress: bool = False,
    max_aspect: float = 1.0,
    patch_size: Optional[int] = None,
) -> ImageSet:
    """Every image file under ``path`` (any depth, sorted), stored as image trees are (RGB, the shorter side resized
    to ``image_size``, kept up to ``max_aspect``, in the top-left corner of a square canvas) and cut at
    ``patch_size`` (None: the recipe for their size). Labelled by class folder when every image lies in a subfolder
    of ``path`` (a class tree), else unlabelled. A file that does not decode is skipped with a warning."""
    from tqdm import tqdm

    if not os.path.isdir(path):
        raise DataError(f"--images {path} is not a folder of images")
    files = []
    for folder, subfolders, names in os.walk(path):
        subfolders[:] = sorted(name for name in subfolders if not name.startswith("."))
        files += [os.path.join(folder, name) for name in sorted(names) if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
        raise DataError(f"--images {path} holds no image files ({', '.join(IMAGE_EXTENSIONS)})")

    def decode(file):
        try:
            return decode_image(file, image_size, max_aspect), None
        except Exception as err:  # PIL raises several types for a broken file: each is skipped the same way
            return None, f"{type(err).__name__}: {err}"

    images, kept = [], []
    with concurrent.futures.ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        for file, (image, error) in tqdm(
            zip(files, pool.map(decode, files)), total=len(files), desc="images", unit="img", disable=not progress
        ):
            if image is None:
                warnings.warn(f"skipping image {file} that does not decode: {error}")
                continue
            images.append(image)
            kept.append(file)
    if not images:
        raise DataError(f"no image under {path} decoded")
    tops = [os.path.relpath(file, path).split(os.sep) for file in kept]
    labels, classes = None, []
    if all(len(parts) > 1 for parts in tops):
        classes = sorted({parts[0] for parts in tops})
        labels = torch.tensor([classes.index(parts[0]) for parts in tops], dtype=torch.int64, device=device)
    canvas = canvas_size(image_size, max_aspect)
    pixels = np.zeros((len(images), canvas, canvas, 3), np.uint8)
    for index, image in enumerate(images):
        pixels[index, : image.shape[0], : image.shape[1]] = image
    sizes = torch.tensor([image.shape[:2] for image in images], dtype=torch.int64)
    smallest = int(sizes.min())
    sizes = None if (sizes == canvas).all() else sizes.to(device)  # as a store's: None where every image fills it
    return ImageSet(
        torch.from_numpy(pixels).to(device),
        kept,
        labels,
        classes,
        sizes=sizes,
        patch_size=patch_size or min(smallest, MAX_DEFAULT_PATCH),
    )


def embed(encoder: torch.nn.Module, images: ImageSet, config: EvalConfig, description: str = "embed") -> torch.Tensor:
    """(N, feature_dim) float32: the bag-of-features embedding of each image, as ``empssl eval`` computes it."""
    device = images.images.device
    augment = MultiPatchAugment(
        augment_config_for(images.patch_size or int(images.images.shape[1])),
        backend=config.augment_backend,
        out_dtype=torch.bfloat16 if config.bf16 and device.type == "cuda" else torch.float32,
        channels_last=device.type == "cuda",
    )
    features = extract_features(
        encoder,
        images.images,
        config.num_patches,
        augment,
        bf16=config.bf16,
        progress=config.progress,
        description=description,
        seed=config.seed,
        split_key=images.split_key,
        image_keys=images.keys,
        image_sizes=images.sizes,
    )
    if not torch.isfinite(features).all():
        raise ValueError("the encoder produced non-finite embeddings; the checkpoint is probably diverged")
    return features


def check_outputs(outputs: Sequence[str], inputs: Sequence[Optional[str]], suffixes: Sequence[str]) -> None:
    """ValueError unless the first of ``outputs`` ends with one of ``suffixes`` and no output is one of ``inputs``
    (a checkpoint, a data file, an image folder): an output never replaces what the command reads."""
    if not outputs[0].lower().endswith(tuple(suffixes)):
        raise ValueError(f"--out {outputs[0]} must end with {' or '.join(suffixes)}")
    read = [path for path in inputs if path]
    for out in outputs:
        same = [path for path in read if os.path.realpath(path) == os.path.realpath(out) or same_file(path, out)]
        if same:  # through links, hard ones too
            raise ValueError(f"--out would write {out} over {same[0]}, an input of this command; pass another --out")
        if os.path.isdir(out):
            raise ValueError(f"--out {out} is a folder; pass a file name")


def beside(out: str, suffix: str) -> str:
    """The file next to ``out`` holding the numbers behind it: the same name with ``suffix``."""
    return os.path.splitext(out)[0] + suffix


def write_png(path: str, image) -> None:
    """A PIL image as a PNG, atomically."""
    write_atomically(path, lambda f: image.save(f, format="PNG"))


def write_csv(path: str, header: Sequence[str], rows: Sequence[Sequence]) -> None:
    """A CSV file (a header line, then the rows), atomically."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    write_atomically(path, lambda f: f.write(text.getvalue().encode()))


def to_display(patches: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Normalised patches (P, 3, S, S) back to uint8 images (P, S, S, 3): x * std + mean, in [0, 1], times 255."""
    mean_t = torch.tensor(mean, dtype=torch.float32, device=patches.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=patches.device).view(1, 3, 1, 1)
    pixels = (patches.float() * std_t + mean_t).clamp_(0, 1).mul_(255).round_().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()
