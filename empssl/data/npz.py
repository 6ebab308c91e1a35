"""A data set from one .npz file: ``images`` (N, H, W, 3) uint8 and ``labels`` (N,), optionally ``test_images`` and
``test_labels`` (else a deterministic split)."""

from __future__ import annotations

import numpy as np
import torch

from ..files import NotARegularFile, open_input
from .dataset import DataError, ImageDataset, check_labels, deterministic_split


def _is_pickle(path: str) -> bool:
    """Whether the file starts as a pickle of protocol 2 or later does (the PROTO opcode)."""
    with open_input(path, "npz file") as f:
        return f.read(1) == b"\x80"


def load_npz(path: str, seed: int = 0) -> ImageDataset:
    """Arrays ``images`` / ``labels`` (and optional ``test_images`` / ``test_labels``) from one .npz file."""
    try:
        with open_input(path, "npz file") as f, np.load(f, allow_pickle=False) as arrays:
            content = {key: arrays[key] for key in arrays.files}
    except FileNotFoundError:
        raise DataError(f"npz file {path} not found") from None
    except NotARegularFile as err:
        raise DataError(str(err)) from None
    except ValueError as err:
        if "Object arrays" not in str(err) and not _is_pickle(path):
            raise DataError(f"npz file {path} is corrupt or not an .npz archive (ValueError: {err})") from None
        raise DataError(
            f"npz file {path} is unsafe: it holds Python objects (pickled), which only an unpickling load would "
            f"read and which can run any code; empssl never loads them: save plain numeric arrays (images uint8, "
            f"labels integers)"
        ) from None
    except Exception as err:
        raise DataError(f"npz file {path} is corrupt or not an .npz archive ({type(err).__name__}: {err})") from None
    for key in ("images", "labels"):
        if key not in content:
            raise DataError(f"npz file {path} has no array {key!r} (found: {sorted(content)})")
    if ("test_images" in content) != ("test_labels" in content):
        raise DataError(f"npz file {path} must hold both test_images and test_labels, or neither")
    for key in ("images", "test_images"):
        if key in content and (content[key].dtype != np.uint8 or content[key].ndim != 4 or content[key].shape[-1] != 3):
            raise DataError(
                f"npz file {path}: {key} must be uint8 of shape (N, H, W, 3), got "
                f"{content[key].dtype} {content[key].shape}"
            )
    for images_key, labels_key in (("images", "labels"), ("test_images", "test_labels")):
        if images_key in content and content[labels_key].shape != (len(content[images_key]),):
            raise DataError(
                f"npz file {path}: {len(content[images_key])} {images_key} but {labels_key} of shape "
                f"{content[labels_key].shape}; expected one label per image, shape ({len(content[images_key])},)"
            )
    num_images = sum(len(content[key]) for key in ("images", "test_images") if key in content)
    for key in ("labels", "test_labels"):  # before anything is sized by them
        if key in content:
            content[key] = check_labels(content[key], f"npz file {path}", key, num_images)
    images, labels = content["images"], content["labels"]
    if "test_images" in content:
        test_images, test_labels = content["test_images"], content["test_labels"]
    else:
        train_idx, test_idx = deterministic_split(len(images), seed=seed)
        images, labels, test_images, test_labels = (
            images[train_idx],
            labels[train_idx],
            images[test_idx],
            labels[test_idx],
        )
    all_labels = np.concatenate([labels, test_labels])
    num_classes = int(all_labels.max()) + 1
    name = f"npz:{path}"
    return ImageDataset(
        name,
        torch.from_numpy(np.ascontiguousarray(images)),
        torch.from_numpy(labels),
        torch.from_numpy(np.ascontiguousarray(test_images)),
        torch.from_numpy(test_labels),
        classes=[str(i) for i in range(num_classes)],
    )
