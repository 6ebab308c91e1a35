"""The published linear-probe accuracies of EMP-SSL (ResNet-18), in one place (docs/method.md section 7).

Source: Tong, Chen, Ma, LeCun, "EMP-SSL: Towards Self-Supervised Learning in One Training Epoch",
arXiv 2304.03977, and the authors' public code and its README (the "optimised for 1 epoch" row:
`main.py --epoch 2 --num_patches 20`, a 2-epoch cosine schedule stopped after the first epoch).
``empssl reproduce`` sets its measurements beside these; a cell the paper has no number for has none.
"""

from __future__ import annotations

import dataclasses
from typing import List, Optional, Tuple

SOURCE = "Tong et al., EMP-SSL, arXiv 2304.03977 (ResNet-18, linear probe)"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """What a published number was trained with: epochs run, schedule length in epochs, patches per image."""

    epochs: int
    schedule_epochs: int
    num_patches: int


# (data set, recipe) -> (linear-probe top-1, where the paper states it)
LINEAR_PROBE = {
    # the paper's 1-epoch row; it does not state the schedule: empssl runs it with a schedule of the run's length
    ("cifar10", Recipe(1, 1, 20)): (0.806, "paper, 1 epoch, 20 patches"),
    ("cifar100", Recipe(1, 1, 20)): (0.551, "paper, 1 epoch, 20 patches"),
    ("cifar10", Recipe(1, 2, 20)): (0.842, "authors' README, 1 epoch optimised (2-epoch schedule)"),
    ("cifar100", Recipe(1, 2, 20)): (0.585, "authors' README, 1 epoch optimised (2-epoch schedule)"),
    ("cifar10", Recipe(10, 10, 20)): (0.907, "paper, 10 epochs, 20 patches"),
    ("cifar100", Recipe(10, 10, 20)): (0.678, "paper, 10 epochs, 20 patches"),
    ("cifar10", Recipe(30, 30, 20)): (0.931, "paper, 30 epochs, 20 patches"),
    ("cifar100", Recipe(30, 30, 20)): (0.724, "paper, 30 epochs, 20 patches"),
    ("cifar10", Recipe(10, 10, 200)): (0.915, "paper, 10 epochs, 200 patches"),
    ("cifar100", Recipe(10, 10, 200)): (0.701, "paper, 10 epochs, 200 patches"),
    # Tiny ImageNet and ImageNet-100: the authors' README states the 1-epoch row with its command (a 2-epoch schedule,
    # 20 patches; ImageNet-100 with resnet18-imagenet); the 10-epoch numbers are the paper's row with CIFAR-10 0.915
    # and CIFAR-100 0.701 (its abstract names the four together), which the paper trains with 200 patches
    ("tinyimagenet", Recipe(1, 2, 20)): (0.381, "authors' README, 1 epoch optimised (2-epoch schedule)"),
    ("imagenet100", Recipe(1, 2, 20)): (0.585, "authors' README, 1 epoch optimised (2-epoch schedule)"),
    ("tinyimagenet", Recipe(10, 10, 200)): (0.515, "paper, 10 epochs, 200 patches"),
    ("imagenet100", Recipe(10, 10, 200)): (0.789, "paper, 10 epochs, 200 patches"),
}
# data sets given as a tree (``tinyimagenet:PATH``) are looked up by their kind
TREE_DATA_SETS = ("tinyimagenet", "imagenet100")


def linear_probe(dataset: str, recipe: Recipe) -> Tuple[Optional[float], str]:
    """(published top-1, its source) for a data set (a spec: ``cifar10``, ``tinyimagenet:PATH``, ...) trained with
    ``recipe``, or (None, "") where the paper has none."""
    kind, _, path = dataset.partition(":")
    if path and kind in TREE_DATA_SETS:
        dataset = kind
    return LINEAR_PROBE.get((dataset, recipe), (None, ""))


# the options the authors' command sets for a data set beyond the recipe's: ImageNet-100 trains the ResNet-18 with the
# ImageNet stem (224-pixel patches)
DATASET_ARGUMENTS = {"imagenet100": ("--arch", "resnet18-imagenet")}


def dataset_arguments(dataset: str, train_args: List[str]) -> List[str]:
    """The training options a data set's published recipe sets (a spec: ``imagenet100:PATH``), unless ``train_args``
    set them itself."""
    kind, _, path = dataset.partition(":")
    options = DATASET_ARGUMENTS.get(kind, ()) if path else ()
    given = {arg.split("=")[0] for arg in train_args}
    return [value for flag, value in zip(options[::2], options[1::2]) if flag not in given for value in (flag, value)]
