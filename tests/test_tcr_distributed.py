"""EMPSSLLoss(gather=True) on 2 gloo processes equals the single-process loss on the
concatenated batch, and DDP-style gradient averaging gives the single-process gradient."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from free_port import free_port

from empssl import EMPSSLLoss
from empssl.distributed import gather_batch

WORLD = 2
N, B_LOCAL, D_IN, D = 3, 5, 6, 8


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, WORLD * B_LOCAL, D_IN, generator=g, dtype=torch.float64)  # global batch
    weight = torch.randn(D, D_IN, generator=g, dtype=torch.float64)  # a shared "network"
    return x, weight


def _loss_and_grads(x, weight, backend):
    """Loss of the network's embeddings, d loss / d weight and d loss / d z."""
    weight = weight.clone().requires_grad_()
    z = torch.nn.functional.normalize(x @ weight.T, dim=-1)
    z.retain_grad()
    loss = EMPSSLLoss(backend=backend, gather=True)(z)
    loss.backward()
    return loss.detach(), weight.grad, z.grad


BACKENDS = ("cpu", "reference")


def _worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        x, weight = _inputs()
        local = x[:, rank * B_LOCAL : (rank + 1) * B_LOCAL]
        for backend in BACKENDS:
            loss, weight_grad, z_grad = _loss_and_grads(local, weight, backend)
            # what DDP does with the parameter gradients: average over ranks
            dist.all_reduce(weight_grad)
            results[rank, backend] = (loss, weight_grad / WORLD, z_grad)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes with a process group: ~12 s
def test_gather_matches_single_process_on_the_global_batch():
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(
        _worker, args=(free_port(), results), nprocs=WORLD, join=True
    )  # one spawn for both backends (process start dominates)
    x, weight = _inputs()
    for rank, backend in [(r, name) for r in range(WORLD) for name in BACKENDS]:
        loss, weight_grad, z_grad = _loss_and_grads(x, weight, backend)  # no process group: gather is a no-op
        rank_loss, rank_weight_grad, rank_z_grad = results[rank, backend]
        torch.testing.assert_close(rank_loss, loss, rtol=1e-12, atol=0)
        torch.testing.assert_close(rank_weight_grad, weight_grad, rtol=1e-10, atol=1e-12)
        # every rank holds the same loss; the local slice gets the sum over ranks of its gradient
        local = z_grad[:, rank * B_LOCAL : (rank + 1) * B_LOCAL]
        torch.testing.assert_close(rank_z_grad, WORLD * local, rtol=1e-10, atol=1e-12)


def test_gather_is_a_noop_without_a_process_group_and_checks_its_input():
    z = torch.randn(2, 3, 4)
    assert gather_batch(z) is z
    with pytest.raises(TypeError, match="z must be a torch.Tensor"):
        gather_batch([1.0])
