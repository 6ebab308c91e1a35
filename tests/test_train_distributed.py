"""Data-parallel training on 2 gloo processes equals one process: the step in float64 (SyncBatchNorm, the
gathered loss, the averaged gradients), `torchrun -m empssl train` end to end, resume on another number of
ranks, and the failures: a batch that does not split, a rank that dies, a rank that stalls."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from empssl import checkpoint as ckpt
from empssl import distributed
from empssl import train as T
from empssl.data import make_synthetic

WORLD = 2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---- the step in float64: 2 ranks equal one process to rounding ------------------------------------------------

STEP_CONFIG = dict(dataset="synthetic", width=0.125, hidden_dim=32, z_dim=16, device="cpu", progress=False,
                   num_patches=3, batch_size=8, sync_bn=True, loss_backend="reference")
STEP_IMAGES, STEP_SIZE, STEPS = 16, 8, 3


def _float64_steps(rank, world):
    """STEPS train_steps of a float64 encoder on this rank's slices of the same global batches: the parameters and
    BatchNorm buffers reached, and the losses returned."""
    torch.set_num_threads(1)
    images = make_synthetic(STEP_IMAGES, 4, STEP_SIZE, seed=3).train_images
    state = T.build_train_state(T.TrainConfig(**STEP_CONFIG), torch.device("cpu"), STEP_IMAGES, STEP_SIZE)
    state.encoder.double()
    state.forward = lambda patches: state.encoder(patches.double())  # the patches themselves are the same floats
    generator = torch.Generator().manual_seed(5)
    local = STEP_CONFIG["batch_size"] // world
    losses = []
    for _ in range(STEPS):
        ids = torch.randperm(STEP_IMAGES, generator=generator)[:STEP_CONFIG["batch_size"]][rank * local:(rank + 1) * local]
        losses.append(torch.stack(T.train_step(state, images[ids], ids)))
    return {name: value.clone() for name, value in state.encoder.state_dict().items()}, torch.stack(losses)


def _step_worker(rank, port, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        results[rank] = _float64_steps(rank, WORLD)
    finally:
        distributed.destroy()


def test_two_ranks_take_the_steps_of_one_process_in_float64():
    results = mp.Manager().dict()
    mp.spawn(_step_worker, args=(_free_port(), results), nprocs=WORLD, join=True)
    expected_state, expected_losses = _float64_steps(0, 1)  # no process group: one process, plain BatchNorm
    torch.manual_seed(0)
    initial = T.build_encoder(**T.TrainConfig(**STEP_CONFIG).model_config()).state_dict()
    for rank in range(WORLD):
        state, losses = results[rank]
        torch.testing.assert_close(losses, expected_losses, rtol=1e-10, atol=0)  # every rank logs the global loss
        assert state.keys() == expected_state.keys()
        for name, value in expected_state.items():
            # parameters, and (sync BN) running statistics over the global batch
            torch.testing.assert_close(state[name], value.to(state[name].dtype), rtol=1e-9, atol=1e-12, msg=name)
    # the steps moved the weights well beyond that tolerance: the comparison is not trivially true
    moved = (expected_state["backbone.conv1.weight"] - initial["backbone.conv1.weight"].double()).abs().max()
    assert moved > 1e-4
