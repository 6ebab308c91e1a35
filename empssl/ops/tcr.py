"""The Total Coding Rate op: R of every group of z (n, b, d), with its gradient, and its backends.

R(Z) = 1/2 logdet(I + alpha Z^T Z), alpha = d / (b eps) (docs/method.md section 2). The fused backends
compute R and, when z needs a gradient, dR/dz = alpha Z (I + alpha Z^T Z)^{-1} in the same call
(``(z, alpha, need_grad) -> (R, dR/dz)``); one autograd formula scales that saved gradient.

Ops (each with a fake, so a compiled step traces through the loss):

- ``empssl::tcr_forward_backward``: the compiled extension (schema in csrc/ops.cpp), CPU kernel
  csrc/cpu/tcr.cpp and CUDA kernel csrc/cuda/tcr.cu. Backends "cpu" and "cuda".
- ``empssl::tcr_forward_backward_composite``: torch ops in the extension on the smaller side of
  Sylvester's identity (Gram, Cholesky, cholesky_solve), any shape. Backend "composite".
- ``empssl::tcr_forward_backward_triton``: a ``custom_op`` around kernels/tcr.py (``triton_op``
  does not run under torch.compile with the interpreter, see docs/design.md section 3). Backend "triton".

The reference (empssl/reference/tcr.py, autograd through cholesky_ex) is backend "reference".
``coding_rate`` dispatches: the backend is resolved once per (request, device, dtype, b, d).
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from .. import backends
from ..reference import tcr as reference_tcr

EXTENSION_OP = "empssl::tcr_forward_backward"
COMPOSITE_OP = "empssl::tcr_forward_backward_composite"
TRITON_OP = "empssl::tcr_forward_backward_triton"

# Largest matrix side min(b, d) the cpu kernel takes: its O(side^3) sweep is slower than
# LAPACK's Cholesky in the reference beyond this, so auto falls back there.
CPU_MAX_SIDE = 1024
LOW_PRECISION = (torch.float32, torch.bfloat16, torch.float16)


def coding_rate_alpha(b: int, d: int, eps: float) -> float:
    """alpha = d / (b * eps) of R(Z) = 1/2 logdet(I + alpha Z^T Z)."""
    return d / (b * eps)


def rate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward_backward(z: torch.Tensor, alpha: float, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    rate = z.new_empty((z.shape[0],), dtype=rate_dtype(z.dtype))
    grad = torch.empty_like(z, memory_format=torch.contiguous_format) if need_grad else z.new_empty((0,))
    return rate, grad


# ---- the one autograd formula ------------------------------------------------------------


def _setup_context(ctx, inputs, output) -> None:
    z, _alpha, need_grad = inputs
    _rate, grad = output
    ctx.need_grad = need_grad
    ctx.save_for_backward(grad if need_grad else None)
    ctx.z_dtype = z.dtype


def _backward(ctx, grad_rate, _grad_of_grad):
    if not ctx.need_grad:
        raise RuntimeError("tcr_forward_backward ran with need_grad=False; its gradient was not computed")
    (grad,) = ctx.saved_tensors
    if grad_rate is None:
        return None, None, None
    return (grad_rate[:, None, None] * grad).to(ctx.z_dtype), None, None


def _register_python_side(op) -> None:
    torch.library.register_fake(op)(_fake_forward_backward)
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


# ---- the Triton launcher as a custom op ------------------------------------------------


def _triton_module():
    return backends.triton_kernel_module("tcr", "TCR", ("tcr_forward_backward", "unsupported_reason"))


@torch.library.custom_op(TRITON_OP, mutates_args=())
def tcr_forward_backward_triton(z: torch.Tensor, alpha: float, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    module, reason = _triton_module()
    if module is None:
        raise backends.BackendUnavailableError(reason)
    return module.tcr_forward_backward(z, alpha, need_grad)


_register_python_side(TRITON_OP)

# the extension defines its ops when it loads (here, if it is built); their Python side is registered with it
_EXTENSION_REASON = backends.extension_op_reason("tcr_forward_backward")
if _EXTENSION_REASON is None:
    for _op in (EXTENSION_OP, COMPOSITE_OP):
        _register_python_side(_op)


# ---- the backends: what each takes and why it refuses ------------------------------------


def _cpu_reason(device: torch.device, z: torch.Tensor) -> Optional[str]:
    reason = backends.cpu_extension_reason(device) or _EXTENSION_REASON
    if reason:
        return reason
    if min(z.shape[-2:]) > CPU_MAX_SIDE:
        return f"min(b, d) = {min(z.shape[-2:])} exceeds the cpu kernel's limit {CPU_MAX_SIDE}"
    return None


def _cuda_reason(device: torch.device, z: torch.Tensor) -> Optional[str]:
    reason = backends.cuda_extension_reason(device) or _EXTENSION_REASON
    if reason:
        return reason
    if z.dtype not in LOW_PRECISION:
        return f"the cuda kernel takes float32, bfloat16 or float16, got {z.dtype}"
    b, d = z.shape[-2:]
    max_rows = backends.extension().tcr_cuda_max_rows()  # the kernel's own limit (kMaxRows, csrc/cuda/tcr.cu)
    if b > d or b > max_rows:
        return (
            f"the cuda kernel holds the b x b side of one group in a block's shared memory: b <= d and "
            f"b <= {max_rows}, got b = {b}, d = {d} (the composite backend takes these)"
        )
    return None


def _composite_reason(device: torch.device, z: torch.Tensor) -> Optional[str]:
    if device.type not in ("cpu", "cuda"):
        return f"the composite backend runs on CPU or CUDA tensors, not {device.type}"
    # the composite has a CUDA kernel only where the extension has its CUDA part
    reason = (backends.cuda_extension_reason(device) if device.type == "cuda" else None) or _EXTENSION_REASON
    if reason:
        return reason
    if z.dtype not in LOW_PRECISION:
        return f"the composite takes float32, bfloat16 or float16 (float64 goes to the reference), got {z.dtype}"
    return None


def _triton_reason(device: torch.device, z: torch.Tensor) -> Optional[str]:
    reason = backends.triton_reason(device)
    if reason:
        return reason
    module, reason = _triton_module()
    return reason if module is None else module.unsupported_reason(z)


def _fused_rate(op_name: str, z: torch.Tensor, eps: float) -> torch.Tensor:
    """R through the fused op ``torch.ops.empssl.<op_name>``: the gradient only when autograd needs it."""
    need_grad = torch.is_grad_enabled() and z.requires_grad
    op = getattr(torch.ops.empssl, op_name)  # looked up per call: the extension's ops exist once it is loaded
    rate, _ = op(z.contiguous(), float(coding_rate_alpha(z.shape[1], z.shape[2], eps)), need_grad)
    return rate


BACKENDS = {
    "cuda": backends.Backend(
        "CUDA; float32, bfloat16, float16; b <= d and b <= 128 (the b x b side in one block)",
        _cuda_reason,
        functools.partial(_fused_rate, "tcr_forward_backward"),
    ),
    "composite": backends.Backend(
        "CPU, CUDA; float32, bfloat16, float16; any b, d (Gram, Cholesky, cholesky_solve on the smaller side)",
        _composite_reason,
        functools.partial(_fused_rate, "tcr_forward_backward_composite"),
    ),
    "triton": backends.Backend(
        "CUDA (CPU under TRITON_INTERPRET=1); float32, bfloat16, float16; b <= 128 (the b x b side in registers)",
        _triton_reason,
        functools.partial(_fused_rate, "tcr_forward_backward_triton"),
    ),
    "cpu": backends.Backend(
        f"CPU; float32, float64, bfloat16, float16; min(b, d) <= {CPU_MAX_SIDE}",
        _cpu_reason,
        functools.partial(_fused_rate, "tcr_forward_backward"),
    ),
    "reference": backends.Backend(
        "any device and floating dtype, any size (torch: Cholesky on the smaller side, autograd)",
        lambda device, z: None,
        reference_tcr.coding_rate,
    ),
}
BACKEND_CHOICES = backends.choices(BACKENDS)  # what backend= and --loss-backend accept


def _stand_ins(device: torch.device, dtype: torch.dtype, b: int, d: int) -> tuple:
    return (torch.empty((1, b, d), dtype=dtype, device=device),)


backends.register_op("tcr", BACKENDS, _stand_ins, example=lambda: (torch.zeros(20, 100, 1024),))


def coding_rate(z: torch.Tensor, eps: float, backend: str = "auto") -> torch.Tensor:
    """R (n,) of every group of z (n, b, d), validated by the caller (empssl.loss.coding_rate), through
    ``backend`` or the first that fits; float32 (float64 for float64 z), differentiable."""
    b, d = backends.static_sizes(z.shape[1:])
    name = backends.resolve("tcr", backend, z.device, z.dtype, b, d)
    return backends.get_backend("tcr", name).run(z, eps)
