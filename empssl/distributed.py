"""torch.distributed helpers: the process group from torchrun, the batch of every rank with a correct
gradient, gradient averaging, BatchNorm statistics over every rank, and agreement between ranks.

EMP-SSL's coding rate is a function of the whole batch, so under data parallelism every rank
gathers the embeddings of all ranks along the batch dim b and computes the loss on the global
batch. Every rank then holds the same loss L(Z_global); the trainer averages the parameter gradients
over the W ranks (``average_gradients``, as DDP would). For that average to be dL/dtheta, the gradient
reaching rank r's local slice must be the SUM over ranks of dL/dz_r (W identical copies), i.e. the
backward of the gather is an all-reduce (sum) followed by taking the local slice, as
torch.distributed.nn.functional.all_gather does. The popular ``GatherLayer`` that returns only the local
slice of the local gradient yields 1/W of the right gradient after the averaging.

The same convention (each rank's backward carries W times its share, the average divides by W) holds for
``convert_sync_batchnorm``: the backward of a sum over ranks is a sum over ranks.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import Any, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

DEFAULT_TIMEOUT_S = 600.0  # NCCL's own default; a checkpoint write on rank 0 must fit in it (the others wait)
# torchrun's environment: a process that has these joins a process group
_LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_timeout = datetime.timedelta(seconds=DEFAULT_TIMEOUT_S)  # init_from_env's; a group made by the caller: the default
_host_group = None  # made on first use (see _host)


class DistributedError(RuntimeError):
    """A collective with the other ranks failed or timed out (a rank died or stalled), or another rank failed."""


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def launched_by_torchrun() -> bool:
    return all(name in os.environ for name in _LAUNCHER_VARIABLES)


MAX_TIMEOUT_S = 1e9  # about 31 years: "never" in practice, and well within what a timedelta holds


def init_from_env(device: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Join the process group torchrun's environment describes; returns the device this rank uses.

    Without that environment: nothing (one process), ``device`` unchanged. With it: NCCL on
    ``cuda:LOCAL_RANK`` when ``device`` is cuda (or auto and a GPU is visible), gloo on the CPU.
    ``timeout_s`` bounds every collective: a rank that dies or stalls makes the others fail after it.
    """
    if not launched_by_torchrun():
        return device
    if not 0 < timeout_s <= MAX_TIMEOUT_S:  # a timedelta holds at most 999,999,999 days
        raise ValueError(
            f"the distributed timeout (--dist-timeout) must be a positive number of seconds up to {MAX_TIMEOUT_S:g}, "
            f"got {timeout_s}"
        )
    if is_initialized():
        raise DistributedError("a process group is already initialised in this process")
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if device.startswith("cuda:"):
        raise ValueError(
            f"--device {device} under torchrun: every rank uses cuda:LOCAL_RANK; pass --device cuda "
            f"(or auto), and choose the GPUs with CUDA_VISIBLE_DEVICES"
        )
    global _timeout
    timeout = _timeout = datetime.timedelta(seconds=timeout_s)
    where = (
        f"rank {os.environ['RANK']} of {os.environ['WORLD_SIZE']}, master {os.environ['MASTER_ADDR']}:"
        f"{os.environ['MASTER_PORT']}"
    )
    try:
        if use_cuda:
            if not torch.cuda.is_available() or local_rank >= torch.cuda.device_count():
                raise ValueError(
                    f"local rank {local_rank} needs cuda:{local_rank}, but this machine has "
                    f"{torch.cuda.device_count()} CUDA GPU(s); start at most that many processes per node"
                )
            cuda = torch.device("cuda", local_rank)
            torch.cuda.set_device(cuda)
            dist.init_process_group("nccl", timeout=timeout, device_id=cuda)
            return str(cuda)
        dist.init_process_group("gloo", timeout=timeout)
    except dist.DistError as err:
        raise DistributedError(f"could not join the process group ({where}) within {timeout_s:g} s: {err}") from err
    return "cpu" if device == "auto" else device


def destroy() -> None:
    """Leave the process group (if any)."""
    global _host_group
    if is_initialized():
        dist.destroy_process_group()
    _host_group = None


def _host() -> Any:
    """A gloo group over every rank for small host-side agreements (the default group when it is gloo already),
    so that agreeing never waits for the GPU's stream."""
    global _host_group
    if dist.get_backend() == "gloo":
        return None  # the default group
    if _host_group is None:
        _host_group = dist.new_group(backend="gloo", timeout=_timeout)
    return _host_group


def agree_on_stop(signum: Optional[int]) -> Optional[int]:
    """The signal any rank received (the largest number; None if none did), the same on every rank.

    A SIGINT/SIGTERM reaches the ranks at different steps; agreeing after every step makes all of them stop after
    the same one (else one rank waits in the next step for ranks that stopped)."""
    flag = torch.tensor([signum or 0], dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=_host())
    return int(flag) or None


def broadcast_object(value: Any, source: int = 0) -> Any:
    """``value`` of rank ``source`` on every rank (pickled; tensors travel on the CPU)."""
    if world_size() == 1:
        return value
    holder = [value if rank() == source else None]
    dist.broadcast_object_list(holder, src=source, group=_host())
    return holder[0]


def all_gather_object(value: Any) -> List[Any]:
    """Every rank's ``value``, in rank order."""
    if world_size() == 1:
        return [value]
    values: List[Any] = [None] * world_size()
    dist.all_gather_object(values, value, group=_host())
    return values


