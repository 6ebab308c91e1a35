"""Training checkpoints: written atomically, read with clear errors.

A checkpoint is one ``torch.save`` file holding a dict: the encoder's architecture
(``model_config``) and weights, and the training state (``empssl.training.step.TrainState.state_dict()``:
optimiser, step, random states, the epoch's permutation), tagged ``train_state_version``, and the
training config. It is written to a
temporary file in the same folder and moved into place with ``os.replace``, so a crash
never leaves a half-written checkpoint behind; a write that fails (a full disk, a read-only folder)
raises OSError naming the file, and removes its temporary file.

Every tensor's bytes have a CRC-32 stored beside them (``checksums``, keyed by the tensor's place,
e.g. ``model/conv1.weight``), verified on every load: a flipped byte is a CheckpointError naming
the tensor. A checkpoint written before checksums loads with a one-line note. ``check_finite``
refuses a model state with NaN or inf (eval and export use it; the trainer never writes one).
"""

from __future__ import annotations

import os
import sys
import zlib
from typing import Any, Dict, Iterator, List, Tuple

import torch

from .files import write_atomically

FORMAT = "empssl-checkpoint"
VERSION = 1
MODEL_FIELDS = ("arch", "width", "hidden_dim", "z_dim", "stem", "backbone_args")
# the fields added after the first checkpoints, with the value an older checkpoint (which lacks them) was built with
MODEL_FIELD_DEFAULTS = {"stem": "default", "backbone_args": {}}
# the training state's layout, read only by a resume (eval and export read the model, unchanged):
# 2 = TrainState (step counter, lr from the step, counter-based augmentation, no augment generator or scheduler)
TRAIN_STATE_VERSION = 2
TRAIN_STATE_KEYS = ("model", "optimizer", "step", "rng", "permutation")  # what TrainState.load_state_dict reads


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and says why."""


def _tensors(value: Any, place: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """(place, tensor) of every tensor in nested dicts, lists and tuples (place: the keys joined by '/')."""
    if isinstance(value, torch.Tensor):
        yield place, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _tensors(item, f"{place}/{key}" if place else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _tensors(item, f"{place}/{index}" if place else str(index))


def tensor_checksum(tensor: torch.Tensor) -> int:
    """CRC-32 of the tensor's bytes (its dtype and shape are checked by the loaders that use it)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(flat.view(torch.uint8).numpy().data)


def checksums(payload: Dict[str, Any]) -> Dict[str, int]:
    return {place: tensor_checksum(tensor) for place, tensor in _tensors(payload) if place != "checksums"}


def verify_checksums(path: str, payload: Dict[str, Any]) -> None:
    """CheckpointError naming the first tensor whose bytes differ from the ones written; a note if none are stored."""
    stored = payload.get("checksums")
    if stored is None:
        print(
            f"empssl: note: checkpoint {path} was written before checkpoints held checksums; its tensors cannot be "
            f"verified",
            file=sys.stderr,
        )
        return
    found = checksums(payload)
    for place in sorted(set(stored) | set(found)):
        if place not in found:
            raise CheckpointError(f"checkpoint {path} is corrupt: tensor {place} is missing")
        if stored.get(place) != found[place]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: tensor {place} does not match its checksum (its "
                f"bytes changed after it was written); use another checkpoint"
            )


# beyond it a value's square overflows float32 (LARS's norms and BatchNorm's variances square what they see): a
# weight or statistic this large is the overflow of a diverged run on its way to inf, even while the loss is finite
OVERFLOW_BOUND = 2.0**64  # about 1.8e19; trained weights and BatchNorm statistics are many orders below it
NON_FINITE = "non-finite (NaN, inf, or beyond 1.8e19, whose square overflows float32)"


def non_finite_tensors(state: Dict[str, Any]) -> List[str]:
    """Places of the floating-point tensors in ``state`` with a NaN, an inf or a value beyond ``OVERFLOW_BOUND``.
    One flag per tensor on its device, read back once (not one host sync per tensor)."""
    found = [(place, tensor) for place, tensor in _tensors(state) if tensor.is_floating_point()]
    if not found:
        return []
    device = found[0][1].device
    flags = torch.stack([~(tensor.detach().abs() <= OVERFLOW_BOUND).all().to(device) for _, tensor in found])
    return [place for (place, _), bad in zip(found, flags.tolist()) if bad]


