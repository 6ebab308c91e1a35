"""The EMP-SSL training loop (docs/method.md sections 1 and 5): ``train(config)``.

``train`` checks every input, then the loop runs: a batch is an index slice of a per-epoch random permutation of
the training images (uint8), whose pixels come from a batch source (``empssl.data.batches``: the set held on the
training device, or each step's images read ahead from the on-disk store); each step is ``training.step.train_step``
(on CUDA captured once as a CUDA graph and replayed, ``step_variant``); the run's files are its ``RunFolder``'s (rank
0 holds the folder's lock for the whole call). The host reads the step's metric sums every ``log_every`` steps one
window late (``LateReader``: a non-blocking copy queued when a window closes is read when the next one closes), so
the non-finite check is one window late too; at a checkpoint the sums are read at once, so no checkpoint holds a
step past a non-finite loss. Before each checkpoint the parameters and BatchNorm buffers are checked: a non-finite
one stops the run as a non-finite loss does (NonFiniteStateError). Checkpoints hold the state and the current
epoch's permutation, so a resumed run continues exactly: on the CPU it reaches bitwise the same parameters as an
uninterrupted run; ``elapsed_s`` continues the run's clock. SIGINT/SIGTERM stop the loop after the current step
with a checkpoint of that step (``training.signals``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch

from .. import checkpoint as ckpt
from .. import distributed
from ..augment.config import smallest_image_size
from ..config import TrainConfig
from ..data.batches import InMemoryBatches, batch_source
from ..data.dataset import DataError, ImageDataset, check_batch_size, check_patch_size, fingerprint
from ..data.load import load_dataset
from ..device import check_fits, cudnn_benchmark, float32_precision, resolve_device
from .memory import check_step_fits
from .monitor import OnlineMonitor
from .run_folder import RunFolder, check_resume_data
from .signals import StopRequest, TrainingInterrupted
from .step import TrainState, build_train_state, captured_train_step, train_step


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the last checkpoint written before it is intact."""


class NonFiniteStateError(NonFiniteLossError):
    """A parameter or BatchNorm buffer became NaN or infinite (the loss may still be finite); no checkpoint of it."""


@dataclasses.dataclass
class TrainResult:
    """``steps``: the run's step at the end; this call trained ``first_step + 1`` to ``steps`` of ``total_steps``."""

    encoder: torch.nn.Module
    checkpoint_path: str
    steps: int
    last_metrics: Dict[str, Any]
    seconds: float
    first_step: int = 0
    total_steps: int = 0

    @property
    def steps_this_run(self) -> int:  # 0: resumed at the end, nothing trained
        return self.steps - self.first_step


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
    with contextlib.ExitStack() as held:
        folder = None
        with distributed.same_outcome_on_every_rank():
            config.validate()
            distributed.check_world_size(config.batch_size, distributed.world_size())
            device = resolve_device(config.device)
            if distributed.rank() == 0:
                folder = RunFolder(config.out_dir).open(config)
                held.push(lambda kind, error, trace: folder.close(failed=kind is not None))
        # rank 0's checkpoint for every rank (the other nodes need no copy of the file)
        resumed, same_run = distributed.broadcast_object((folder.resumed, folder.same_run) if folder else None)
        images = _training_images(config, data, resumed, device)
        state = build_train_state(config, device, images.source.num_images, images.patch_size, images.data.train_sizes)
        with contextlib.closing(images.source):
            return _TrainingLoop(config, state, images, folder, resumed, same_run).run()


@dataclasses.dataclass
class TrainingImages:
    """What the loop trains on, checked on every rank: the data set, the source that reads its training images
    (in memory or from the store: ``data.batches``), the patch size and the images' fingerprint (a resume must train
    on these very images)."""

    data: ImageDataset
    source: Any
    patch_size: int
    fingerprint: str


