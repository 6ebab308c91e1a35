"""CIFAR-10 and CIFAR-100 in torchvision's download format (cifar-10-batches-py/, cifar-100-python/), read into
an ``ImageDataset``; ``download_cifar`` fetches the archive with torchvision (MD5-checked)."""

from __future__ import annotations

import os
import urllib.error

import numpy as np
import torch

from ..files import check_regular_file
from .dataset import DataError, ImageDataset

_CIFAR_TITLES = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100"}


def _torchvision_cifar_class(kind):
    from torchvision.datasets import CIFAR10, CIFAR100

    return CIFAR10 if kind == "cifar10" else CIFAR100


def _cifar_files(source):
    """(file name, MD5) of every file torchvision's CIFAR class reads: the batches, then the class names."""
    return [tuple(entry) for entry in source.train_list + source.test_list] + [
        (source.meta["filename"], source.meta["md5"])
    ]


def download_cifar(kind: str, root: str) -> None:
    """Fetch and extract the CIFAR archive with torchvision (MD5-checked) unless its files are already there."""
    source = _torchvision_cifar_class(kind)
    folder = os.path.join(root, source.base_folder)
    if all(os.path.exists(os.path.join(folder, name)) for name, _md5 in _cifar_files(source)):
        return
    from torchvision.datasets.utils import download_and_extract_archive

    title = _CIFAR_TITLES[kind]
    try:
        download_and_extract_archive(source.url, root, filename=source.filename, md5=source.tgz_md5)
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as err:
        raise DataError(
            f"could not download {title} from {source.url}: {err}. The network looks unreachable from this "
            f"machine; download {source.filename} elsewhere, extract it under {os.path.abspath(root)} "
            f"(giving {source.base_folder}/) and run again without --download"
        ) from err
    except RuntimeError as err:  # torchvision: "File not found or corrupted." after an MD5 mismatch
        raise DataError(
            f"the downloaded {title} archive failed its MD5 check ({err}); delete "
            f"{os.path.join(root, source.filename)} and retry"
        ) from err


def load_cifar(kind: str, root: str) -> ImageDataset:
    """CIFAR-10 / CIFAR-100 under ``root`` in torchvision's download format, read by torchvision."""
    from torchvision.datasets.utils import check_integrity

    source, title = _torchvision_cifar_class(kind), _CIFAR_TITLES[kind]
    folder = os.path.join(root, source.base_folder)
    if not os.path.isdir(folder):
        raise DataError(
            f"{title} not found: no folder {folder}; pass --root to the folder that holds "
            f"{source.base_folder}/ or --download to fetch it"
        )
    # torchvision checks the same MD5s but only says "not found or corrupted": name the file
    for name, md5 in _cifar_files(source):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise DataError(f"CIFAR file {path} not found; run with --download to fetch {title} again")
        check_regular_file(path, "CIFAR file")  # before the MD5 reads it: a FIFO would block
        if not check_integrity(path, md5):
            raise DataError(
                f"CIFAR file {path} is corrupt (its MD5 is not torchvision's {md5}); delete it and run with --download"
            )
    splits = {}
    for split in ("train", "test"):
        dataset = source(root, train=split == "train", download=False)
        splits[split] = (
            torch.from_numpy(np.ascontiguousarray(dataset.data, dtype=np.uint8)),
            torch.as_tensor(dataset.targets, dtype=torch.int64),
        )
    return ImageDataset(kind, *splits["train"], *splits["test"], classes=[str(name) for name in dataset.classes])
