"""Evaluation on 2 gloo processes equals one process: each rank extracts the features of its slice of
the images (patches keyed by image index, so they do not depend on the split), the slices are
gathered, and every rank runs the probe and the kNN on the same features."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from free_port import free_port

from empssl import distributed
from empssl.config import EvalConfig
from empssl.data.synthetic import make_synthetic
from empssl.evaluation.features import extract_features
from empssl.evaluation.pipeline import evaluate
from empssl.models.encoder import build_encoder

WORLD = 2
# 13 test images, 3 per chunk: each rank extracts 3 chunks (ids 0..8 and 9..17, those past 12 padding)
TRAIN, TEST, PATCHES, CHUNK_PATCHES = 23, 13, 2, 6


def _setup(seed):
    torch.manual_seed(seed)
    encoder = build_encoder(width=0.125, hidden_dim=32, z_dim=16)
    return encoder, make_synthetic(TRAIN, TEST, 8, seed=seed)


def _run(seed):
    """Features at small chunks (several per rank, the last padded) and the full evaluation."""
    encoder, data = _setup(seed)
    features = extract_features(
        encoder, data.test_images, PATCHES, max_patches_per_forward=CHUNK_PATCHES, seed=seed, split_key=1
    )
    result = evaluate(encoder, data, EvalConfig(num_patches=PATCHES, linear_epochs=3, seed=seed, progress=False))
    return features, {k: v for k, v in result.items() if not k.endswith("_seconds")}


def _worker(rank, port, seed, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        assert (distributed.rank(), distributed.world_size()) == (rank, WORLD)
        results[rank] = _run(seed)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two processes with a process group: ~17 s
def test_two_rank_evaluation_equals_one_process(one_torch_thread):
    seed = int(torch.randint(1000, (1,)))
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_worker, args=(free_port(), seed, results), nprocs=WORLD, join=True)
    assert (distributed.rank(), distributed.world_size()) == (0, 1)
    features, result = _run(seed)
    for rank in range(WORLD):
        rank_features, rank_result = results[rank]
        assert rank_features.shape == (TEST, 32)
        torch.testing.assert_close(rank_features, features, rtol=1e-6, atol=1e-7)
        assert rank_result == result  # the same probe and kNN accuracies on every rank
