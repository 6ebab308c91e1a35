"""The linear probe in plain PyTorch: nn.Linear, F.cross_entropy, autograd and torch.optim.SGD with
CosineAnnealingLR, one Python iteration per mini-batch (docs/method.md section 6). The oracle that
``empssl.evaluation.probe.fit_linear_probe`` (the same algorithm with a closed-form gradient, an epoch
replayable as one CUDA graph) is tested against.
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F


def fit_linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    epochs: int = 100,
    lr: float = 0.03,
    momentum: float = 0.9,
    weight_decay: float = 5e-5,
    batch_size: int = 100,
    seed: int = 0,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(weight (C, D), bias (C,), test top-1 after every epoch (epochs,)) of Linear(D, C) trained on
    fixed features: SGD with momentum and weight decay, lr cosine over the epochs, a fresh
    ``randperm`` from a generator seeded with ``seed`` every epoch, the layer initialised by
    ``nn.Linear`` under ``torch.manual_seed(seed)``."""
    device = train_features.device
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        probe = torch.nn.Linear(train_features.shape[1], num_classes).to(device)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    num_train = train_features.shape[0]
    test_top1 = torch.zeros(epochs, device=device)
    for epoch in range(epochs):
        order = torch.randperm(num_train, device=device, generator=generator)
        for start in range(0, num_train, batch_size):
            index = order[start : start + batch_size]
            loss = F.cross_entropy(probe(train_features[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        scheduler.step()
        with torch.no_grad():
            test_top1[epoch] = (probe(test_features).argmax(1) == test_labels).float().mean()
    return probe.weight.detach(), probe.bias.detach(), test_top1
