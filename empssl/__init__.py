"""empssl: EMP-SSL self-supervised learning with a fused multi-patch augmentation and a
fused Total Coding Rate loss."""
from .backends import BackendUnavailableError
from .loss import EMPSSLLoss, TotalCodingRate, coding_rate, invariance_loss
from .models import EMPSSLEncoder, build_encoder

__version__ = "0.1.0"
__all__ = ["BackendUnavailableError", "EMPSSLEncoder", "build_encoder", "EMPSSLLoss", "TotalCodingRate", "coding_rate", "invariance_loss"]
