"""Export a trained backbone to the library it came from (and, optionally, the evaluation head).

The backbone keeps its library's parameter names, so the export is the encoder's ``backbone.*`` entries with the
prefix dropped, and it loads strictly into the model ``loading_code`` builds (docs/training.md section 7):

- the built-in ResNet-18 (width 1 only): ``torchvision.models.resnet18()`` with ``fc`` an Identity, after the
  CIFAR stem (``conv1 = Conv2d(3, 64, 3, 1, 1, bias=False)``, ``maxpool = Identity()``) for ``resnet18-cifar``;
- ``torchvision:NAME``: ``torchvision.models.get_model(NAME, weights=None, **backbone_args)`` with its classifier
  (the layer the encoder replaced, e.g. ``fc``) an Identity;
- ``timm:NAME``: ``timm.create_model(NAME, pretrained=False, num_classes=0, **backbone_args)``;

and ``--stem cifar`` the same two stem lines. ``with_head`` adds the ``pre_feature.*`` entries (Linear,
BatchNorm1d, ReLU) whose output is the hidden_dim-d feature that evaluation uses.

Files are a plain state_dict (``torch.save``, loads with ``torch.load(weights_only=True)``) or
safetensors, written atomically (the temporary a killed export left is removed by the next export to the same
file); an existing file is kept unless ``overwrite``, and the checkpoint exported is never replaced.
"""

from __future__ import annotations

import os
from typing import Dict, Optional, Tuple

import torch

from ..files import remove_stale_temporaries, same_file, write_atomically
from .backbones import parse_arch
from .encoder import EMPSSLEncoder, load_encoder

FORMATS = ("pt", "safetensors")
BACKBONE_PREFIX = "backbone."
HEAD_PREFIX = "pre_feature."


class ExportError(ValueError):
    """The encoder cannot be exported as asked; the message says why and what to do."""


def export_state_dict(encoder: EMPSSLEncoder, with_head: bool = False) -> Dict[str, torch.Tensor]:
    """The encoder's backbone under its library's names (plus ``pre_feature.*`` with ``with_head``).

    Tensors are detached CPU copies. Refuses a built-in ResNet-18 of a width other than 1: torchvision's resnet18
    has 64 base channels, so a narrower or wider backbone would not load into it.
    """
    if not isinstance(encoder, EMPSSLEncoder):
        raise TypeError(f"encoder must be an empssl EMPSSLEncoder, got {type(encoder).__name__}")
    backbone = encoder.backbone
    if encoder.source == "empssl" and backbone.base_channels != 64:
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


def loading_code(encoder: EMPSSLEncoder, file: str, with_head: bool = False) -> str:
    """Python that builds the model an export of ``encoder`` loads into strictly, and loads ``file`` (a ``pt``
    export; for safetensors, ``safetensors.torch.load_file(file)`` in the last line's place)."""
    _, name = parse_arch(encoder.arch)
    kwargs = "".join(f", {key}={value!r}" for key, value in encoder.backbone_args.items())
    lines = ["import torch"]
    if encoder.source == "empssl":
        lines += ["import torchvision", "model = torchvision.models.resnet18()"]
        if name == "resnet18-cifar":
            lines += [
                "model.conv1 = torch.nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)",
                "model.maxpool = torch.nn.Identity()",
            ]
        lines.append("model.fc = torch.nn.Identity()  # the classifier: yours to train for your classes")
    elif encoder.source == "torchvision":
        lines += ["import torchvision", f"model = torchvision.models.get_model({name!r}, weights=None{kwargs})"]
        head = "".join(f"[{part}]" if part.isdigit() else f".{part}" for part in encoder.removed_head.split("."))
        lines.append(f"model{head} = torch.nn.Identity()  # the classifier: yours to train for your classes")
    else:
        lines += ["import timm", f"model = timm.create_model({name!r}, pretrained=False, num_classes=0{kwargs})"]
    if encoder.stem == "cifar":
        lines += [
            "model.conv1 = torch.nn.Conv2d(3, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, "
            "bias=False)",
            "model.maxpool = torch.nn.Identity()",
        ]
    if with_head:
        dims = f"{encoder.feature_dim}, {encoder.hidden_dim}"
        lines.append(
            f"model.pre_feature = torch.nn.Sequential(torch.nn.Linear({dims}), "
            f"torch.nn.BatchNorm1d({encoder.hidden_dim}), torch.nn.ReLU())  # features: model.pre_feature(model(x))"
        )
    lines.append(f"model.load_state_dict(torch.load({file!r}, weights_only=True))  # strict: every key used")
    return "\n".join(lines)


def export_checkpoint_and_code(
    checkpoint: str, out: str, with_head: bool = False, format: Optional[str] = None, overwrite: bool = False
) -> Tuple[Dict[str, torch.Tensor], str]:
    """``export_checkpoint``'s state and the ``loading_code`` of the file written."""
    format = format_for(out, format)
    if same_file(out, checkpoint):  # --overwrite or not: an output never replaces the command's input
        raise ExportError(f"--out {out} is the checkpoint it exports (--checkpoint {checkpoint}); pass another --out")
    _check_out(out, overwrite)  # before the (slow) checkpoint read
    encoder, payload = load_encoder(checkpoint)
    state = export_state_dict(encoder, with_head)
    code = loading_code(encoder, out, with_head)
    if format == "safetensors":
        code = code.replace("torch.load(", "safetensors.torch.load_file(").replace(", weights_only=True)", ")")
        code = code.replace("import torch\n", "import torch\nimport safetensors.torch\n", 1)
    metadata = {
        "source": "empssl",
        "arch": encoder.arch,
        "stem": encoder.stem,
        "backbone_args": repr(encoder.backbone_args),
        "hidden_dim": str(encoder.hidden_dim),
        "with_head": str(bool(with_head)).lower(),
        "step": str(payload.get("step", "")),
        "loading_code": code,
    }
    save_state_dict(state, out, format, overwrite, metadata)
    return state, code


def export_checkpoint(
    checkpoint: str, out: str, with_head: bool = False, format: Optional[str] = None, overwrite: bool = False
) -> Dict[str, torch.Tensor]:
    """Read an ``empssl train`` checkpoint and write its backbone (and head) to ``out``; returns what was written.

    CheckpointError for a missing or unusable checkpoint, ExportError for a built-in encoder that torchvision's
    resnet18 cannot take, an unknown format, a missing safetensors package or an existing ``out``.
    """
    return export_checkpoint_and_code(checkpoint, out, with_head, format, overwrite)[0]
