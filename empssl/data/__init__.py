"""Data sets as uint8 tensors (``ImageDataset``), loaded by spec (``load_dataset``): CIFAR, image folders, npz
files and the built-in synthetic set."""

from .dataset import DataError, ImageDataset
from .load import load_dataset
from .synthetic import make_synthetic

__all__ = ["DataError", "ImageDataset", "load_dataset", "make_synthetic"]
