"""Training checkpoints: written atomically, read with clear errors.

A checkpoint is one ``torch.save`` file holding a dict: the encoder's architecture
(``model_config``) and weights, and the training state (``empssl.training.step.TrainState.state_dict()``:
optimiser, step, random states, the epoch's permutation), tagged ``train_state_version``, and the
training config. It is written to a
temporary file in the same folder and moved into place with ``os.replace``, so a crash
never leaves a half-written checkpoint behind; a write that fails (a full disk, a read-only folder)
raises OSError naming the file, and removes its temporary file.

Every field carries a CRC-32 (``checksums``, keyed by the field's place, e.g. ``step`` or ``model/conv1.weight``):
a tensor's covers its dtype, shape and bytes, any other value its type and value, a dict its keys. They are verified
on every load: a changed byte is a CheckpointError naming the field. A checkpoint written when only tensors carried
checksums loads with a note, one written before any loads with another. Each field a caller uses is then checked
for its type, shape and range before use (``check_train_state``; the model's tensors against the encoder its
``model_config`` builds, ``check_state_shapes``), so a damaged or forged file is one line, never a traceback.
``check_finite`` refuses a model state with NaN or inf (eval and export use it; the trainer never writes one). A
file holding Python objects that a safe load would have to run is refused as unsafe.
"""

from __future__ import annotations

import pickle
import re
import sys
import warnings
import zlib
from typing import Any, Dict, Iterator, List, Tuple

import torch

from .files import NotARegularFile, StagedWrite, open_input

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
    """CRC-32 of the tensor's bytes (the checksums of checkpoints written when only tensors carried one)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return 0
    return zlib.crc32(flat.view(torch.uint8).numpy().data)


CHECKSUMS_VERSION = 2  # 1 (no version): tensors' bytes only; 2: every field (``field_checksum``)


def _fields(value: Any, place: str = "") -> Iterator[Tuple[str, Any]]:
    """(place, value) of ``value`` and of everything nested in its dicts, lists and tuples, containers included."""
    yield place, value
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _fields(item, f"{place}/{key}" if place else str(key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from _fields(item, f"{place}/{index}" if place else str(index))


def field_checksum(value: Any) -> int:
    """CRC-32 of a field: a tensor's dtype, shape and bytes; a dict's type and keys; a list's or tuple's type and
    length (their items have checksums of their own); any other value's type and repr (exact for floats)."""
    if isinstance(value, torch.Tensor):
        return zlib.crc32(
            tensor_checksum(value).to_bytes(4, "little"), zlib.crc32(f"{value.dtype}|{tuple(value.shape)}".encode())
        )
    if isinstance(value, dict):
        text = "dict|" + "|".join(sorted(repr(key) for key in value))
    elif isinstance(value, (list, tuple)):
        text = f"{type(value).__name__}|{len(value)}"
    else:
        text = f"{type(value).__name__}|{value!r}"
    return zlib.crc32(text.encode())


def checksums(payload: Dict[str, Any]) -> Dict[str, Any]:
    """The ``checksums`` field of ``payload``: every other field's ``field_checksum``, by place."""
    fields = {k: v for k, v in payload.items() if k != "checksums"}
    return {"version": CHECKSUMS_VERSION, "fields": {place: field_checksum(v) for place, v in _fields(fields) if place}}


def _described(place: str, value: Any) -> str:
    return f"{'tensor' if isinstance(value, torch.Tensor) else 'field'} {place}"


def verify_checksums(path: str, payload: Dict[str, Any]) -> None:
    """CheckpointError naming the first field whose content differs from what was written; a note for a checkpoint
    written before every field had a checksum."""
    stored = payload.get("checksums")
    if stored is None:
        print(
            f"empssl: note: checkpoint {path} was written before checkpoints held checksums; its tensors cannot be "
            f"verified",
            file=sys.stderr,
        )
        return
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksums are unreadable; use another checkpoint")
    if "version" not in stored:  # version 1: tensors' checksums only, by place
        _verify_tensor_checksums(path, payload, stored)
        return
    if stored["version"] != CHECKSUMS_VERSION:
        raise CheckpointError(
            f"checkpoint {path} holds checksums of version {stored['version']!r}, this empssl verifies versions 1 "
            f"and {CHECKSUMS_VERSION}: a newer empssl wrote it; use that empssl, or another checkpoint"
        )
    expected, found = stored.get("fields"), dict(_fields({k: v for k, v in payload.items() if k != "checksums"}))
    if not isinstance(expected, dict):
        raise CheckpointError(f"checkpoint {path} is corrupt: its checksums are unreadable; use another checkpoint")
    found.pop("")
    for place in sorted(set(expected) | set(found)):
        if place not in found:
            raise CheckpointError(f"checkpoint {path} is corrupt: field {place} is missing; use another checkpoint")
        if place not in expected:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {_described(place, found[place])} was added after it was written; "
                f"use another checkpoint"
            )
        if expected[place] != field_checksum(found[place]):
            raise CheckpointError(
                f"checkpoint {path} is corrupt: {_described(place, found[place])} does not match its checksum (its "
                f"bytes changed after it was written); use another checkpoint"
            )


