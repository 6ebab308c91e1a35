"""empssl: EMP-SSL self-supervised learning with a fused multi-patch augmentation and a
fused Total Coding Rate loss."""
from .augment import MultiPatchAugment, sample_augment_params
from .augment_config import AugmentConfig
from .backends import BackendUnavailableError
from .loss import EMPSSLLoss, TotalCodingRate, coding_rate, invariance_loss
from .models import EMPSSLEncoder, build_encoder
from .optim import LARS, build_optimizer, cosine_schedule, schedule_steps
from .data import DataError, ImageDataset, load_dataset, make_synthetic
from .checkpoint import CheckpointError, load_encoder
# train() and evaluate() stay in their modules (empssl.train.train, empssl.evaluate.evaluate): exporting them
# here would shadow the submodules of the same names
from .config import TrainConfig
from .train import NonFiniteLossError
from .evaluate import extract_features, knn_classify, linear_probe

__version__ = "0.1.0"
__all__ = ["AugmentConfig", "MultiPatchAugment", "sample_augment_params", "BackendUnavailableError", "EMPSSLEncoder", "build_encoder", "LARS", "build_optimizer", "cosine_schedule", "schedule_steps", "EMPSSLLoss", "TotalCodingRate", "coding_rate", "invariance_loss",
           "DataError", "ImageDataset", "load_dataset", "make_synthetic", "CheckpointError", "load_encoder",
           "NonFiniteLossError", "TrainConfig", "extract_features", "knn_classify", "linear_probe"]
