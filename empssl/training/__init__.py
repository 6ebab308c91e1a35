"""Training (docs/method.md sections 1 and 5), in layers: the step (``step``: a ``TrainState`` and ``train_step``),
the run folder (``run_folder``), the step's memory estimate (``memory``), signals (``signals``), the curves
(``curves``) and the loop that ties them together (``loop``: ``train``)."""

from .loop import NonFiniteLossError, TrainResult, train
from .signals import TrainingInterrupted

__all__ = ["NonFiniteLossError", "TrainResult", "TrainingInterrupted", "train"]
