"""The ``empssl`` command: ``train``, ``eval``, ``plot``, ``info``, ``export``, ``reproduce``, ``bench``.

The options of train and eval are generated from the fields of ``TrainConfig`` and ``EvalConfig``
(empssl.config), where their defaults and help live: the 1-epoch CIFAR-10 recipe (ResNet-18 with
the CIFAR stem, 20 patches of each of 100 images per step, lr 0.3 with a cosine schedule over 2
epochs, stopped after 1 epoch) and evaluation by bag of features over 128 patches per image.
The parsers are ``parser``'s, what each command does ``commands``', the error handling ``main``'s.
"""

from .main import main
from .parser import build_parser

__all__ = ["build_parser", "main"]
