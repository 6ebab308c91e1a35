"""Online monitoring of a training run (docs/training.md section 9): every ``monitor_every`` steps, how good the
features are and whether they are collapsing, logged with that step's metrics line.

- kNN top-1 of a fixed held-out subset: ``monitor_size`` test images (the queries) against ``monitor_size`` train
  images (the bank), both drawn once from ``data_seed`` with a generator of their own, embedded by the current
  encoder as ``empssl eval`` embeds them (``extract_features``: the BatchNorm-folded encoder in the eval dtype, a
  bag of ``monitor_patches`` patches per image) and classified by the same weighted kNN (``knn_classify``).
- The effective rank (RankMe: exp of the entropy of the normalised singular values) and the coding rate R (the
  mean over the step's patch groups) of the step's own embeddings z, and a ``CollapseWarning`` when R falls to
  ``COLLAPSE_MARGIN`` times its collapsed value 1/2 log(1 + d/eps) (all rows of a group equal).

The step itself is untouched (the same graph, captured or compiled as before): the step's embeddings are computed
again just before the monitored step, from the same patches (the augmentation is keyed by seed, step and image) by
the same weights in training mode, with the BatchNorm statistics that forward updates put back, so the run's
trajectory does not depend on monitoring. The host waits for the device only at monitored steps.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from typing import Any, Dict, Optional

import torch

from .. import distributed
from ..augment.config import augment_config_for
from ..augment.multipatch import MultiPatchAugment
from ..config import EvalConfig, TrainConfig
from ..data.batches import subset_of
from ..data.dataset import ImageDataset
from ..device import autocast_context
from ..evaluation.features import SPLIT_KEYS, extract_features
from ..evaluation.probe import LabelledFeatures, knn_classify
from ..loss import coding_rate

DEFAULT_EVERY = 100  # steps between monitoring points where the data set has labels and --monitor-every is not given
COLLAPSE_MARGIN = 1.5  # warn below 1.5 x the collapsed R: about two directions left of d at the recipe's sizes
_KNN = EvalConfig()  # the kNN of `empssl eval`: k and temperature


class CollapseWarning(UserWarning):
    """The coding rate of the step's embeddings is near its collapsed value: they are collapsing to a point."""


def is_labelled(data: ImageDataset) -> bool:
    """Whether both splits of ``data`` carry class labels (a data set of unlabelled images has none)."""
    return (
        getattr(data, "labelled", True) is not False
        and getattr(data, "train_labels", None) is not None
        and getattr(data, "test_labels", None) is not None
        and len(data.classes) > 0
    )


def collapsed_coding_rate(dim: int, eps: float) -> float:
    """R of a group whose rows are one unit vector: 1/2 logdet(I + d/(b eps) b u u^T) = 1/2 log(1 + d/eps)."""
    return 0.5 * math.log1p(dim / eps)


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """RankMe of the rows of ``z`` (N, d): exp(-sum p log p) with p the singular values over their sum (0-d
    float32; between 1 for rows on one line and min(N, d) for a flat spectrum)."""
    singular = torch.linalg.svdvals(z.float())
    p = singular / singular.sum().clamp_min(torch.finfo(torch.float32).tiny)
    return torch.exp(-torch.special.xlogy(p, p).sum())


