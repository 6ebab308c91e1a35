"""The encoder (docs/method.md section 3): the ResNet-18 backbone (``resnet``), the projector (``encoder``), its
BatchNorm folded for evaluation (``fold``) and its export to torchvision (``export``)."""

from .encoder import EMPSSLEncoder, build_encoder, load_encoder

__all__ = ["EMPSSLEncoder", "build_encoder", "load_encoder"]
