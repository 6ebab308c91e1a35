"""Training checkpoints: written atomically, read with clear errors.

A checkpoint is one ``torch.save`` file holding a dict: the encoder's architecture
(``model_config``) and weights, and the training state (``empssl.train.TrainState.state_dict()``:
optimiser, step, random states, the epoch's permutation), tagged ``train_state_version``, and the
training config. It is written to a
temporary file in the same folder and moved into place with ``os.replace``, so a crash
never leaves a half-written checkpoint behind.
"""
from __future__ import annotations

import os
import tempfile
from typing import Any, BinaryIO, Callable, Dict, Optional

import torch

FORMAT = "empssl-checkpoint"
VERSION = 1
MODEL_FIELDS = ("arch", "width", "hidden_dim", "z_dim")
# the training state's layout, read only by a resume (eval and export read the model, unchanged):
# 2 = TrainState (step counter, lr from the step, counter-based augmentation, no augment generator or scheduler)
TRAIN_STATE_VERSION = 2


class CheckpointError(ValueError):
    """A checkpoint cannot be used; the message names the file and says why."""


TEMP_PREFIX = ".tmp-"  # temporary files of an atomic write; a kill can leave one, the next run removes it


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: str, write: Callable[[BinaryIO], None]) -> None:
    """``write(f)`` to a temporary file next to ``path``, then ``os.replace`` it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=folder, prefix=TEMP_PREFIX, suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(temp, 0o666 & ~_umask())  # mkstemp makes it 0600; the file gets a plain open()'s mode
        os.replace(temp, path)
    except BaseException:
        if os.path.exists(temp):
            os.remove(temp)
        raise


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """``torch.save`` the payload with its format tag, atomically (``write_atomically``)."""
    write_atomically(path, lambda f: torch.save({"format": FORMAT, "version": VERSION, **payload}, f))


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict of ``path`` with tensors on the CPU; CheckpointError if missing, truncated or foreign."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path} not found")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip reader, unpickler and weights-only errors all mean "not a usable file"
        raise CheckpointError(f"checkpoint {path} is truncated or corrupt and cannot be read "
                              f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an empssl checkpoint (no format tag {FORMAT!r})")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {payload.get('version')}, this empssl reads {VERSION}")
    missing = [key for key in ("model_config", "model") if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks {', '.join(missing)}")
    return payload


def check_train_state(path: str, payload: Dict[str, Any]) -> None:
    """CheckpointError unless ``payload`` holds a training state this trainer continues."""
    version = payload.get("train_state_version", 1)
    if version != TRAIN_STATE_VERSION:
        raise CheckpointError(f"checkpoint {path} holds a training state of version {version}, this trainer continues "
                              f"version {TRAIN_STATE_VERSION} (an older empssl wrote it: its augmentation drew from "
                              f"another random source); it still loads for eval and export, but cannot be resumed. "
                              f"Start a new run, or use the empssl that wrote it")


def describe_model(model_config: Dict[str, Any]) -> str:
    return (f"{model_config['arch']} width {model_config['width']} hidden_dim {model_config['hidden_dim']} "
            f"z_dim {model_config['z_dim']}")


def check_same_model(path: str, stored: Dict[str, Any], requested: Dict[str, Any]) -> None:
    """CheckpointError unless the checkpoint's architecture is the requested one."""
    if any(stored.get(field) != requested.get(field) for field in MODEL_FIELDS):
        raise CheckpointError(f"checkpoint {path} holds a {describe_model(stored)} encoder, but this run asks for "
                              f"{describe_model(requested)}; use the same --arch/--width/--hidden-dim/--z-dim or another checkpoint")


def load_model_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], path: str) -> None:
    """``load_state_dict(strict=True)`` with a CheckpointError naming the file on any mismatch."""
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} does not fit this encoder (another architecture?): "
                              f"{str(err).splitlines()[0]} ...") from err


def load_encoder(path: str, device: Optional[torch.device] = None):
    """(encoder, checkpoint dict): the encoder built from the checkpoint's architecture, its weights loaded."""
    from .models import build_encoder

    payload = load_checkpoint(path)
    model_config = payload["model_config"]
    try:
        encoder = build_encoder(**{field: model_config[field] for field in MODEL_FIELDS})
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has an unusable model_config {model_config!r}: {err}") from err
    load_model_state(encoder, payload["model"], path)
    if device is not None:
        encoder = encoder.to(device)
    return encoder, payload


__all__ = ["CheckpointError", "TRAIN_STATE_VERSION", "check_train_state", "write_atomically", "save_checkpoint", "load_checkpoint", "load_encoder", "check_same_model", "load_model_state"]
