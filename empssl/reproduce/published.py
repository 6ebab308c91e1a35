"""The published linear-probe accuracies of EMP-SSL (ResNet-18), in one place (docs/method.md section 7).

Source: Tong, Chen, Ma, LeCun, "EMP-SSL: Towards Self-Supervised Learning in One Training Epoch",
arXiv 2304.03977, and the authors' public code and its README (the "optimised for 1 epoch" row:
`main.py --epoch 2 --num_patches 20`, a 2-epoch cosine schedule stopped after the first epoch).
``empssl reproduce`` sets its measurements beside these; a cell the paper has no number for has none.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Tuple

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
}


def linear_probe(dataset: str, recipe: Recipe) -> Tuple[Optional[float], str]:
    """(published top-1, its source) for a data set trained with ``recipe``, or (None, "") where the paper has none."""
    return LINEAR_PROBE.get((dataset, recipe), (None, ""))