@contextlib.contextmanager
def same_outcome_on_every_rank():
    """Run a block on every rank; if it raises on any rank, it raises on every rank.

    The rank that failed raises its own error; the others a DistributedError that quotes it. Without this, a rank
    whose input check failed exits while the others wait in their first collective until the timeout."""
    if world_size() == 1:
        yield
        return
    try:
        yield
    except Exception as err:
        all_gather_object(f"{type(err).__name__}: {err}")
        raise
    failures = [(index, message) for index, message in enumerate(all_gather_object(None)) if message is not None]
    if failures:
        index, message = failures[0]
        raise DistributedError(f"rank {index} stopped: {message}")


def is_collective_failure(err: BaseException) -> bool:
    """True when ``err`` is a failed or timed-out collective (a rank died or stalled), not a bug of this rank."""
    return isinstance(err, dist.DistError) or (
        isinstance(err, RuntimeError)
        and any(
            marker in str(err)
            for marker in (
                "Connection closed by peer",
                "Connection reset by peer",
                "Timed out",
                "timed out",
                "NCCL",
                "Gloo",
                "gloo",
            )
        )
    )


def check_world_size(batch_size: int, world_size: int) -> None:
    """ValueError unless the global batch splits evenly over the ranks."""
    if batch_size % world_size:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch and must divide by the world size "
            f"{world_size} (each rank takes batch_size / world_size images); pass a multiple of "
            f"{world_size}, or start another number of processes"
        )


def collective_failure(err: BaseException, rank: int, step: int, last_checkpoint: str) -> DistributedError:
    """The error a rank raises when a collective of step ``step + 1`` failed; ``last_checkpoint`` says what is
    intact."""
    first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return DistributedError(
        f"rank {rank}: a collective with the other ranks failed during step {step + 1} (another rank died, or did not "
        f"answer within the distributed timeout); stopping: {last_checkpoint} [{type(err).__name__}: {first_line}]"
    )


def average_gradients(grads: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """The mean over ranks of each gradient, in one all-reduce of one flat buffer (few large messages, and the
    same ops every step, so a CUDA graph could record it). Views into that buffer are returned."""
    from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

    flat = _flatten_dense_tensors(list(grads))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat.div_(world_size())
    return list(_unflatten_dense_tensors(flat, list(grads)))


def _check_device(z: torch.Tensor, group) -> None:
    backend = dist.get_backend(group)
    if backend == "nccl" and z.device.type != "cuda":
        raise ValueError(f"z is on {z.device} but the process group uses nccl, which needs CUDA tensors")


class _GatherBatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z: torch.Tensor, dim: int, group):
        ctx.dim, ctx.group = dim, group
        ctx.rank, ctx.local_size = dist.get_rank(group), z.shape[dim]
        parts = [torch.empty_like(z) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, z.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad.narrow(ctx.dim, ctx.rank * ctx.local_size, ctx.local_size), None, None


def gather_batch(z: torch.Tensor, dim: int = 1, group=None) -> torch.Tensor:
    """Concatenate ``z`` of every rank along ``dim`` (rank order), differentiably.

    Every rank must pass the same shape. The gradient of the local slice is the sum over ranks
    of the gradient of that slice (see the module docstring). No-op without a process group.
    """
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if world_size() == 1:
        return z
    _check_device(z, group)
    return _GatherBatch.apply(z, dim, group)


class _SumOverRanks(torch.autograd.Function):
    """The sum over ranks; its backward is the sum over ranks of the gradient (see the module docstring)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        total = x.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad


class SyncBatchNorm(nn.SyncBatchNorm):
    """``torch.nn.SyncBatchNorm`` that also runs on the CPU (torch's refuses CPU input).

    On the CPU, in training with more than one rank: the batch statistics are sums over every rank, mean first, then
    the centred sum of squares (two passes), with a differentiable sum over ranks, in float64 as the CPU's
    ``F.batch_norm`` accumulates its statistics. Elsewhere, torch's SyncBatchNorm (fused CUDA kernels, one
    all-gather).
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or not self.training or world_size() == 1:
            return super().forward(x)
        self._check_input_dim(x)
        dims = [0] + list(range(2, x.ndim))
        shape = [1, -1] + [1] * (x.ndim - 2)
        wide = x.double()
        local_count = torch.full((1,), x.numel() // x.shape[1], dtype=torch.float64)
        sums = _SumOverRanks.apply(torch.cat((wide.sum(dims), local_count)))
        count = sums[-1]
        mean = sums[:-1] / count
        centred = wide - mean.reshape(shape)
        var = _SumOverRanks.apply(centred.square().sum(dims)) / count
        y = centred * torch.rsqrt(var + self.eps).reshape(shape)
        if self.weight is not None:
            y = y * self.weight.reshape(shape)
        if self.bias is not None:
            y = y + self.bias.reshape(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
                unbiased = var * count / (count - 1)  # as F.batch_norm's running_var
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm layer replaced by ``SyncBatchNorm`` (parameters and buffers shared, so the
    state_dict keys and values are the same; a plain encoder loads it). ValueError for a subclass of BatchNorm with
    a forward of its own (timm's BatchNormAct2d adds an activation), which a SyncBatchNorm would not compute."""
    converted = module
    plain = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and type(module) not in (SyncBatchNorm, *plain):
        raise ValueError(
            f"--sync-bn: {type(module).__module__}.{type(module).__name__} is a BatchNorm with a forward of its own "
            f"that a SyncBatchNorm would not compute; train this backbone without --sync-bn"
        )
    if type(module) in plain:
        # an affine BatchNorm without a bias exists from torch 2.14 on (its bias= keyword); torch 2.11 has neither
        no_bias = {"bias": False} if module.affine and module.bias is None else {}
        converted = SyncBatchNorm(
            module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats, **no_bias
        )
        if module.affine:
            converted.weight, converted.bias = module.weight, module.bias
        converted.running_mean, converted.running_var = module.running_mean, module.running_var
        converted.num_batches_tracked = module.num_batches_tracked
        converted.training = module.training
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child))
    return converted
