"""torch.distributed helpers: gathering the batch of every rank with a correct gradient.

EMP-SSL's coding rate is a function of the whole batch, so under data parallelism every rank
gathers the embeddings of all ranks along the batch dim b and computes the loss on the global
batch. Every rank then holds the same loss L(Z_global); DDP averages the parameter gradients
over the W ranks. For that average to be dL/dtheta, the gradient reaching rank r's local slice
must be the SUM over ranks of dL/dz_r (W identical copies), i.e. the backward of the gather is
an all-reduce (sum) followed by taking the local slice, as torch.distributed.nn.functional.all_gather
does. The popular ``GatherLayer`` that returns only the local slice of the local gradient yields
1/W of the right gradient after DDP's averaging.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


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