def _verify_tensor_checksums(path: str, payload: Dict[str, Any], stored: Dict[str, Any]) -> None:
    found = {place: tensor_checksum(tensor) for place, tensor in _tensors(payload) if place != "checksums"}
    for place in sorted(set(stored) | set(found)):
        if place not in found:
            raise CheckpointError(f"checkpoint {path} is corrupt: tensor {place} is missing")
        if stored.get(place) != found[place]:
            raise CheckpointError(
                f"checkpoint {path} is corrupt: tensor {place} does not match its checksum (its "
                f"bytes changed after it was written); use another checkpoint"
            )
    print(
        f"empssl: note: checkpoint {path} was written when only its tensors held checksums; its other fields "
        f"cannot be verified",
        file=sys.stderr,
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


def stage_checkpoint(path: str, payload: Dict[str, Any]) -> StagedWrite:
    """``torch.save`` the payload with its format tag and checksums beside ``path``, not yet in place
    (``StagedWrite``: ``commit`` moves it there)."""
    payload = {"format": FORMAT, "version": VERSION, **payload}
    payload["checksums"] = checksums(payload)
    return StagedWrite(path, lambda f: torch.save(payload, f))


def save_checkpoint(path: str, payload: Dict[str, Any]) -> None:
    """``torch.save`` the payload with its format tag and checksums, atomically."""
    stage_checkpoint(path, payload).commit()


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint dict of ``path`` with tensors on the CPU, every field verified against its checksum;
    CheckpointError if missing, not a regular file, truncated, foreign, unsafe to load, or if its model_config or
    config holds anything but plain values."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: the error below says it all
            with open_input(path, "checkpoint") as f:
                payload = torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} not found") from None
    except NotARegularFile as err:
        raise CheckpointError(str(err)) from None
    except OSError as err:  # the file is there but the system refuses it (permissions, I/O): not corruption
        raise CheckpointError(f"checkpoint {path} cannot be read: {err.strerror or err}") from None
    except pickle.UnpicklingError as err:  # the weights-only unpickler met something that only a full unpickler runs
        found = re.search(r"(unsupported GLOBAL \S+|Unsupported global: GLOBAL \S+|Unsupported operand \d+)", str(err))
        raise CheckpointError(
            f"checkpoint {path} is unsafe: it holds pickled Python objects that only an unrestricted load would run "
            f"({found.group(1) if found else 'not tensors, numbers or strings'}), which can execute any code; "
            f"empssl never loads such a file. It was not written by empssl train, or was altered: use a checkpoint "
            f"that empssl wrote"
        ) from None
    except Exception as err:  # zip reader and unpickler errors mean "not a usable file"
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt and cannot be read "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
        ) from None
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
    for place in ("model_config", "config"):  # compared with a run's settings: plain values only (not tensors)
        settings = payload.get(place, {})
        _check_field(path, place, settings, isinstance(settings, dict), "a dict")
        for key, value in settings.items():
            _check_field(
                path,
                f"{place}/{key}",
                value,
                isinstance(key, str) and _is_plain(value),
                "a number, string, bool or None (or a list or dict of those)",
            )
    model = payload["model"]
    _check_field(
        path,
        "model",
        model,
        isinstance(model, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in model.items()),
        "a dict of named tensors",
    )
    return payload