def _training_images(
    config: TrainConfig, data: Optional[ImageDataset], resumed: Optional[Dict[str, Any]], device: torch.device
) -> TrainingImages:
    """The training images (uint8, square canvases; in memory on ``device`` or read from the store, by
    ``config.stream``), checked on every rank (a resume: against the checkpoint's fingerprint)."""
    world, rank = distributed.world_size(), distributed.rank()
    with distributed.same_outcome_on_every_rank():
        if data is None:
            data = load_dataset(
                config.dataset,
                root=config.root,
                download=config.download,
                image_size=config.image_size,
                cache_dir=config.cache_dir,
                on_bad_image=config.on_bad_image,
                seed=config.data_seed,
                train_size=config.train_size,
                device=device,
                show_progress=config.progress and rank == 0,
                max_aspect=config.max_aspect,
                stream=config.stream,
                need_test=False,
            )
        patch_size = config.patch_size or data.recipe_patch_size
        check_patch_size(data, patch_size, smallest_image_size())
        in_memory = isinstance(data.train_images, torch.Tensor)
        if in_memory and data.train_images.device != device:
            check_fits(
                data.train_images.numel(),
                device,
                f"the {data.train_images.shape[0]} training images of {data.name}",
                "use fewer images (--train-size), a smaller --image-size, or --stream on",
            )
        source = batch_source(data.train_images, device, config.batch_size, config.batch_size // world, rank)
        data_fingerprint = fingerprint(source.tensor if in_memory else data.train_images)
        if resumed is not None:
            check_resume_data(config.resume, resumed, config, data, data_fingerprint)
        num_train = int(data.train_images.shape[0])
        check_batch_size(config.batch_size, num_train)
        height, width = data.image_size
        if height != width:
            raise DataError(f"training images must be square canvases, got {height}x{width}")
        check_step_fits(config, device, patch_size, world)
        if data.note and rank == 0:  # every input checked: the run's first line, where its images are and why
            print(f"empssl: {data.name}: {data.note}", file=sys.stderr, flush=True)
    shapes = distributed.all_gather_object((num_train, height, width))
    if len(set(shapes)) > 1:  # each rank loaded its own copy: the permutation indexes the same images on every rank
        raise ValueError(
            f"the ranks loaded different training sets (images of shape {shapes} by rank); give every "
            f"node the same data set"
        )
    return TrainingImages(data, source, patch_size, data_fingerprint)


class _TrainingLoop:
    """The steps of one ``train`` call after every input is checked (``run``), with the helpers it calls.

    ``step`` is the host's copy of ``state.step`` (the loop never reads the device's); ``last_checkpoint_step`` the
    step of the last checkpoint known intact in the folder (None: none yet). ``folder``: the run folder on rank 0,
    None on the other ranks (they write nothing).
    """

    def __init__(
        self,
        config: TrainConfig,
        state: TrainState,
        images: TrainingImages,
        folder: Optional[RunFolder],
        resumed: Optional[Dict[str, Any]],
        same_run: bool,
    ):
        self.config, self.state, self.folder = config, state, folder
        self.data, self.source, self.data_fingerprint = images.data, images.source, images.fingerprint
        source, data, patch_size = images.source, images.data, images.patch_size
        self.world, self.rank = distributed.world_size(), distributed.rank()
        self.num_train, self.image_size, self.patch_size = source.num_images, source.canvas[0], patch_size
        self.ordered = False  # whether the source holds the current epoch's permutation
        self.steps_per_epoch = self.num_train // config.batch_size
        self.local_batch = config.batch_size // self.world
        self.total_steps = self.steps_per_epoch * config.epochs
        if config.max_steps is not None:
            self.total_steps = min(self.total_steps, config.max_steps)
        self.checkpoint_path = RunFolder(config.out_dir).checkpoint_path  # named in every rank's messages
        self.step, self.elapsed_before = 0, 0.0  # the run's step and its seconds before this call
        self.run_id = uuid.uuid4().hex[:12]  # tags this run's metrics lines: a resume keeps only its own
        if resumed is not None:
            state.load_state_dict(resumed, config.resume, self.num_train)
            self.step = int(resumed["step"])
            self.run_id = resumed.get("run_id")
            self.elapsed_before = float(resumed.get("elapsed_s", 0.0))
        self.first_step = self.step
        self.last_checkpoint_step = self.step if same_run else None
        if folder is not None:  # every input is checked: from here on the folder is this run's
            if self.step < self.total_steps:
                config.warn_short_schedule(self.steps_per_epoch, self.total_steps)
            folder.start(self.run_id, config.resume if resumed is not None else None, self.step, self.elapsed_before)
        train_images = source.tensor if isinstance(source, InMemoryBatches) else data.train_images
        self.monitor = OnlineMonitor(config, data, train_images, state.bf16, patch_size, state.device)
        self.start = time.perf_counter()
        self.last_metrics: Dict[str, Any] = {}
        self.bar = None

    def run(self) -> TrainResult:
        from tqdm import tqdm

        config, state = self.config, self.state
        self.bar = tqdm(
            total=self.total_steps,
            initial=self.step,
            desc="train",
            unit="step",
            disable=not (config.progress and self.folder is not None),
            dynamic_ncols=True,
        )
        reader = LateReader(state.metric_sums, self.emit)
        window_start, window_steps, window_monitor_s = self.start, 0, 0.0
        state.encoder.train()
        run_step = self.step_function()
        with StopRequest() as stop, cudnn_benchmark(state.device.type == "cuda"), float32_precision(config.tf32):
            try:
                while self.step < self.total_steps:
                    batch = self.next_batch()
                    monitor_now = self.monitor.due(self.step + 1)
                    if monitor_now:  # the step's own embeddings, before its update (training.monitor)
                        self.monitor.step_embeddings(state, *batch)
                    run_step(*batch)
                    self.step += 1
                    window_steps += 1
                    monitored = self.monitor.measure(state, self.step) if monitor_now else {}
                    window_monitor_s += monitored.get("monitor_s", 0.0)

                    # every rank stops after the same step, whichever rank the signal reached
                    signum = stop.signum if self.world == 1 else distributed.agree_on_stop(stop.signum)
                    checkpoint_now = (
                        (config.checkpoint_every and self.step % config.checkpoint_every == 0)
                        or self.step == self.total_steps
                        or signum is not None
                    )
                    # a line at every checkpoint too: the file cut back to a checkpoint on resume covers every step;
                    # and at every monitored step, which carries the monitoring's values
                    if self.step % config.log_every == 0 or checkpoint_now or monitor_now:
                        now = time.perf_counter()
                        record = self.window_record(window_steps, now - window_start - window_monitor_s)
                        reader.close_window({**record, **monitored}, window_steps)
                        window_start, window_steps, window_monitor_s = now, 0, 0.0
                    if checkpoint_now:
                        reader.flush()  # a checkpoint waits for its step: it never holds a step past a non-finite loss
                        self.checkpoint()
                    self.bar.update(1)
                    if signum is not None and self.step < self.total_steps:
                        raise TrainingInterrupted(signum, self.step, self.checkpoint_path)
            except BaseException as err:
                with contextlib.suppress(Exception):  # the last window's line still lands; the first error is raised
                    reader.flush()
                if self.world > 1 and distributed.is_collective_failure(err):
                    resume = (
                        f"; continue with --resume {self.checkpoint_path}"
                        if self.last_checkpoint_step is not None
                        else ""
                    )
                    raise distributed.collective_failure(
                        err, self.rank, self.step, self.checkpoint_note() + resume
                    ) from err
                raise
            finally:
                self.bar.close()
            if self.step > 0 and self.last_checkpoint_step != self.step and self.folder is not None:
                self.write_checkpoint()  # resumed at or past the end: still leave a checkpoint
        if self.folder is not None:
            self.folder.finish()
        return TrainResult(
            state.encoder,
            self.checkpoint_path,
            self.step,
            self.last_metrics,
            time.perf_counter() - self.start,
            self.first_step,
            self.total_steps,
        )

    def next_batch(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(uint8 images, their indices) of this rank's slice of the step's global batch (the whole batch on one
        process); a new epoch draws a new permutation (a resumed mid-epoch run keeps its stored one), which the
        batch source gets too (a store's reader reads ahead in it)."""
        state, batch_size = self.state, self.config.batch_size
        position = self.step % self.steps_per_epoch
        if position == 0:
            state.permutation = torch.randperm(
                self.num_train, device=state.device, generator=state.permutation_generator
            )
        if position == 0 or not self.ordered:
            self.source.set_order(state.permutation, position)
            self.ordered = True
        first = position * batch_size + self.rank * self.local_batch
        image_ids = state.permutation[first : first + self.local_batch]
        return self.source.images(position, image_ids), image_ids

    def step_function(self) -> Callable[[torch.Tensor, torch.Tensor], Any]:
        """``train_step`` of the state, captured as a CUDA graph where that is on and safe."""
        captured = self.state.device.type == "cuda" and self.config.captured
        if captured and self.world > 1:
            # a replayed graph's NCCL collectives are not watched by the timeout watchdog: a dead rank would hang the
            # others for ever. Eager steps keep the timeout (and capture with NCCL is untested here).
            captured = False
            if self.folder is not None:
                print(
                    f"empssl: {self.world} ranks: the step runs eagerly (no CUDA graph), so that a rank that dies "
                    f"makes the others stop at the distributed timeout",
                    file=sys.stderr,
                    flush=True,
                )
        return captured_train_step(self.state) if captured else functools.partial(train_step, self.state)

    def window_record(self, window_steps: int, seconds: float) -> Dict[str, Any]:
        """The host's part of a log line when a window of ``window_steps`` steps closes after ``seconds``."""
        config = self.config
        return {
            "step": self.step,
            "epoch": self.step / self.steps_per_epoch,
            "lr": config.lr * self.state.schedule(self.step),  # the next step's, as LambdaLR reported it
            "patches_per_s": window_steps * config.batch_size * config.num_patches / max(seconds, 1e-9),
            "elapsed_s": self.elapsed_before + time.perf_counter() - self.start,
            "run_id": self.run_id,
        }

    def emit(self, record: Dict[str, Any], sums: List[float], window_steps: int) -> None:
        """Write a closed window's line once its sums reached the host; NonFiniteLossError if the loss was NaN/inf.
        Every rank holds the global batch's loss, so every rank stops at the same window."""
        if not math.isfinite(sums[0]):
            raise NonFiniteLossError(
                f"the loss became non-finite (NaN or inf) at or before step {record['step']}; "
                f"stopping: {self.checkpoint_note()}. Try a lower --lr, or --bf16 off."
            )
        means = [value / window_steps for value in sums]
        self.last_metrics = {
            "step": record["step"],
            "epoch": record["epoch"],
            "loss": means[0],
            "tcr": means[1],
            "inv": means[2],
            **{k: v for k, v in record.items() if k not in ("step", "epoch")},
        }
        if self.folder is not None:
            self.folder.log(self.last_metrics)
        self.bar.set_postfix(
            loss=f"{means[0]:.3f}",
            tcr=f"{means[1]:.3f}",
            inv=f"{means[2]:.4f}",
            lr=f"{self.last_metrics['lr']:.4f}",
            patches_s=f"{self.last_metrics['patches_per_s']:.0f}",
        )

    def checkpoint(self) -> None:
        """Check the state finite (on every rank: each stops at the same step), then rank 0 writes it."""
        bad = ckpt.non_finite_tensors(self.state.encoder.state_dict())
        if bad:
            raise NonFiniteStateError(
                f"the encoder's {', '.join(bad[:3])}{' and more' if len(bad) > 3 else ''} became "
                f"{ckpt.NON_FINITE} at or before step {self.step} although the loss is "
                f"finite; stopping: {self.checkpoint_note()}. Try a lower --lr."
            )
        if self.folder is not None:
            self.write_checkpoint()
        self.last_checkpoint_step = self.step

    def write_checkpoint(self) -> None:
        """The state checked finite: by ``checkpoint``, or by the resume that loaded it."""
        self.folder.write_checkpoint(
            {
                **self.state.state_dict(),
                "train_state_version": ckpt.TRAIN_STATE_VERSION,
                "config": dataclasses.asdict(self.config),
                "model_config": self.config.model_config(),
                "epoch": self.step // self.steps_per_epoch,
                "dataset": {
                    "name": self.data.name,
                    "num_train": self.num_train,
                    "image_size": self.image_size,
                    "patch_size": self.patch_size,
                    "fingerprint": self.data_fingerprint,  # a resume must train on these very images
                },
                "run_id": self.run_id,
                "world_size": self.world,  # for the record: any number of ranks that divides batch_size resumes it
                "elapsed_s": self.elapsed_before + time.perf_counter() - self.start,
            }
        )

    def checkpoint_note(self) -> str:
        if self.last_checkpoint_step is None:
            return "no checkpoint was written"
        return f"the last good checkpoint {self.checkpoint_path} (step {self.last_checkpoint_step}) is intact"


class LateReader:
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
