"""The EMP-SSL loss: Total Coding Rate and patch invariance (SPEC.md sections 1-2).

``coding_rate`` is the one entry point for R; it validates its input, picks a backend
through ``empssl.backends`` and calls that backend's implementation.
"""
from __future__ import annotations

from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import nn

from . import backends
from .reference import tcr as reference_tcr


def _check_z(z, eps) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor (float32, bfloat16, float16 or float64), got {z.dtype}")
    if z.ndim not in (2, 3):
        raise ValueError(f"z must have shape (b, d) or (n, b, d), got shape {tuple(z.shape)}")
    if 0 in z.shape:
        raise ValueError(f"z must not be empty, got shape {tuple(z.shape)}")
    if not (isinstance(eps, (int, float)) and eps > 0):
        raise ValueError(f"eps must be a positive number, got {eps!r}")


# backend name -> implementation(z (n, b, d), eps) -> R (n,)
_IMPLEMENTATIONS: Dict[str, Callable[[torch.Tensor, float], torch.Tensor]] = {
    "reference": reference_tcr.coding_rate,
}

backends.register_op(
    "tcr", {"reference": lambda device, z: None}, example=lambda: (torch.zeros(20, 100, 1024),)
)


def coding_rate(z: torch.Tensor, eps: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """Total Coding Rate R of each group: z (n, b, d) -> (n,) float32; z (b, d) -> scalar.

    R(Z) = 1/2 logdet(I + d/(b*eps) Z^T Z). Differentiable; bf16/fp16 inputs are accumulated in float32.
    """
    _check_z(z, eps)
    single = z.ndim == 2
    groups = z.unsqueeze(0) if single else z
    name = backends.select_backend("tcr", backend, groups.device, groups)
    rate = _IMPLEMENTATIONS[name](groups, float(eps))
    return rate[0] if single else rate


def invariance_loss(z: torch.Tensor) -> torch.Tensor:
    """-(1/n) sum_i (1/b) sum_j cos(z_ij, zbar_j), zbar_j the mean over patches (not detached)."""
    mean_embedding = z.mean(dim=0, keepdim=True)
    return -F.cosine_similarity(z, mean_embedding, dim=-1).mean()


class TotalCodingRate(nn.Module):
    """-mean_i R(Z_i): minimising it maximises the coding rate (prevents collapse)."""

    def __init__(self, eps: float = 0.2, backend: str = "auto"):
        super().__init__()
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ValueError(f"eps must be a positive number, got {eps!r}")
        self.eps, self.backend = float(eps), backend

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return -coding_rate(z, self.eps, self.backend).mean()


class EMPSSLLoss(nn.Module):
    """tcr_coef * L_tcr + inv_coef * L_inv on patch-major embeddings z (n, b, d).

    ``forward(z, return_parts=True)`` also returns the two terms (L_tcr, L_inv), undetached.
    """

    def __init__(self, eps: float = 0.2, inv_coef: float = 200.0, tcr_coef: float = 1.0, backend: str = "auto"):
        super().__init__()
        self.total_coding_rate = TotalCodingRate(eps, backend)
        self.inv_coef, self.tcr_coef = float(inv_coef), float(tcr_coef)

    def forward(self, z: torch.Tensor, return_parts: bool = False):
        if isinstance(z, torch.Tensor) and z.ndim != 3:
            raise ValueError(f"EMPSSLLoss takes patch-major embeddings of shape (n, b, d), got shape {tuple(z.shape)}")
        tcr = self.total_coding_rate(z)
        inv = invariance_loss(z)
        loss = self.tcr_coef * tcr + self.inv_coef * inv
        return (loss, tcr, inv) if return_parts else loss
