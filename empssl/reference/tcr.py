"""Total Coding Rate in plain PyTorch (docs/method.md section 2).

    R(Z) = 1/2 logdet(I_d + alpha Z^T Z),  alpha = d / (b * eps)

computed on the smaller side of Sylvester's identity with one batched Cholesky
(``cholesky_ex``: no host synchronisation). Autograd differentiates it.
"""

import torch


def coding_rate(z: torch.Tensor, eps: float) -> torch.Tensor:
    """R of every group of ``z`` (n, b, d) -> (n,) float32 (float64 for float64 input)."""
    n, b, d = z.shape
    compute_dtype = torch.float64 if z.dtype == torch.float64 else torch.float32
    z = z.to(compute_dtype)
    alpha = d / (b * eps)
    side = min(b, d)
    eye = torch.eye(side, dtype=compute_dtype, device=z.device).expand(n, side, side)
    if b <= d:
        gram = torch.baddbmm(eye, z, z.transpose(1, 2), alpha=alpha)  # I_b + alpha Z Z^T
    else:
        gram = torch.baddbmm(eye, z.transpose(1, 2), z, alpha=alpha)  # I_d + alpha Z^T Z
    factor, _ = torch.linalg.cholesky_ex(gram)
    # 1/2 logdet(M) = 1/2 * 2 * sum(log diag L)
    return torch.log(torch.diagonal(factor, dim1=-2, dim2=-1)).sum(-1)


def coding_rate_published(z: torch.Tensor, eps: float) -> torch.Tensor:
    """The authors' formula: a Python loop of d x d ``torch.logdet`` (the oracle for tests and benchmarks)."""
    n, b, d = z.shape
    alpha = d / (b * eps)
    eye = torch.eye(d, dtype=z.dtype, device=z.device)
    return torch.stack([torch.logdet(eye + alpha * z[i].T @ z[i]) / 2 for i in range(n)])
