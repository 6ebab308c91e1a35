"""One EMP-SSL training step (docs/method.md sections 1 and 5): ``TrainState`` and ``train_step``.

``train_step(state, images, image_ids)``: cut n augmented patches of each of b images with ``MultiPatchAugment``
(patch-major), embed the n*b patches, reshape z to (n, b, d), minimise ``EMPSSLLoss``, take a LARS step at the
cosine schedule's lr. The step is a function of a ``TrainState`` (encoder, optimiser, schedule, step counter on
the device, random state) and of device tensors (the uint8 batch and its images' indices in the data set); it
returns device tensors only and never synchronises with the host, so on CUDA ``captured_train_step`` records it
once as a CUDA graph and replays it:

- the augmentation draws from the counter-based source keyed by (seed, step counter, image index in
  the data set, patch): no generator state, and an image's patches do not depend on the batch split.
- the lr is computed on the device from the step counter (``CosineFactor``) into the 0-d tensor LARS
  reads; no ``LambdaLR.step()`` (it reads the lr back to the host).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Dict, Optional, Tuple

import torch

from .. import checkpoint as ckpt
from .. import distributed
from ..augment.config import augment_config_for
from ..augment.multipatch import MultiPatchAugment
from ..config import TrainConfig
from ..device import CudaGraphCall, autocast_context
from ..loss import EMPSSLLoss
from ..models.encoder import build_encoder
from ..optim import CosineFactor, build_optimizer, schedule_steps

# eager steps before the capture: cuDNN/cuBLAS/Triton autotuning and the momentum buffers exist by then
CAPTURE_WARMUP_STEPS = 3


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
    augment: MultiPatchAugment
    criterion: EMPSSLLoss
    optimizer: torch.optim.Optimizer
    schedule: CosineFactor  # the lr factor of a step counter (an int, or the device tensor in the step)
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
    # int64 (N, 2) on the device: each training image's (height, width) in its canvas, where the images keep their
    # own aspect ratios (the step gathers its batch's rows); None: every image fills the canvas
    image_sizes: Optional[torch.Tensor] = None
    # --step-variant compiled(-captured): torch.compile's artifact of ``forward_and_loss`` (a graph made of this
    # state's modules), which ``train_step`` runs in its place; None: the step runs ``forward_and_loss`` itself
    compiled_forward_and_loss: Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = None

    @property
    def device(self) -> torch.device:
        return self.step.device

    def state_dict(self) -> Dict[str, Any]:
        """Model, optimiser, step (an int: reading it waits for the device), random states and permutation."""
        rng = {"torch_cpu": torch.get_rng_state(), "permutation": self.permutation_generator.get_state()}
        if self.device.type == "cuda":
            rng["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "model": self.encoder.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "step": int(self.step),
            "rng": rng,
            "permutation": None if self.permutation is None else self.permutation.cpu(),
        }

    def check_state_dict(self, state: Dict[str, Any], path: str, num_train: Optional[int] = None) -> None:
        """CheckpointError naming the first field of ``state`` (checked by ``checkpoint.check_train_state``) whose
        sizes do not fit this state: the model's tensors, the optimiser's groups and the shapes of its buffers
        against the parameters, the device type it was trained on, the generators' states (sizes and contents), the
        permutation against ``num_train`` images."""
        ckpt.check_state_shapes(path, "model", self.encoder.state_dict(), state["model"])
        groups, saved = self.optimizer.param_groups, state["optimizer"]["param_groups"]
        if len(saved) != len(groups):
            raise ckpt.CheckpointError(
                f"checkpoint {path} does not fit: its optimizer has {len(saved)} parameter groups, this one "
                f"{len(groups)}; use another checkpoint"
            )
        params: Dict[Any, torch.Tensor] = {}
        for index, (group, saved_group) in enumerate(zip(groups, saved)):
            ids = saved_group.get("params")
            if not isinstance(ids, list) or len(ids) != len(group["params"]) or len(set(map(repr, ids))) != len(ids):
                raise ckpt.CheckpointError(
                    f"checkpoint {path} does not fit: optimizer/param_groups/{index}/params does not list this "
                    f"group's {len(group['params'])} parameters; use another checkpoint"
                )
            params.update(zip(ids, group["params"]))
            for key, value in group.items():
                if key in ("params", "lr"):
                    continue
                loaded = saved_group.get(key)
                same_kind = isinstance(loaded, bool) if isinstance(value, bool) else type(loaded) is type(value)
                if not same_kind or (isinstance(loaded, float) and not math.isfinite(loaded)):
                    raise ckpt.CheckpointError(
                        f"checkpoint {path} has an unusable field optimizer/param_groups/{index}/{key}: expected "
                        f"{'a finite ' if isinstance(value, float) else ''}{type(value).__name__}, got {loaded!r}; "
                        f"use another checkpoint"
                    )
        for key, buffers in state["optimizer"]["state"].items():
            where = f"optimizer/state/{key}"
            if key not in params or not isinstance(buffers, dict):
                raise ckpt.CheckpointError(
                    f"checkpoint {path} does not fit: {where} belongs to no parameter of this model; use another "
                    f"checkpoint"
                )
            param = params[key]
            for name, buffer in buffers.items():
                if not isinstance(buffer, torch.Tensor) or buffer.shape != param.shape or buffer.dtype != param.dtype:
                    shown = (
                        f"{buffer.dtype} {tuple(buffer.shape)}" if isinstance(buffer, torch.Tensor) else repr(buffer)
                    )
                    raise ckpt.CheckpointError(
                        f"checkpoint {path} does not fit: {where}/{name} is {shown}, its parameter is {param.dtype} "
                        f"{tuple(param.shape)}; use another checkpoint"
                    )
        trained_on = "cuda" if "torch_cuda" in state["rng"] else "cpu"  # state_dict saves torch_cuda on CUDA only
        if trained_on != self.device.type:
            raise ckpt.CheckpointError(
                f"checkpoint {path} was trained on {trained_on}: its random states continue on that device type "
                f"only; resume it with --device {trained_on}"
            )
        generators = {"torch_cpu": torch.get_rng_state(), "permutation": self.permutation_generator.get_state()}
        if self.device.type == "cuda":
            generators["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        for name, current in generators.items():
            saved_state = state["rng"][name]
            if saved_state.shape != current.shape:
                raise ckpt.CheckpointError(
                    f"checkpoint {path} has an unusable field rng/{name}: a generator state of "
                    f"{saved_state.numel()} bytes, this generator's has {current.numel()}; use another checkpoint"
                )
            try:  # set_state checks the state's contents (a forged mt19937 state fails here, not after loading)
                torch.Generator(device="cpu" if name == "torch_cpu" else self.device).set_state(saved_state)
            except RuntimeError as err:
                raise ckpt.CheckpointError(
                    f"checkpoint {path} has an unusable field rng/{name}: not a valid generator state "
                    f"({str(err).splitlines()[0]}); use another checkpoint"
                ) from err
        permutation = state["permutation"]
        if permutation is not None and num_train is not None:
            if permutation.numel() != num_train or not torch.equal(
                torch.sort(permutation).values, torch.arange(num_train)
            ):
                raise ckpt.CheckpointError(
                    f"checkpoint {path} has an unusable field permutation: not an order of the {num_train} training "
                    f"images; use another checkpoint"
                )

    def load_state_dict(self, state: Dict[str, Any], path: str = "state", num_train: Optional[int] = None) -> None:
        """Continue from ``state_dict()``'s output (``path`` names it in errors), every size checked first
        (``check_state_dict``)."""
        self.check_state_dict(state, path, num_train)
        ckpt.load_model_state(self.encoder, state["model"], path)
        self.optimizer.load_state_dict(state["optimizer"])
        for group in self.optimizer.param_groups:  # load_state_dict put the saved (CPU) lr tensor there
            group["lr"] = self.lr
        self.step.fill_(int(state["step"]))
        self.lr.fill_(self.base_lr * self.schedule(int(state["step"])))
        torch.set_rng_state(state["rng"]["torch_cpu"])
        self.permutation_generator.set_state(state["rng"]["permutation"])
        if self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["torch_cuda"], self.device)
        self.permutation = None if state["permutation"] is None else state["permutation"].to(self.device)


def build_train_state(
    config: TrainConfig,
    device: torch.device,
    num_train: int,
    patch_size: int,
    image_sizes: Optional[torch.Tensor] = None,
) -> TrainState:
    """A fresh state for ``config`` (encoder initialised from ``config.seed``) on ``device``: patches of
    ``patch_size`` (the recipe for that size), cut from images of ``image_sizes`` (see ``TrainState``)."""
    torch.manual_seed(config.seed)  # every rank draws the same initial weights: no broadcast needed
    encoder = build_encoder(**config.model_config()).to(device)
    world_size = distributed.world_size()
    if config.sync_bn and world_size > 1:
        encoder = distributed.convert_sync_batchnorm(encoder)
    channels_last = device.type == "cuda" if config.channels_last is None else config.channels_last
    if channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    bf16 = config.bf16 and device.type == "cuda"
    augment = MultiPatchAugment(
        augment_config_for(patch_size),
        backend=config.augment_backend,
        out_dtype=torch.bfloat16 if bf16 else torch.float32,
        channels_last=channels_last,
    )
    # gather: the coding rate and the invariance term of the global batch (a no-op on one process)
    criterion = EMPSSLLoss(config.eps, config.inv_coef, config.tcr_coef, backend=config.loss_backend, gather=True)
    schedule = CosineFactor(schedule_steps(num_train, config.batch_size, config.schedule_epochs or config.epochs))
    lr = torch.full((), config.lr * schedule(0), dtype=torch.float32, device=device)
    compiled_forward_and_loss = None
    if config.compiled:
        # one graph of forward and loss, so Inductor fuses BatchNorm, ReLU and residual traffic across them; under
        # torch.distributed the loss's gather (an autograd.Function around all_gather) may break the graph: allowed
        compiled_forward_and_loss = torch.compile(forward_and_loss, fullgraph=world_size == 1)
    return TrainState(
        encoder=encoder,
        augment=augment,
        criterion=criterion,
        optimizer=build_optimizer(encoder, lr=lr),
        schedule=schedule,
        base_lr=config.lr,
        num_patches=config.num_patches,
        seed=config.seed,
        bf16=bf16,
        step=torch.zeros((), dtype=torch.int64, device=device),
        lr=lr,
        metric_sums=torch.zeros(3, device=device),
        permutation_generator=torch.Generator(device=device).manual_seed(config.seed),
        world_size=world_size,
        image_sizes=None if image_sizes is None else image_sizes.to(device),
        compiled_forward_and_loss=compiled_forward_and_loss,
    )


def forward_and_loss(state: TrainState, patches: torch.Tensor, batch_size: int) -> Tuple[torch.Tensor, ...]:
    """(loss, tcr, inv) of the patch-major ``patches`` of ``batch_size`` images: the encoder under
    autocast, then the loss in float32 (float64 z stays float64, for exact checks). One function,
    so that ``--step-variant compiled`` makes forward and loss one graph."""
    profile = torch.autograd.profiler.record_function
    with profile("empssl.forward"), autocast_context(patches.device, state.bf16):
        z = state.encoder(patches)
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
        sizes = None if state.image_sizes is None else state.image_sizes[image_ids]
        patches = state.augment(
            images, state.num_patches, seed=state.seed, step=state.step, image_ids=image_ids, image_sizes=sizes
        )
    loss, tcr, inv = (state.compiled_forward_and_loss or forward_and_loss)(state, patches, images.shape[0])
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


def _drop_gradients(state: TrainState) -> None:
    for group in state.optimizer.param_groups:
        for param in group["params"]:
            param.grad = None  # the graph's gradients live in its own memory pool


def captured_train_step(state: TrainState) -> CudaGraphCall:
    """``train_step`` on CUDA as ``step(images, image_ids)``: ``CAPTURE_WARMUP_STEPS`` eager steps, then recorded
    once as a CUDA graph and replayed with the batch copied into static buffers."""
    return CudaGraphCall(
        functools.partial(train_step, state),
        state.device,
        warmup=CAPTURE_WARMUP_STEPS,
        before_capture=functools.partial(_drop_gradients, state),
    )