def check_finite(path: str, state: Dict[str, Any], what: str = "model") -> None:
    """CheckpointError naming the tensors of ``state`` that are not finite."""
    bad = non_finite_tensors(state)
    if bad:
        shown = ", ".join(f"{what}/{place}" for place in bad[:3]) + (
            f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        )
        raise CheckpointError(
            f"checkpoint {path} holds {NON_FINITE} values in {shown}; the run that wrote "
            f"it diverged: use an earlier checkpoint, or train again with a lower --lr"
        )


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """``torch.save`` the payload with its format tag, atomically (``write_atomically``)."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    payload["checksums"] = checksums(payload)
    write_atomically(path, lambda f: torch.save(payload, f))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict of ``path`` with tensors on the CPU; CheckpointError if missing, truncated or foreign."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip reader, unpickler and weights-only errors all mean "not a usable file"
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an empssl checkpoint (no format tag {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(
            f"checkpoint {path} has format version {payload.get('version')}, this empssl reads {VERSION}"
        )
    missing = [key for key in ("model_config", "model") if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    verify_checksums(path, payload)
    return payload


def check_train_state(path: str, payload: Dict[str, Any]) -> None:
    """CheckpointError unless ``payload`` holds a training state this trainer continues."""
    version = payload.get("train_state_version", 1)
    missing = [key for key in TRAIN_STATE_KEYS if key not in payload]
    if version == TRAIN_STATE_VERSION and missing:
        raise CheckpointError(
            f"checkpoint {path} lacks the training state a resume needs ({', '.join(missing)}); it "
            f"still loads for eval and export, but cannot be resumed. Start a new run"
        )
    if version != TRAIN_STATE_VERSION:
        raise CheckpointError(
            f"checkpoint {path} holds a training state of version {version}, this trainer continues "
            f"version {TRAIN_STATE_VERSION} (an older empssl wrote it: its augmentation drew from "
            f"another random source); it still loads for eval and export, but cannot be resumed. "
            f"Start a new run, or use the empssl that wrote it"
        )


def model_config_of(model_config: Dict[str, Any]) -> Dict[str, Any]:
    """The encoder's fields of a stored or requested model config (``MODEL_FIELDS``; an older checkpoint's missing
    ones at ``MODEL_FIELD_DEFAULTS``): what ``build_encoder`` takes. KeyError for a missing original field."""
    return {
        field: model_config.get(field, MODEL_FIELD_DEFAULTS[field])
        if field in MODEL_FIELD_DEFAULTS
        else model_config[field]
        for field in MODEL_FIELDS
    }


def describe_model(model_config: Dict[str, Any]) -> str:
    """``arch`` with the options that shape it, e.g. "torchvision:resnet50 stem cifar hidden_dim 4096 z_dim 1024"."""
    config = {**MODEL_FIELD_DEFAULTS, **model_config}
    text = str(config.get("arch"))
    if config.get("width") != 1.0 or str(config.get("arch")).startswith("resnet18"):
        text += f" width {config.get('width')}"
    if config.get("stem") != MODEL_FIELD_DEFAULTS["stem"]:
        text += f" stem {config.get('stem')}"
    if config.get("backbone_args"):
        text += " backbone_args " + ",".join(f"{k}={v!r}" for k, v in dict(config["backbone_args"]).items())
    return text + f" hidden_dim {config.get('hidden_dim')} z_dim {config.get('z_dim')}"


def check_same_model(path: str, stored: Dict[str, Any], requested: Dict[str, Any]) -> None:
    """CheckpointError, naming both, unless the checkpoint's encoder (backbone and head) is the requested one."""
    stored, requested = {**MODEL_FIELD_DEFAULTS, **stored}, {**MODEL_FIELD_DEFAULTS, **requested}
    if any(stored.get(field) != requested.get(field) for field in MODEL_FIELDS):
        raise CheckpointError(
            f"checkpoint {path} holds a {describe_model(stored)} encoder, but this run asks for "
            f"{describe_model(requested)}; use the same --arch/--width/--stem/--backbone-args/--hidden-dim/--z-dim "
            f"or another checkpoint"
        )


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """``load_state_dict(strict=True)`` with a CheckpointError naming the file on any mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(
            f"checkpoint {path} does not fit this encoder (another architecture?): {str(err).splitlines()[0]} ..."
        ) from err
