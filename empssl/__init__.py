"""empssl: EMP-SSL self-supervised learning with a fused multi-patch augmentation and a fused Total Coding Rate
loss. The public API is what this module exports (README.md, docs/); the subpackages are its layers
(docs/design.md section 2)."""

__version__ = "0.1.0"  # the one place of the version: pyproject.toml reads it

from .augment import AugmentConfig, MultiPatchAugment, sample_augment_params
from .backends import BackendUnavailableError
from .checkpoint import CheckpointError
from .config import EvalConfig, TrainConfig
from .data import DataError, ImageDataset, load_dataset, make_synthetic
from .evaluation import evaluate, extract_features, knn_classify, linear_probe
from .loss import EMPSSLLoss, TotalCodingRate, coding_rate, invariance_loss
from .models import EMPSSLEncoder, build_encoder, load_encoder
from .optim import LARS, build_optimizer, cosine_schedule, schedule_steps
from .training import NonFiniteLossError, TrainingInterrupted, TrainResult, train

__all__ = [
    "AugmentConfig",
    "BackendUnavailableError",
    "CheckpointError",
    "DataError",
    "EMPSSLEncoder",
    "EMPSSLLoss",
    "EvalConfig",
    "ImageDataset",
    "LARS",
    "MultiPatchAugment",
    "NonFiniteLossError",
    "TotalCodingRate",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "build_encoder",
    "build_optimizer",
    "coding_rate",
    "cosine_schedule",
    "evaluate",
    "extract_features",
    "invariance_loss",
    "knn_classify",
    "linear_probe",
    "load_dataset",
    "load_encoder",
    "make_synthetic",
    "sample_augment_params",
    "schedule_steps",
    "train",
]