def _check_field(path: str, place: str, value: Any, valid: bool, expected: str) -> None:
    """CheckpointError naming the field unless ``valid``."""
    if not valid:
        shown = repr(value) if not isinstance(value, (dict, list, torch.Tensor)) else type(value).__name__
        raise CheckpointError(
            f"checkpoint {path} has an unusable field {place}: expected {expected}, got {shown[:80]}; use another "
            f"checkpoint"
        )


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (bool, int, float, str)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_is_plain(item) for item in value)
    return isinstance(value, dict) and all(isinstance(key, str) and _is_plain(item) for key, item in value.items())


def _is_int(value: Any, low: int, high: int = 2**62) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def check_train_state(path: str, payload: Dict[str, Any]) -> None:
    """CheckpointError unless ``payload`` holds a training state this trainer continues, each field of the type and
    range a resume uses (the sizes against the trainer's state: ``TrainState.check_state_dict``)."""
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
    _check_field(path, "step", payload["step"], _is_int(payload["step"], 0), "an integer >= 0")
    run_id = payload.get("run_id")
    _check_field(
        path,
        "run_id",
        run_id,
        isinstance(run_id, str) and re.fullmatch(r"[0-9A-Za-z_-]{1,64}", run_id) is not None,
        "a run id of letters and digits",
    )
    elapsed = payload.get("elapsed_s", 0.0)
    _check_field(
        path,
        "elapsed_s",
        elapsed,
        isinstance(elapsed, (int, float)) and not isinstance(elapsed, bool) and 0 <= elapsed < 1e12,
        "a finite number of seconds >= 0",
    )
    dataset = payload.get("dataset", {})
    _check_field(path, "dataset", dataset, isinstance(dataset, dict), "a dict")
    for place in ("num_train", "image_size", "patch_size"):
        if place in dataset:
            _check_field(path, f"dataset/{place}", dataset[place], _is_int(dataset[place], 1), "a positive integer")
    if "fingerprint" in dataset:
        _check_field(
            path, "dataset/fingerprint", dataset["fingerprint"], isinstance(dataset["fingerprint"], str), "a string"
        )
    rng = payload["rng"]
    _check_field(path, "rng", rng, isinstance(rng, dict), "a dict of generator states")
    for place in ("torch_cpu", "permutation", "torch_cuda"):
        if place in rng or place != "torch_cuda":
            state = rng.get(place)
            _check_field(
                path,
                f"rng/{place}",
                state,
                isinstance(state, torch.Tensor) and state.dtype == torch.uint8 and state.ndim == 1,
                "a generator state (a 1-D uint8 tensor)",
            )
    permutation = payload["permutation"]
    _check_field(
        path,
        "permutation",
        permutation,
        (permutation is None and payload["step"] == 0)  # drawn at the first step: every later state holds one
        or (isinstance(permutation, torch.Tensor) and permutation.dtype == torch.int64 and permutation.ndim == 1),
        "a 1-D int64 tensor of image indices (None at step 0 only)",
    )
    optimizer = payload["optimizer"]
    _check_field(
        path,
        "optimizer",
        optimizer,
        isinstance(optimizer, dict)
        and isinstance(optimizer.get("state"), dict)
        and isinstance(optimizer.get("param_groups"), list)
        and all(isinstance(group, dict) for group in optimizer["param_groups"]),
        "an optimiser state (a dict of state and param_groups)",
    )


def check_state_shapes(path: str, place: str, expected: Dict[str, Any], state: Dict[str, Any]) -> None:
    """CheckpointError naming the first tensor of ``state`` whose dtype or shape is not the ``expected`` tensor's (a
    dict of the tensors the state must have: e.g. a model's ``state_dict()``, built on the meta device)."""
    for name in sorted(set(expected) | set(state)):
        if name not in state:
            raise CheckpointError(f"checkpoint {path} does not fit: {place}/{name} is missing; use another checkpoint")
        if name not in expected:
            raise CheckpointError(
                f"checkpoint {path} does not fit: it holds {place}/{name}, which this model has not; use another "
                f"checkpoint"
            )
        want, got = expected[name], state[name]
        if not isinstance(got, torch.Tensor) or got.shape != want.shape or got.dtype != want.dtype:
            shown = f"{got.dtype} {tuple(got.shape)}" if isinstance(got, torch.Tensor) else type(got).__name__
            raise CheckpointError(
                f"checkpoint {path} does not fit: {place}/{name} is {shown}, the model built from its model_config "
                f"needs {want.dtype} {tuple(want.shape)}; use another checkpoint"
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
