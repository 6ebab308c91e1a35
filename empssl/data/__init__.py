"""Data sets as uint8 images (``ImageDataset``), loaded by spec (``load_dataset``): CIFAR, image trees (Tiny
ImageNet, ImageNet-100, your own, labelled or not; held in memory or read a step at a time from an on-disk store),
npz files and the built-in synthetic set."""

from .dataset import DataError, ImageDataset
from .load import load_dataset
from .synthetic import make_synthetic

__all__ = ["DataError", "ImageDataset", "load_dataset", "make_synthetic"]
