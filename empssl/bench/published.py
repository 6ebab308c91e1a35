"""The authors' training step as they ran it, the baseline of ``empssl bench epoch``'s speed-up.

The published code (EMP-SSL's main.py) on the same synthetic CIFAR-shaped data and model: PIL augmentation in
DataLoader workers, a float32 NCHW encoder, the Total Coding Rate as a Python loop of d x d ``torch.logdet``, LARS.
It never sets torch's TF32 switches, so it ran with torch's defaults: TF32 for cuDNN convolutions on, for float32
matmuls off (``TORCH_DEFAULT_TF32``). The fair baseline is that; a row with TF32 off as well shows what IEEE float32
convolutions would cost (labelled as such, never the speed-up's baseline).
"""

from __future__ import annotations

import time
from typing import Tuple

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..device import float32_precision
from ..models.encoder import build_encoder
from ..optim import build_optimizer
from ..reference import tcr as reference_tcr
from . import common

# torch's own defaults (torch >= 1.12), under which the authors' code ran: (matmul TF32, cuDNN convolution TF32)
TORCH_DEFAULT_TF32: Tuple[bool, bool] = (False, True)
TF32_OFF: Tuple[bool, bool] = (False, False)
PREFETCH_FACTOR = 2  # batches each DataLoader worker prepares ahead (torch's default, set explicitly)


def tf32_label(tf32: Tuple[bool, bool]) -> str:
    matmul, cudnn = tf32
    if tf32 == TORCH_DEFAULT_TF32:
        return "torch defaults: TF32 convolutions"
    return f"TF32 matmul {'on' if matmul else 'off'}, convolutions {'on' if cudnn else 'off'}"


class _PublishedViews(torch.utils.data.Dataset):
    """The authors' data path: per image, ``num_patches`` views of the torchvision/PIL pipeline (patch-major after
    collate)."""

    def __init__(self, images, num_patches: int, length: int):
        self.images, self.num_patches, self.length = images, num_patches, length
        self.pipeline = None

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        from PIL import Image

        from .augment import pil_pipeline

        if self.pipeline is None:  # made in the worker
            self.pipeline = pil_pipeline(32)
        image = Image.fromarray(self.images[index % len(self.images)])
        return torch.stack([self.pipeline(image) for _ in range(self.num_patches)])


def published_loss(z: torch.Tensor, eps: float = 0.2, inv_coef: float = 200.0) -> torch.Tensor:
    """The authors' objective on patch-major z (n, b, d): a Python loop of d x d logdets and F.cosine_similarity."""
    tcr = -reference_tcr.coding_rate_published(z, eps).mean()
    inv = -F.cosine_similarity(z, z.mean(0, keepdim=True), dim=-1).mean()
    return tcr + inv_coef * inv


def published_schedule(steps: int, workers: int) -> Tuple[int, int]:
    """(untimed steps, timed steps) of the published path with ``workers`` DataLoader workers.

    The untimed steps use up every batch the workers prepared before the first step (``workers x PREFETCH_FACTOR``),
    so each timed step waits for its batch as in a long run. The workers start together and each delivers one batch
    per round, so the batches arrive in bursts of ``workers``: the timed steps are whole rounds (``steps`` rounded
    up), or a partial burst would be counted as steps taken in no time."""
    if workers == 0:  # the main process loads each batch when asked: nothing is ready ahead
        return 1, steps
    return workers * PREFETCH_FACTOR, -(-steps // workers) * workers


def time_published(
    device: torch.device,
    config: TrainConfig,
    steps: int,
    workers: int,
    images,
    tf32: Tuple[bool, bool] = TORCH_DEFAULT_TF32,
) -> float:
    """Seconds per step of the published path (``images``: uint8 numpy (N, 32, 32, 3)) under ``tf32`` (matmul,
    cuDNN): DataLoader workers with PIL, float32 NCHW encoder, naive loss, LARS. At least ``steps`` are timed
    (``published_schedule``)."""
    import PIL  # noqa: F401  (here, not in a worker: a missing one is an ImportError the caller reports)
    import torchvision  # noqa: F401

    torch.manual_seed(0)
    encoder = build_encoder(config.arch, config.width, config.hidden_dim, config.z_dim).to(device).train()
    optimizer = build_optimizer(encoder, lr=config.lr)
    warmup, timed = published_schedule(steps, workers)
    views = _PublishedViews(images, config.num_patches, (warmup + timed) * config.batch_size)
    loader = torch.utils.data.DataLoader(
        views,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
        prefetch_factor=PREFETCH_FACTOR if workers else None,
    )
    start = None
    with float32_precision(tf32[0], cudnn=tf32[1]):
        for index, batch in enumerate(loader):  # the workers' start-up and the batches ready ahead are not timed
            patches = batch.transpose(0, 1).reshape(-1, *batch.shape[2:]).to(device, non_blocking=True)
            z = encoder(patches).reshape(config.num_patches, config.batch_size, -1)
            loss = published_loss(z, config.eps, config.inv_coef)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if index == warmup - 1:  # the clock starts before the first timed step waits for its batch
                common.synchronize(device)
                start = time.perf_counter()
        common.synchronize(device)
    return (time.perf_counter() - start) / timed
