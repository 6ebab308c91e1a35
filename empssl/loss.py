"""The EMP-SSL loss: Total Coding Rate and patch invariance (docs/method.md sections 1-2).

``coding_rate`` is the one entry point for R; it validates its input and calls the TCR op,
whose backends (reference, cpu, cuda, composite, triton) and dispatch are in ``empssl.ops.tcr``.
"""

from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import nn

from .checks import FLOAT32_MAX, check_finite_number
from .ops import tcr as tcr_op


def _check_z(z, eps) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a torch.Tensor, got {type(z).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor (float32, bfloat16, float16 or float64), got {z.dtype}")
    if z.ndim not in (2, 3):
        raise ValueError(f"z must have shape (b, d) or (n, b, d), got shape {tuple(z.shape)}")
    if 0 in z.shape:
        raise ValueError(f"z must not be empty, got shape {tuple(z.shape)}")
    _check_eps(eps)
    batch, dim = z.shape[-2], z.shape[-1]
    if dim / (batch * eps) > FLOAT32_MAX:  # alpha = d / (b eps) scales the Gram matrix in float32
        raise ValueError(
            f"eps {eps!r} is too small for z of {batch} rows of {dim}: alpha = d / (b eps) overflows float32"
        )


def _check_eps(eps) -> None:
    try:
        check_finite_number(eps, "eps", positive=True)
    except TypeError:
        raise ValueError(f"eps must be a positive number, got {eps!r}") from None


def coding_rate(z: torch.Tensor, eps: float = 0.2, backend: str = "auto") -> torch.Tensor:
    """Total Coding Rate R of each group: z (n, b, d) -> (n,) float32; z (b, d) -> scalar.

    R(Z) = 1/2 logdet(I + d/(b*eps) Z^T Z). Differentiable; bf16/fp16 inputs are accumulated in float32.
    R grows with the scale of Z's rows: EMP-SSL feeds it L2-normalised rows (docs/method.md section 2).
    """
    _check_z(z, eps)
    single = z.ndim == 2
    groups = z.unsqueeze(0) if single else z
    rate = tcr_op.coding_rate(groups, float(eps), backend)
    return rate[0] if single else rate


_COSINE_EPS = 1e-8  # F.cosine_similarity's: each norm is clamped to at least this


class _InvarianceLoss(torch.autograd.Function):
    """The invariance term in closed form, with its analytic gradient.

    With r_ij = max(||z_ij||, eps), zbar_j = mean_i z_ij, q_j = max(||zbar_j||, eps),
    m_j = zbar_j / q_j and c_ij = <z_ij, m_j> / r_ij (= cos(z_ij, zbar_j)):

        L = -(1/(n b)) sum_ij c_ij
        dL/dz_ij = -(1/(n b)) [ m_j / r_ij - [||z_ij|| > eps] c_ij z_ij / r_ij^2 + t_j ],
        t_j = (s_j - [||zbar_j|| > eps] C_j m_j) / (n q_j),  s_j = sum_i z_ij / r_ij,  C_j = sum_i c_ij.

    t_j is the gradient through the mean (zbar is not detached); it vanishes for unit rows.
    Three passes over z forward (norms, mean, dots) and three backward, instead of the
    autograd graph of F.cosine_similarity (normalised copies of z and of zbar broadcast to
    z's shape). Low-precision inputs are computed in float32.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor) -> torch.Tensor:
        x = z if z.dtype == torch.float64 else z.float()
        n, b = x.shape[0], x.shape[1]
        # vecdot: one fused pass per row (vector_norm over the last dim is ~10x slower on the CPU)
        row_norm = torch.linalg.vecdot(x, x).sqrt()
        mean = x.mean(dim=0)
        mean_norm = torch.linalg.vecdot(mean, mean).sqrt()
        row_norm_c, mean_norm_c = row_norm.clamp_min(_COSINE_EPS), mean_norm.clamp_min(_COSINE_EPS)
        mean_dir = mean / mean_norm_c[:, None]
        cos = torch.linalg.vecdot(x, mean_dir) / row_norm_c
        ctx.save_for_backward(z, row_norm, mean_norm, mean_dir, cos)
        return cos.sum() * (-1.0 / (n * b))

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor) -> torch.Tensor:
        z, row_norm, mean_norm, mean_dir, cos = ctx.saved_tensors
        x = z if z.dtype == torch.float64 else z.float()
        n, b = x.shape[0], x.shape[1]
        scale = grad_loss * (-1.0 / (n * b))
        row_norm_c, mean_norm_c = row_norm.clamp_min(_COSINE_EPS), mean_norm.clamp_min(_COSINE_EPS)
        inv_row = 1.0 / row_norm_c
        # a norm clamped to eps is a constant: no derivative through it
        radial = torch.where(row_norm > _COSINE_EPS, cos * inv_row * inv_row, 0.0)
        along_mean = torch.where(mean_norm > _COSINE_EPS, cos.sum(dim=0), 0.0)
        unit_sum = torch.einsum("nb,nbd->bd", inv_row, x)
        through_mean = (unit_sum - along_mean[:, None] * mean_dir) / (n * mean_norm_c[:, None])
        grad = torch.addcmul(through_mean * scale, mean_dir * scale, inv_row[..., None])
        grad.addcmul_(x, (radial * scale)[..., None], value=-1)
        return grad.to(z.dtype)


def invariance_loss(z: torch.Tensor) -> torch.Tensor:
    """-(1/n) sum_i (1/b) sum_j cos(z_ij, zbar_j), zbar_j the mean over patches (not detached).

    The value and gradient of ``-F.cosine_similarity(z, z.mean(0, keepdim=True), dim=-1).mean()``
    (same eps clamping of each norm), in closed form: see ``_InvarianceLoss``. A float32 scalar
    for float32 / bfloat16 / float16 input, float64 for float64. First derivatives only.
    """
    if not isinstance(z, torch.Tensor) or not z.is_floating_point() or z.ndim != 3 or 0 in z.shape:
        shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
        raise ValueError(f"invariance_loss takes a non-empty floating-point z of shape (n, b, d), got {shape}")
    return _InvarianceLoss.apply(z)


class TotalCodingRate(nn.Module):
    """-mean_i R(Z_i): minimising it maximises the coding rate (prevents collapse)."""

    def __init__(self, eps: float = 0.2, backend: str = "auto"):
        super().__init__()
        _check_eps(eps)
        self.eps, self.backend = float(eps), backend

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return -coding_rate(z, self.eps, self.backend).mean()


def _patch_major(z):
    """z (n, b, d) as given, or lightly's list/tuple of n views (b, d) stacked into it (checked first)."""
    if isinstance(z, (list, tuple)):
        if not z:
            raise ValueError("EMPSSLLoss got an empty list of views; pass n >= 1 tensors of shape (b, d)")
        for index, view in enumerate(z):
            if not isinstance(view, torch.Tensor):
                raise TypeError(f"view {index} must be a torch.Tensor, got {type(view).__name__}")
            if view.ndim != 2:
                raise ValueError(f"each view must have shape (b, d), got shape {tuple(view.shape)} for view {index}")
        first = z[0]
        for index, view in enumerate(z[1:], start=1):
            for what, expected, got in (
                ("shape", tuple(first.shape), tuple(view.shape)),
                ("device", first.device, view.device),
                ("dtype", first.dtype, view.dtype),
            ):
                if expected != got:
                    raise ValueError(
                        f"all views must have the same {what}: view 0 has {expected}, view {index} has {got}"
                    )
        return torch.stack(tuple(z))
    if isinstance(z, torch.Tensor) and z.ndim != 3:
        raise ValueError(
            f"EMPSSLLoss takes patch-major embeddings of shape (n, b, d) or a list of n views of shape "
            f"(b, d), got shape {tuple(z.shape)}"
        )
    return z


class EMPSSLLoss(nn.Module):
    """tcr_coef * L_tcr + inv_coef * L_inv on patch-major embeddings z (n, b, d).

    z must be what EMP-SSL's projector gives: each row L2-normalised (z = normalize(projection(...)),
    docs/method.md section 3). The coding rate depends on the rows' scale (alpha = d / (b eps) assumes
    unit rows), so unnormalised rows give another loss, not a rescaled one; ``normalize=True`` normalises
    each row first (F.normalize, in the autograd graph) for raw projector outputs. The layout is
    patch-major: z[i, j] is patch i of image j, so z[i] is the group Z_i of the coding rate.

    z may also be a list or tuple of n views of shape (b, d), lightly's calling convention:
    the loss is the same as on ``torch.stack(views)`` (view i is patch group i).

    ``forward(z, return_parts=True)`` also returns the two terms (L_tcr, L_inv), undetached.
    With ``gather=True`` under torch.distributed, z (n, b_local, d) of every rank is gathered
    along b and the loss is computed on the global batch (empssl.distributed.gather_batch; its
    backward sums over ranks, so DDP's gradient averaging gives the global batch's gradient).
    Without an initialised process group, gather is a no-op.
    """

    def __init__(
        self,
        eps: float = 0.2,
        inv_coef: float = 200.0,
        tcr_coef: float = 1.0,
        backend: str = "auto",
        gather: bool = False,
        normalize: bool = False,
    ):
        super().__init__()
        self.total_coding_rate = TotalCodingRate(eps, backend)
        check_finite_number(inv_coef, "inv_coef")  # what the command line's --inv-coef and --tcr-coef take
        check_finite_number(tcr_coef, "tcr_coef")
        if inv_coef == 0 and tcr_coef == 0:
            raise ValueError("inv_coef and tcr_coef are both 0: the loss would be 0 whatever z is")
        self.inv_coef, self.tcr_coef = float(inv_coef), float(tcr_coef)
        self.gather, self.normalize = bool(gather), bool(normalize)

    def forward(self, z: Union[torch.Tensor, Sequence[torch.Tensor]], return_parts: bool = False):
        z = _patch_major(z)
        if self.normalize:  # before the gather: every rank sends unit rows, as the encoder's would be
            z = nn.functional.normalize(z, dim=-1)
        if self.gather:
            from .distributed import gather_batch

            z = gather_batch(z)
        tcr = self.total_coding_rate(z)
        inv = invariance_loss(z)
        loss = self.tcr_coef * tcr + self.inv_coef * inv
        return (loss, tcr, inv) if return_parts else loss
