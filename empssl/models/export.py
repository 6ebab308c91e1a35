"""Export a trained backbone for ``torchvision.models.resnet18`` (and, optionally, the evaluation head).

The backbone already has torchvision's parameter names (empssl/models/resnet.py), so the export is the
encoder's ``backbone.*`` entries with the prefix dropped: ``resnet18().load_state_dict(sd, strict=False)``
reports only ``fc.weight`` and ``fc.bias`` missing. For ``resnet18-cifar`` the model needs the
CIFAR stem first (``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)``, ``maxpool = Identity()``;
docs/training.md section 7). ``with_head`` adds the ``pre_feature.*`` entries (Linear, BatchNorm1d,
ReLU) whose output is the hidden_dim-d feature that evaluation uses.

Files are a plain state_dict (``torch.save``, loads with ``torch.load(weights_only=True)``) or
safetensors, written atomically (the temporary a killed export left is removed by the next export to the same
file); an existing file is kept unless ``overwrite``, and the checkpoint exported is never replaced.
"""

from __future__ import annotations

import os
from typing import Dict, Optional

import torch

from ..files import remove_stale_temporaries, same_file, write_atomically
from .encoder import EMPSSLEncoder, load_encoder

FORMATS = ("pt", "safetensors")
BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "pre_feature."


class ExportError(ValueError):
    """The encoder cannot be exported as asked; the message says why and what to do."""


def export_state_dict(encoder: EMPSSLEncoder, with_head: bool = False) -> Dict[str, torch.Tensor]:
    """The encoder's backbone under torchvision's resnet18 names (plus ``pre_feature.*`` with ``with_head``).

    Tensors are detached CPU copies. Refuses a width other than 1: torchvision's resnet18 has 64 base
    channels, so a narrower or wider backbone would not load into it.
    """
    if not isinstance(encoder, EMPSSLEncoder):
        raise TypeError(f"encoder must be an empssl EMPSSLEncoder, got {type(encoder).__name__}")
    backbone = encoder.backbone
    if backbone.base_channels != 64:
        raise ExportError(
            f"torchvision's resnet18 has 64 base channels (width 1), but this encoder has "
            f"{backbone.base_channels} (feature_dim {backbone.feature_dim}): it would not load into "
            f"torchvision.models.resnet18; export an encoder trained with --width 1"
        )
    prefixes = (BACKBONE_PREFIX, HEAD_PREFIX) if with_head else (BACKBONE_PREFIX,)
    exported = {}
    for name, tensor in encoder.state_dict().items():
        if name.startswith(prefixes):
            key = name[len(BACKBONE_PREFIX) :] if name.startswith(BACKBONE_PREFIX) else name
            exported[key] = tensor.detach().to("cpu", copy=True).contiguous()
    return exported


def format_for(path: str, format: Optional[str] = None) -> str:
    """The file format: as given, else ``safetensors`` for a ``.safetensors`` path and ``pt`` otherwise."""
    if format is None:
        return "safetensors" if path.endswith(".safetensors") else "pt"
    if format not in FORMATS:
        raise ExportError(f"format must be one of {FORMATS}, got {format!r}")
    return format


def _check_out(path: str, overwrite: bool) -> None:
    if os.path.isdir(path):
        raise ExportError(f"{path} is a folder; --out must be a file path")
    if os.path.exists(path) and not overwrite:
        raise ExportError(f"{path} already exists; pass --overwrite (overwrite=True) to replace it")


def save_state_dict(
    state: Dict[str, torch.Tensor],
    path: str,
    format: Optional[str] = None,
    overwrite: bool = False,
    metadata: Optional[Dict[str, str]] = None,
) -> str:
    """Write ``state`` to ``path`` atomically as ``pt`` or ``safetensors``; returns the format written.

    ``metadata`` (strings) goes into the safetensors header; a ``pt`` file is the bare state_dict.
    """
    format = format_for(path, format)
    _check_out(path, overwrite)
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)), target=path)  # of a killed export to ``path``
    if format == "safetensors":
        try:
            from safetensors.torch import save as safetensors_bytes
        except ImportError as err:
            raise ExportError(
                "--format safetensors needs the safetensors package, which is not installed here "
                "(pip install safetensors), or use --format pt"
            ) from err
        payload = safetensors_bytes(state, metadata=metadata)
        write_atomically(path, lambda f: f.write(payload))
    else:
        write_atomically(path, lambda f: torch.save(state, f))
    return format


def export_checkpoint(
    checkpoint: str, out: str, with_head: bool = False, format: Optional[str] = None, overwrite: bool = False
) -> Dict[str, torch.Tensor]:
    """Read an ``empssl train`` checkpoint and write its backbone (and head) to ``out``; returns what was written.

    CheckpointError for a missing or unusable checkpoint, ExportError for an encoder that torchvision's
    resnet18 cannot take, an unknown format, a missing safetensors package or an existing ``out``.
    """
    format = format_for(out, format)
    if same_file(out, checkpoint):  # --overwrite or not: an output never replaces the command's input
        raise ExportError(f"--out {out} is the checkpoint it exports (--checkpoint {checkpoint}); pass another --out")
    _check_out(out, overwrite)  # before the (slow) checkpoint read
    encoder, payload = load_encoder(checkpoint)
    state = export_state_dict(encoder, with_head)
    model_config = payload["model_config"]
    metadata = {
        "source": "empssl",
        "arch": str(model_config["arch"]),
        "hidden_dim": str(model_config["hidden_dim"]),
        "with_head": str(bool(with_head)).lower(),
        "step": str(payload.get("step", "")),
    }
    save_state_dict(state, out, format, overwrite, metadata)
    return state