class OnlineMonitor:
    """The monitoring of one run: ``due(step)`` says whether ``step`` is monitored; ``step_embeddings`` (before
    that step runs) recomputes its embeddings, ``measure`` (after it) returns the values for its metrics line."""

    def __init__(
        self,
        config: TrainConfig,
        data: ImageDataset,
        train_images,
        bf16: bool,
        patch_size: Optional[int] = None,
        device: Optional[torch.device] = None,
    ):
        """``train_images``: the training images as the step reads them (on the device, or an ``ImageStore``: the
        bank is read from it once); ``patch_size``: the run's (default: the images' size)."""
        labelled = is_labelled(data)
        every = config.monitor_every
        self.every = (DEFAULT_EVERY if labelled else 0) if every is None else every
        self.knn = labelled and self.every > 0
        self.eps, self.seed, self.patches, self.bf16 = config.eps, config.seed, config.monitor_patches, bf16
        self.loss_backend = config.loss_backend
        self.seconds = 0.0
        self.embeddings: Optional[torch.Tensor] = None
        if self.every > 0 and not labelled and distributed.rank() == 0:
            print(
                f"empssl: {data.name} has no labels: the online kNN is off; the effective rank and coding rate are "
                f"monitored every {self.every} steps",
                file=sys.stderr,
                flush=True,
            )
        if not self.knn:
            return
        device = device or train_images.device
        generator = torch.Generator().manual_seed(config.data_seed)  # its own: the run's random states are untouched
        bank = torch.randperm(train_images.shape[0], generator=generator)[: config.monitor_size].sort().values
        queries = torch.randperm(data.test_images.shape[0], generator=generator)[: config.monitor_size].sort().values
        self.device = device
        # held on the device, or left in their stores and read at each monitoring point (a run from a store stays
        # within its memory)
        self.bank_images = subset_of(train_images, bank, device)
        self.query_images = subset_of(data.test_images, queries, device)
        self.bank_labels = data.train_labels.index_select(0, bank.to(data.train_labels.device)).to(device)
        self.query_labels = data.test_labels.index_select(0, queries.to(data.test_labels.device)).to(device)
        sizes = (data.train_sizes, data.test_sizes)
        self.bank_sizes, self.query_sizes = (
            None if size is None else size.index_select(0, index.to(size.device)).to(device)
            for size, index in zip(sizes, (bank, queries))
        )
        self.num_classes = data.num_classes
        self.augment = MultiPatchAugment(
            augment_config_for(patch_size or int(train_images.shape[1])),
            backend=config.augment_backend,
            out_dtype=torch.bfloat16 if bf16 else torch.float32,
            channels_last=device.type == "cuda",
        )

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def _clock(self, device: torch.device) -> float:
        if device.type == "cuda":  # the steps queued before are not the monitoring's time
            torch.cuda.synchronize(device)
        return time.perf_counter()

    @torch.no_grad()
    def step_embeddings(self, state, images: torch.Tensor, image_ids: torch.Tensor) -> None:
        """The embeddings z the step about to run computes (``state``: its TrainState; ``images``, ``image_ids``: its
        batch): its patches, its weights, training mode; the BatchNorm buffers this forward updates are restored, and
        the random numbers it draws (a backbone's dropout) come from a fork of the generators: the step's own."""
        start = self._clock(state.device)
        buffers = [buffer.clone() for buffer in state.encoder.buffers()]
        sizes = None if state.image_sizes is None else state.image_sizes[image_ids]  # as train_step cuts them
        patches = state.augment(
            images, state.num_patches, seed=state.seed, step=state.step, image_ids=image_ids, image_sizes=sizes
        )
        cuda = [state.device] if state.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda), autocast_context(patches.device, state.bf16):
            self.embeddings = state.encoder(patches).float()
        for buffer, saved in zip(state.encoder.buffers(), buffers):
            buffer.copy_(saved)
        self.seconds = self._clock(state.device) - start  # the forward's device time too, not the step window's

    @torch.no_grad()
    def measure(self, state, step: int) -> Dict[str, Any]:
        """The monitoring values of ``step`` (just taken, after ``step_embeddings``): effective_rank, coding_rate,
        collapsed_coding_rate, knn_top1 (with labels) and monitor_s (the seconds monitoring took)."""
        start = self._clock(state.device)
        z, self.embeddings = self.embeddings, None
        groups = z.reshape(state.num_patches, -1, z.shape[-1])
        values = torch.stack((effective_rank(z), coding_rate(groups, self.eps, self.loss_backend).mean()))
        record: Dict[str, Any] = {}
        if self.knn:
            features = [
                extract_features(
                    state.encoder,
                    images,
                    self.patches,
                    self.augment,
                    bf16=self.bf16,
                    seed=self.seed,
                    split_key=key,
                    image_sizes=sizes,
                    device=self.device,
                )
                for images, sizes, key in (
                    (self.bank_images, self.bank_sizes, SPLIT_KEYS["train"]),
                    (self.query_images, self.query_sizes, SPLIT_KEYS["test"]),
                )
            ]
            labelled = LabelledFeatures(features[0], self.bank_labels, features[1], self.query_labels, self.num_classes)
            record["knn_top1"] = knn_classify(labelled, k=_KNN.knn_k, temperature=_KNN.knn_temperature)["top1"]
        rank, rate = values.tolist()  # the one wait for the device, at a monitored step only
        collapsed = collapsed_coding_rate(z.shape[-1], self.eps)
        record.update(effective_rank=rank, coding_rate=rate, collapsed_coding_rate=collapsed)
        record["monitor_s"] = self.seconds + time.perf_counter() - start
        if not rate >= COLLAPSE_MARGIN * collapsed:  # NaN included
            warnings.warn(
                CollapseWarning(
                    f"step {step}: the coding rate of the step's embeddings, R = {rate:.3f}, is near its collapsed "
                    f"value 1/2 log(1 + d/eps) = {collapsed:.3f} (effective rank {rank:.2f} of d = {z.shape[-1]}): "
                    f"the embeddings are collapsing; try a lower --lr or --inv-coef"
                ),
                stacklevel=1,
            )
        return record
