"""The EMP-SSL trainer (SPEC.md sections 1 and 5).

One step (``train_step``): cut n augmented patches of each of b images with ``MultiPatchAugment``
(patch-major), embed the n*b patches, reshape z to (n, b, d), minimise ``EMPSSLLoss``, take a LARS
step at the cosine schedule's lr. The step is a function of a ``TrainState`` (encoder, optimiser,
schedule, step counter on the device, random state) and of device tensors (the uint8 batch and its
images' indices in the data set); it returns device tensors only and never synchronises with the
host, so on CUDA ``train`` records it once as a CUDA graph and replays it (``cuda_graph``):

- the augmentation draws from the counter-based source keyed by (seed, step counter, image index in
  the data set, patch): no generator state, and an image's patches do not depend on the batch split.
  (This changed the random stream of runs made before it: same distribution, other patches.)
- the lr is computed on the device from the step counter (``CosineFactor``) into the 0-d tensor LARS
  reads; no ``LambdaLR.step()`` (it reads the lr back to the host).

``train`` is the loop around it. The images live on the training device as uint8; a batch is an
index slice of a per-epoch random permutation. The host reads the step's metric sums every
``log_every`` steps one window late (a non-blocking copy queued when a window closes is read when
the next one closes), so the non-finite check is one window late too; at a checkpoint the sums are
read at once, so no checkpoint holds a step past a non-finite loss. Checkpoints hold the state and
the current epoch's permutation, so a resumed run continues exactly: on the CPU it reaches bitwise
the same parameters as an uninterrupted run.

A run owns its ``out_dir``: a folder that holds another run's checkpoint or metrics is refused
unless ``overwrite`` (then the old files are replaced once the new run writes its first
checkpoint). SIGINT/SIGTERM stop the loop after the current step with a checkpoint of that step.
On resume ``metrics.jsonl`` is cut back to the checkpoint's step and gets one resume marker, so
each step appears at most once, in order; ``elapsed_s`` continues the run's clock.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import sys
import threading
import time
import uuid
import warnings
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt
from . import distributed
from .augment import AugmentConfig, MultiPatchAugment
from .config import BACKEND_CHOICES, RuntimeConfig, option, positive_float, positive_int
from .data import BAD_IMAGE_POLICIES, DATASET_SPECS, ImageDataset, check_batch_size, check_writable_folder, load_dataset
from .loss import EMPSSLLoss
from .models import ARCHS, build_encoder
from .optim import RECIPE_LR
from .plots import write_training_curves

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME)  # the files that make a folder a run's
# fields that change the training trajectory: a resume with other values is not a continuation
_TRAJECTORY_FIELDS = ("dataset", "num_patches", "batch_size", "lr", "schedule_epochs", "eps", "inv_coef", "tcr_coef",
                      "seed", "data_seed", "image_size", "train_size", "sync_bn")
# settings that decide which images a run trains on
_DATA_FIELDS = ("dataset", "root", "train_size", "image_size", "data_seed")


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


@dataclasses.dataclass
class TrainConfig(RuntimeConfig):
    """Everything a training run depends on. Defaults: the 1-epoch CIFAR-10 recipe (20 patches, batch 100).

    Each field is also an option of ``empssl train`` (``batch_size`` -> ``--batch-size``) with the help text here.
    """

    # data (also options of `empssl eval`, whose defaults are the checkpoint's)
    dataset: str = option("cifar10", f"data set: {DATASET_SPECS}", group="data", metavar="SPEC")
    root: str = option("data", "folder holding cifar-10-batches-py/ or cifar-100-python/", group="data")
    download: bool = option(False, "download CIFAR with torchvision (MD5-checked) if missing", group="data",
                            form="switch")
    image_size: Optional[int] = option(None, "image size of folder: and synthetic data sets (default: 32)",
                                       group="data", type=positive_int, show_default=False)
    train_size: Optional[int] = option(None, "synthetic: number of train images (default 10000); others: use only the "
                                       "first N", group="data", type=positive_int, show_default=False)
    cache_dir: Optional[str] = option(None, "where folder: data sets cache their decoded arrays (default: "
                                      "PATH/.empssl_cache)", group="data", show_default=False)
    on_bad_image: str = option("skip", "an image of a folder: data set that does not decode: skip it with a warning, "
                               "or stop", group="data", choices=BAD_IMAGE_POLICIES)
    data_seed: int = option(0, "seed of the synthetic data set and of train/test splits", group="data", type=int)
    # encoder (also options of `empssl eval`)
    arch: str = option("resnet18-cifar", "backbone: ResNet-18 with the CIFAR stem or the ImageNet stem",
                       group="encoder", choices=ARCHS)
    width: float = option(1.0, "channel multiplier of the backbone (1: 512 features)", group="encoder",
                          type=positive_float)
    hidden_dim: int = option(4096, "size of the pre_feature layer used for evaluation", group="encoder",
                             type=positive_int)
    z_dim: int = option(1024, "embedding size", group="encoder", type=positive_int)
    # training
    num_patches: int = option(20, "patches per image per step, n", group="training", type=positive_int)
    batch_size: int = option(100, "images per step, b; under torchrun the global batch over all ranks (each takes "
                             "b / W: it must divide by their number W)", group="training", type=positive_int)
    lr: float = option(RECIPE_LR, "peak learning rate of LARS-SGD", group="training", type=positive_float)
    epochs: int = option(1, "epochs to train", group="training", type=positive_int)
    schedule_epochs: Optional[int] = option(2, "length of the cosine schedule in epochs; the 1-epoch recipe uses 2",
                                            group="training", type=positive_int)
    max_steps: Optional[int] = option(None, "stop after this many steps in total (tests, quick runs)",
                                      group="training", type=positive_int, show_default=False)
    eps: float = option(0.2, "coding-rate distortion eps", group="training", type=positive_float)
    inv_coef: float = option(200.0, "weight of the invariance term", group="training", type=float)
    tcr_coef: float = option(1.0, "weight of the coding-rate term", group="training", type=float)
    loss_backend: str = option("auto", "coding-rate backend", group="training", choices=BACKEND_CHOICES)
    channels_last: Optional[bool] = option(
        None, "channels_last memory format for patches and encoder (default: on CUDA only) | keep the default memory "
        "format on CUDA too", group="training", form="tristate")
    compile: bool = option(False, "torch.compile the encoder's forward and the loss as one graph (fullgraph on one "
                           "process)", group="training", form="switch")
    sync_bn: bool = option(False, "under torchrun: BatchNorm statistics over every rank's images, so N ranks train as "
                           "one process (default: per rank, as the published DataParallel code)", group="training",
                           form="switch")
    tf32: bool = option(False, "TF32 for float32 matmuls and cuDNN convolutions on CUDA (default: IEEE float32, "
                        "chosen rather than torch's defaults: the loss's float32 Gram needs it; bf16 autocast is unaffected)",
                        group="training", form="switch")
    cuda_graph: bool = option(True, "run the step eagerly on CUDA (default: captured once as a CUDA graph and "
                              "replayed)", group="training", form="negated")
    # output
    out_dir: str = option("runs/empssl", "folder for checkpoint.pt and metrics.jsonl; refused if it holds another "
                          "run's files", group="output")
    overwrite: bool = option(False, "replace another run's files in --out-dir (once this run has written its first "
                             "checkpoint)", group="output", form="switch")
    checkpoint_every: int = option(0, "steps between checkpoints (0: at the end only)", group="output", type=int)
    resume: Optional[str] = option(None, "continue exactly from this checkpoint; its run's metrics.jsonl is cut back "
                                   "to the checkpoint's step", group="output", metavar="CHECKPOINT", show_default=False)
    log_every: int = option(10, "steps between log lines", group="output", type=positive_int)

    def model_config(self) -> Dict[str, Any]:
        return {field: getattr(self, field) for field in ckpt.MODEL_FIELDS}

    def validate(self) -> None:
        for name in ("num_patches", "batch_size", "epochs", "log_every"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.schedule_epochs is not None and (not isinstance(self.schedule_epochs, int) or self.schedule_epochs < 1):
            raise ValueError(f"schedule_epochs must be a positive integer or None, got {self.schedule_epochs!r}")
        if self.checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {self.checkpoint_every}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer or None, got {self.max_steps}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive number, got {self.lr}")
        if self.num_patches < 2:
            raise ValueError(f"num_patches must be >= 2 (the invariance term compares patches), got {self.num_patches}")


@dataclasses.dataclass
class TrainResult:
    encoder: torch.nn.Module
    checkpoint_path: str
    steps: int
    last_metrics: Dict[str, Any]
    seconds: float


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch.device; ValueError for anything else or a missing GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected cpu, cuda, cuda:N or auto"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; {expected}") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; {expected}")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    return resolved


def augment_config_for(image_size: int) -> AugmentConfig:
    """The augmentation recipe for square images of this size (SPEC.md section 4).

    32: CIFAR; 64: Tiny ImageNet; >= 128: the ImageNet recipe at that size; otherwise the CIFAR
    list at that size (a quarter-area crop resized back to the image size).
    """
    if image_size == 32:
        return AugmentConfig.cifar()
    if image_size == 64:
        return AugmentConfig.tinyimagenet()
    if image_size >= 128:
        return dataclasses.replace(AugmentConfig.imagenet(), output_size=image_size)
    return dataclasses.replace(AugmentConfig.cifar(), output_size=image_size)


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when asked, else nothing. Callers ask on CUDA only (``TrainState.bf16`` is
    False off CUDA); a CPU test asks on the CPU to trace this same region under torch.compile."""
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclasses.dataclass
class TrainState:
    """Everything one training step reads and writes: the step is ``train_step(state, images, image_ids)``.

    ``step`` (int64, 0-d), ``lr`` (float32, 0-d: the tensor LARS reads as its lr) and ``metric_sums``
    (float32 (3,): loss, tcr, inv summed since the loop last read them) are device tensors the step
    updates in place, so a captured CUDA graph advances them. ``permutation_generator`` and
    ``permutation`` (the current epoch's batch order) belong to the loop, not the step; they are here
    so that ``state_dict`` holds every random state of a run. The augmentation needs none: its
    random numbers are a function of (``seed``, ``step``, image index, patch). Under torch.distributed
    every rank holds the same random states (same seed, same draws), so rank 0's are every rank's.
    """

    encoder: torch.nn.Module
    forward: Callable[[torch.Tensor], torch.Tensor]  # patches -> z: the encoder
    # (state, patches, batch size) -> (loss, tcr, inv): ``forward_and_loss``, or its torch.compile'd form (--compile)
    forward_and_loss: Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    augment: MultiPatchAugment
    criterion: EMPSSLLoss
    optimizer: torch.optim.Optimizer
    schedule: Callable  # step counter tensor -> lr factor tensor (CosineFactor)
    base_lr: float
    num_patches: int
    seed: int
    bf16: bool
    step: torch.Tensor
    lr: torch.Tensor
    metric_sums: torch.Tensor
    permutation_generator: torch.Generator
    permutation: Optional[torch.Tensor] = None
    world_size: int = 1  # ranks of the process group; > 1: the step averages the gradients over them

    @property
    def device(self) -> torch.device:
        return self.step.device

    def state_dict(self) -> Dict[str, Any]:
        """Model, optimiser, step (an int: reading it waits for the device), random states and permutation."""
        rng = {"torch_cpu": torch.get_rng_state(), "permutation": self.permutation_generator.get_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return {"model": self.encoder.state_dict(), "optimizer": self.optimizer.state_dict(), "step": int(self.step),
                "rng": rng, "permutation": None if self.permutation is None else self.permutation.cpu()}

    def load_state_dict(self, state: Dict[str, Any], path: str = "state") -> None:
        """Continue from ``state_dict()``'s output (``path`` names it in errors)."""
        ckpt.load_model_state(self.encoder, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # load_state_dict put the saved (CPU) lr tensor there
            group["lr"] = self.lr
        self.step.fill_(int(state["step"]))
        self.lr.fill_(self.base_lr * self.schedule(int(state["step"])))
        torch.set_rng_state(state["rng"]["torch_cpu"])
        self.permutation_generator.set_state(state["rng"]["permutation"])
        if self.device.type == "cuda" and "torch_cuda" in state["rng"]:
            torch.cuda.set_rng_state(state["rng"]["torch_cuda"], self.device)
        self.permutation = None if state["permutation"] is None else state["permutation"].to(self.device)


def build_train_state(config: TrainConfig, device: torch.device, num_train: int, image_size: int) -> TrainState:
    """A fresh state for ``config`` (encoder initialised from ``config.seed``) on ``device``."""
    from .optim import CosineFactor, build_optimizer, schedule_steps

    torch.manual_seed(config.seed)  # every rank draws the same initial weights: no broadcast needed
    encoder = build_encoder(**config.model_config()).to(device)
    world_size = distributed.world_size()
    if config.sync_bn and world_size > 1:
        encoder = distributed.convert_sync_batchnorm(encoder)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    bf16 = config.bf16 and device.type == "cuda"
    augment = MultiPatchAugment(augment_config_for(image_size), backend=config.augment_backend,
                                out_dtype=torch.bfloat16 if bf16 else torch.float32, channels_last=channels_last)
    # gather: the coding rate and the invariance term of the global batch (a no-op on one process)
    criterion = EMPSSLLoss(config.eps, config.inv_coef, config.tcr_coef, backend=config.loss_backend, gather=True)
    schedule = CosineFactor(schedule_steps(num_train, config.batch_size, config.schedule_epochs or config.epochs))
    lr = torch.full((), config.lr * schedule(0), dtype=torch.float32, device=device)
    step_forward_and_loss = forward_and_loss
    if config.compile:
        # one graph of forward and loss, so Inductor fuses BatchNorm, ReLU and residual traffic across them; under
        # torch.distributed the loss's gather (an autograd.Function around all_gather) may break the graph: allowed
        step_forward_and_loss = torch.compile(forward_and_loss, fullgraph=world_size == 1)
    return TrainState(
        encoder=encoder, forward=encoder, forward_and_loss=step_forward_and_loss, augment=augment,
        criterion=criterion, optimizer=build_optimizer(encoder, lr=lr), schedule=schedule, base_lr=config.lr,
        num_patches=config.num_patches, seed=config.seed, bf16=bf16,
        step=torch.zeros((), dtype=torch.int64, device=device), lr=lr,
        metric_sums=torch.zeros(3, device=device),
        permutation_generator=torch.Generator(device=device).manual_seed(config.seed), world_size=world_size)


def forward_and_loss(state: TrainState, patches: torch.Tensor, batch_size: int) -> Tuple[torch.Tensor, ...]:
    """(loss, tcr, inv) of the patch-major ``patches`` of ``batch_size`` images: the encoder under
    autocast, then the loss in float32 (float64 z stays float64, for exact checks). One function,
    so that ``--compile`` makes forward and loss one graph."""
    profile = torch.autograd.profiler.record_function
    with profile("empssl.forward"), autocast_context(patches.device, state.bf16):
        z = state.forward(patches)
    with profile("empssl.loss"):
        z = z if z.dtype == torch.float64 else z.float()
        return state.criterion(z.reshape(state.num_patches, batch_size, -1), return_parts=True)


def train_step(state: TrainState, images: torch.Tensor, image_ids: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """One EMP-SSL step on ``images`` (uint8 (b, H, W, 3) or (b, 3, H, W), on the state's device), the
    images ``image_ids`` (int64 (b,)) of the data set. Returns (loss, tcr, inv), detached 0-d device tensors.

    Only device work: no host read, no copy of Python data, the same ops every step (so a CUDA graph
    can replay it). The record_function markers name the phases for profilers and op counters.
    """
    profile = torch.autograd.profiler.record_function
    with profile("empssl.augment"):
        patches = state.augment(images, state.num_patches, seed=state.seed, step=state.step, image_ids=image_ids)
    loss, tcr, inv = state.forward_and_loss(state, patches, images.shape[0])
    with profile("empssl.backward"):
        params = [p for group in state.optimizer.param_groups for p in group["params"]]
        # autograd.grad rather than backward(): torch.compile traces it (trace_autograd_ops); same gradients
        grads = torch.autograd.grad(loss, params)
        if state.world_size > 1:  # DDP's reducer hooks backward(), not autograd.grad: one explicit all-reduce
            grads = distributed.average_gradients(grads)
        for param, grad in zip(params, grads):
            param.grad = grad
    with profile("empssl.optimizer"):
        state.lr.copy_(state.schedule(state.step) * state.base_lr)  # this step's lr, from the counter
        state.optimizer.step()
        state.step.add_(1)
        parts = torch.stack((loss.detach(), tcr.detach(), inv.detach())).float()
        state.metric_sums.add_(parts)
    return parts[0], parts[1], parts[2]


def _check_resume_config(path: str, stored: Dict[str, Any], config: TrainConfig) -> None:
    ckpt.check_same_model(path, {f: stored.get(f) for f in ckpt.MODEL_FIELDS}, config.model_config())
    changed = [f"{f}: {stored.get(f)!r} -> {getattr(config, f)!r}" for f in _TRAJECTORY_FIELDS
               if f in stored and stored[f] != getattr(config, f)]
    if changed:
        warnings.warn(f"resuming {path} with changed settings ({'; '.join(changed)}): the run will not match an "
                      f"uninterrupted one")


def _check_resume_data(path: str, resumed: Dict[str, Any], config: TrainConfig, data: ImageDataset) -> None:
    """ValueError unless the data set has the size the checkpoint was trained on (its stored permutation indexes it)."""
    stored = resumed.get("dataset", {})
    num_train, image_size = int(data.train_images.shape[0]), data.image_size[0]
    if stored.get("num_train", num_train) == num_train and stored.get("image_size", image_size) == image_size:
        return
    stored_config = resumed.get("config", {})
    changed = [f"--{f.replace('_', '-')} {stored_config.get(f)!r} -> {getattr(config, f)!r}" for f in _DATA_FIELDS
               if f in stored_config and stored_config[f] != getattr(config, f)]
    why = "changed settings: " + "; ".join(changed) if changed else "the data set itself changed"
    raise ValueError(f"cannot resume {path}: it was trained on {stored.get('num_train')} images of "
                     f"{stored.get('image_size')}x{stored.get('image_size')} ({stored.get('name')}), this run has "
                     f"{num_train} of {image_size}x{image_size} ({data.name}); {why}. Resume with the checkpoint's data "
                     f"settings, or start a new run in another --out-dir")


def _check_out_dir(config: TrainConfig, same_run: bool) -> bool:
    """Refuse an out_dir that holds another run's files (unless overwrite); True when it holds such files."""
    check_writable_folder(config.out_dir, "--out-dir")
    present = [name for name in RUN_FILES if os.path.exists(os.path.join(config.out_dir, name))]
    if present and not same_run and not config.overwrite:
        own_checkpoint = os.path.join(config.out_dir, CHECKPOINT_NAME)
        raise ValueError(f"--out-dir {config.out_dir} already holds another run ({', '.join(present)}); continue it with "
                         f"--resume {own_checkpoint}, replace it with --overwrite (its files go once this run writes "
                         f"its first checkpoint), or pass another --out-dir")
    return bool(present)


def _remove_stale_temporaries(folder: str) -> None:
    """Temporary files of a checkpoint or metrics write that a kill interrupted (the next run in the folder removes them)."""
    if not os.path.isdir(folder):
        return
    for name in os.listdir(folder):
        if name.startswith(ckpt.TEMP_PREFIX):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(folder, name))


def _read_metrics_until(path: str, run_id: Optional[str], step: int) -> List[Dict[str, Any]]:
    """The lines of ``path`` that this run wrote up to ``step`` (a kill may have left a partial last line: skipped)."""
    if not os.path.exists(path):
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict) and record.get("run_id") == run_id and record.get("step", 0) <= step:
                records.append(record)
    return records


class _MetricsLog:
    """metrics.jsonl of one run. Until the run owns its folder (``owned``), lines wait in memory: under --overwrite the
    old run's file stays until this run's first checkpoint, then ``take_over`` replaces it atomically."""

    def __init__(self, path: str, records: List[Dict[str, Any]], owned: bool):
        self.path, self.pending, self.owned = path, list(records), owned and not records
        if owned and records:
            self.take_over()

    def write(self, record: Dict[str, Any]) -> None:
        if not self.owned:
            self.pending.append(record)
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")

    def take_over(self) -> None:
        """Replace the file with the pending lines (atomically: a kill leaves the old file or the new one)."""
        ckpt.write_atomically(self.path, lambda f: f.write("".join(json.dumps(r) + "\n" for r in self.pending).encode()))
        self.pending, self.owned = [], True


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; ``checkpoint_path`` holds ``step`` (None: stopped at once by a second signal)."""

    def __init__(self, signum: int, step: Optional[int], checkpoint_path: Optional[str]):
        self.signum, self.step, self.checkpoint_path = signum, step, checkpoint_path
        name = signal.Signals(signum).name
        if checkpoint_path is None:
            message = f"stopped at once by a second {name}; no checkpoint of the current step was written"
        else:
            message = (f"interrupted by {name} after step {step}: checkpoint written to {checkpoint_path}; continue with "
                       f"--resume {checkpoint_path}")
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class _StopRequest:
    """SIGINT/SIGTERM handlers for the training loop: the first signal asks the loop to stop after the current step
    (with a checkpoint); a second one raises at once. Outside the main thread (where handlers cannot be set) a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise TrainingInterrupted(signum, None, None)
        self.signum = signum
        print(f"\nempssl: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


class _LateReader:
    """The step's device-side metric sums, read by the host one log window late.

    ``close_window`` queues a non-blocking copy of the sums to the host and zeroes them (both on
    the device's stream, after the window's steps), and hands the previous window to ``emit``: its
    copy finished long ago, so the host does not wait for the device. ``flush`` emits the window
    just closed at once (waiting for it), before a checkpoint and at the end.
    """

    def __init__(self, sums: torch.Tensor, emit: Callable[[Dict[str, Any], List[float], int], None]):
        self.sums, self.emit = sums, emit
        self.host = torch.empty(sums.shape, dtype=sums.dtype, pin_memory=sums.is_cuda)
        self.pending: Optional[Tuple[Dict[str, Any], int, Any]] = None  # (record, steps, copy-done event)

    def close_window(self, record: Dict[str, Any], window_steps: int) -> None:
        self.flush()  # the previous window (long done on the device); the host buffer is free again
        self.host.copy_(self.sums, non_blocking=True)
        self.sums.zero_()
        event = None
        if self.sums.is_cuda:
            event = torch.cuda.Event()
            event.record()
        self.pending = (record, window_steps, event)

    def flush(self) -> None:
        if self.pending is None:
            return
        record, window_steps, event = self.pending
        self.pending = None
        if event is not None:
            event.synchronize()
        self.emit(record, self.host.tolist(), window_steps)


class _CapturedStep:
    """``train_step`` on CUDA, recorded once as a CUDA graph and replayed with the batch copied into static buffers.

    The first ``WARMUP`` calls run eagerly on a side stream (cuDNN/cuBLAS/Triton autotuning and lazily made state,
    such as the momentum buffers, must exist before capture); the next call records the step and every call from
    then on replays it. Only ``train`` on a CUDA device with ``cuda_graph`` makes one.
    """

    WARMUP = 3

    def __init__(self, state: TrainState):
        self.state, self.warmup_left = state, self.WARMUP
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.side_stream = torch.cuda.Stream(state.device)

    def __call__(self, images: torch.Tensor, image_ids: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        if self.warmup_left > 0:
            self.warmup_left -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side_stream):
                outputs = train_step(self.state, images, image_ids)
            torch.cuda.current_stream().wait_stream(self.side_stream)
            return outputs
        if self.graph is None:
            self.images, self.image_ids = images.clone(), image_ids.clone()
            for group in self.state.optimizer.param_groups:
                for param in group["params"]:
                    param.grad = None  # the graph's gradients live in its own memory pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, runs nothing: the replay below runs this step
                self.outputs = train_step(self.state, self.images, self.image_ids)
        else:
            self.images.copy_(images)
            self.image_ids.copy_(image_ids)
        self.graph.replay()
        return self.outputs


@contextlib.contextmanager
def _cudnn_benchmark(enabled: bool):
    """cudnn.benchmark on while training on CUDA (the step's shapes never change), restored after."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def float32_precision(tf32: bool):
    """TF32 on or off for float32 matmuls and cuDNN convolutions, as chosen (``TrainConfig.tf32``), not as
    inherited from torch's defaults (matmul off, cuDNN on) or a caller's settings; restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


def check_world_size(batch_size: int, world_size: int) -> None:
    """ValueError unless the global batch splits evenly over the ranks."""
    if batch_size % world_size:
        raise ValueError(f"--batch-size {batch_size} is the global batch and must divide by the world size "
                         f"{world_size} (each rank takes batch_size / world_size images); pass a multiple of "
                         f"{world_size}, or start another number of processes")


def _collective_failure(err: BaseException, rank: int, step: int, last_checkpoint: str) -> distributed.DistributedError:
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return distributed.DistributedError(
        f"rank {rank}: a collective with the other ranks failed during step {step + 1} (another rank died, or did not "
        f"answer within the distributed timeout); stopping: {last_checkpoint} [{type(err).__name__}: {first_line}]")


def train(config: TrainConfig, data: Optional[ImageDataset] = None) -> TrainResult:
    """Train an EMP-SSL encoder; returns it with the path of the final checkpoint.

    ``data``: an already loaded data set (else ``config.dataset`` is loaded). Every input is checked before any
    file is written. Raises NonFiniteLossError if the loss turns NaN/inf (the last good checkpoint stays in place)
    and TrainingInterrupted after SIGINT/SIGTERM (a checkpoint of the step reached is written first).

    Under torch.distributed (an initialised process group; ``empssl train`` under torchrun makes one) every rank
    calls it: ``batch_size`` is the global batch, each rank trains on its slice of the same global permutation, the
    loss is the global batch's and the gradients are averaged over the ranks, so the run is one process's (with
    ``sync_bn`` its BatchNorm statistics too). Rank 0 alone reads the checkpoint to resume (and sends it to the
    others) and writes the run's files. An input error on any rank stops every rank before training; a collective
    that fails or times out (a rank died or stalled) raises DistributedError, the last checkpoint intact.
    """
    world, rank = distributed.world_size(), distributed.rank()
    main = rank == 0  # the rank that writes the run's files
    checkpoint_path = os.path.join(config.out_dir, CHECKPOINT_NAME)
    metrics_path = os.path.join(config.out_dir, METRICS_NAME)
    resumed, same_run, holds_other_run = None, False, False
    with distributed.same_outcome_on_every_rank():
        config.validate()
        check_world_size(config.batch_size, world)
        device = resolve_device(config.device)
        if main:
            resumed = ckpt.load_checkpoint(config.resume) if config.resume else None
            if resumed is not None:
                ckpt.check_train_state(config.resume, resumed)
                _check_resume_config(config.resume, resumed.get("config", {}), config)
            # resuming from this folder's own checkpoint continues the run that owns the folder
            same_run = resumed is not None and os.path.realpath(config.resume) == os.path.realpath(checkpoint_path)
            holds_other_run = _check_out_dir(config, same_run)
    # rank 0's checkpoint for every rank (the other nodes need no copy of the file)
    resumed, same_run = distributed.broadcast_object((resumed, same_run))

    with distributed.same_outcome_on_every_rank():
        if data is None:
            data = load_dataset(config.dataset, root=config.root, download=config.download, image_size=config.image_size,
                                cache_dir=config.cache_dir, on_bad_image=config.on_bad_image, seed=config.data_seed,
                                train_size=config.train_size, show_progress=config.progress and main)
        if resumed is not None:
            _check_resume_data(config.resume, resumed, config, data)
        images = data.train_images.to(device)
        num_train = images.shape[0]
        check_batch_size(config.batch_size, num_train)
        height, width = images.shape[1:3]
        if height != width:
            raise ValueError(f"training images must be square, got {height}x{width}")
    shapes = distributed.all_gather_object(tuple(images.shape))
    if len(set(shapes)) > 1:  # each rank loaded its own copy: the permutation indexes the same images on every rank
        raise ValueError(f"the ranks loaded different training sets (images of shape {shapes} by rank); give every "
                         f"node the same data set")

    state = build_train_state(config, device, num_train, int(height))
    steps_per_epoch = num_train // config.batch_size
    local_batch = config.batch_size // world
    total_steps = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    step = 0  # the host's copy of state.step (the loop never reads the device's)
    run_id = uuid.uuid4().hex[:12]  # tags this run's metrics lines: a resume keeps only its own
    elapsed_before = 0.0  # seconds of the run before this session (continued on resume)
    history: List[Dict[str, Any]] = []
    if resumed is not None:
        state.load_state_dict(resumed, config.resume)
        step = int(resumed["step"])
        run_id = resumed.get("run_id")
        elapsed_before = float(resumed.get("elapsed_s", 0.0))
        if main:  # the run's metrics cut back to the checkpoint's step (steps logged after it will be logged again)
            history = _read_metrics_until(os.path.join(os.path.dirname(config.resume), METRICS_NAME), run_id, step)
            history.append({"event": "resume", "step": step, "elapsed_s": elapsed_before, "run_id": run_id})

    # every input is checked: from here on the folder is this run's (rank 0's alone)
    metrics = None
    if main:
        _remove_stale_temporaries(config.out_dir)
        metrics = _MetricsLog(metrics_path, history, owned=not holds_other_run or same_run)
    start = time.perf_counter()

    def write_checkpoint():
        ckpt.save_checkpoint(checkpoint_path, {
            **state.state_dict(),
            "train_state_version": ckpt.TRAIN_STATE_VERSION,
            "config": dataclasses.asdict(config),
            "model_config": config.model_config(),
            "epoch": step // steps_per_epoch,
            "dataset": {"name": data.name, "num_train": num_train, "image_size": int(height)},
            "run_id": run_id,
            "world_size": world,  # for the record: any number of ranks that divides batch_size resumes it
            "elapsed_s": elapsed_before + time.perf_counter() - start,
        })
        if not metrics.owned:  # --overwrite: the old run's metrics go only now that its checkpoint is replaced
            metrics.take_over()

    last_checkpoint_step = step if same_run else None
    last_metrics: Dict[str, Any] = {}

    def checkpoint_note() -> str:
        if last_checkpoint_step is None:
            return "no checkpoint was written"
        return f"the last good checkpoint {checkpoint_path} (step {last_checkpoint_step}) is intact"

    def emit(record: Dict[str, Any], sums: List[float], window_steps: int) -> None:
        """Write a closed window's line once its sums reached the host; NonFiniteLossError if the loss was NaN/inf.
        Every rank holds the global batch's loss, so every rank stops at the same window."""
        nonlocal last_metrics
        if not math.isfinite(sums[0]):
            raise NonFiniteLossError(f"the loss became non-finite (NaN or inf) at or before step {record['step']}; "
                                     f"stopping: {checkpoint_note()}. Try a lower --lr, or --bf16 off.")
        means = [value / window_steps for value in sums]
        last_metrics = {"step": record["step"], "epoch": record["epoch"], "loss": means[0], "tcr": means[1],
                        "inv": means[2], **{k: v for k, v in record.items() if k not in ("step", "epoch")}}
        if metrics is not None:
            metrics.write(last_metrics)
        bar.set_postfix(loss=f"{means[0]:.3f}", tcr=f"{means[1]:.3f}", inv=f"{means[2]:.4f}",
                        lr=f"{last_metrics['lr']:.4f}", patches_s=f"{last_metrics['patches_per_s']:.0f}")

    from tqdm import tqdm

    bar = tqdm(total=total_steps, initial=step, desc="train", unit="step", disable=not (config.progress and main),
               dynamic_ncols=True)
    reader = _LateReader(state.metric_sums, emit)
    window_start, window_steps = start, 0
    state.encoder.train()
    captured = device.type == "cuda" and config.cuda_graph
    if captured and world > 1:
        # a replayed graph's NCCL collectives are not watched by the timeout watchdog: a dead rank would hang the
        # others for ever. Eager steps keep the timeout (and capture with NCCL is untested here).
        captured = False
        if main:
            print(f"empssl: {world} ranks: the step runs eagerly (no CUDA graph), so that a rank that dies makes the "
                  f"others stop at the distributed timeout", file=sys.stderr, flush=True)
    run_step = _CapturedStep(state) if captured else functools.partial(train_step, state)
    with _StopRequest() as stop, _cudnn_benchmark(device.type == "cuda"), float32_precision(config.tf32):
        try:
            while step < total_steps:
                position = step % steps_per_epoch
                if position == 0:  # a new epoch: a new permutation (a resumed mid-epoch run keeps its stored one)
                    state.permutation = torch.randperm(num_train, device=device, generator=state.permutation_generator)
                # this rank's slice of the global batch (the whole batch on one process)
                first = position * config.batch_size + rank * local_batch
                image_ids = state.permutation[first:first + local_batch]
                run_step(images[image_ids], image_ids)
                step += 1
                window_steps += 1

                # every rank stops after the same step, whichever rank the signal reached
                signum = stop.signum if world == 1 else distributed.agree_on_stop(stop.signum)
                stopping = signum is not None
                checkpoint_now = ((config.checkpoint_every and step % config.checkpoint_every == 0)
                                  or step == total_steps or stopping)
                # a line at every checkpoint too: the file cut back to a checkpoint on resume still covers every step
                if step % config.log_every == 0 or checkpoint_now:
                    now = time.perf_counter()
                    reader.close_window({
                        "step": step, "epoch": step / steps_per_epoch,
                        "lr": config.lr * state.schedule(step),  # the next step's, as LambdaLR reported it
                        "patches_per_s": window_steps * config.batch_size * config.num_patches / max(now - window_start, 1e-9),
                        "elapsed_s": elapsed_before + now - start,
                        "run_id": run_id,
                    }, window_steps)
                    window_start, window_steps = now, 0
                if checkpoint_now:
                    reader.flush()  # a checkpoint waits for its step: it never holds a step past a non-finite loss
                    if main:
                        write_checkpoint()
                    last_checkpoint_step = step
                bar.update(1)
                if stopping and step < total_steps:
                    raise TrainingInterrupted(signum, step, checkpoint_path)
        except BaseException as err:
            with contextlib.suppress(Exception):  # the last window's line still lands; the first error is the one raised
                reader.flush()
            if world > 1 and distributed.is_collective_failure(err):
                resume = f"; continue with --resume {checkpoint_path}" if last_checkpoint_step is not None else ""
                raise _collective_failure(err, rank, step, checkpoint_note() + resume) from err
            raise
        finally:
            bar.close()
        if step > 0 and last_checkpoint_step != step and main:  # resumed at or past the end: still leave a checkpoint
            write_checkpoint()
    if metrics is not None and not metrics.owned:  # nothing to train (resumed at the end) and nothing written
        metrics.take_over()
    if main:
        write_training_curves(metrics_path)  # curves.png beside it, where matplotlib is installed
    return TrainResult(state.encoder, checkpoint_path, step, last_metrics, time.perf_counter() - start)


__all__ = ["TrainConfig", "TrainResult", "TrainState", "build_train_state", "train_step", "NonFiniteLossError",
           "TrainingInterrupted", "train", "check_world_size", "augment_config_for", "resolve_device", "autocast_context",
           "float32_precision"]
