"""Fused Total Coding Rate ops for torch.library and their one autograd formula.

Every fast backend has the contract

    forward_backward(z (n, b, d) contiguous, alpha, need_grad) -> (R (n,), dR/dz or an empty tensor)

with R float32 (float64 for float64 input on the cpu backend) and dR/dz in z's dtype. The
forward computes the gradient of R together with R (it costs one more pass over z), so the
backward only scales it: dL/dz = dL/dR[:, None, None] * dR/dz, with no host synchronisation.

- ``empssl::tcr_forward_backward``: the compiled extension (csrc/ops.cpp), CPU and CUDA kernels.
- ``empssl::tcr_forward_backward_composite``: the torch composite of csrc/ops.cpp that the CUDA
  op runs for b > 128 or b > d.
- ``empssl::tcr_forward_backward_triton``: a ``custom_op`` around kernels/tcr.py (``triton_op``
  does not run under torch.compile with the interpreter, see DESIGN.md).

Each gets a fake implementation (torch.compile traces them without running them) and the same
autograd registration; tests/test_opcheck.py runs torch.library.opcheck on each.
"""
from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch

from . import backends

EXTENSION_OP = "empssl::tcr_forward_backward"
# the torch composite the CUDA op falls back to (b > 128 or b > d), an op of its own so that the CPU tests check it
COMPOSITE_OP = "empssl::tcr_forward_backward_composite"
TRITON_OP = "empssl::tcr_forward_backward_triton"


def rate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _fake_forward_backward(z: torch.Tensor, alpha: float, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    rate = z.new_empty((z.shape[0],), dtype=rate_dtype(z.dtype))
    grad = torch.empty_like(z, memory_format=torch.contiguous_format) if need_grad else z.new_empty((0,))
    return rate, grad


# ---- the Triton launcher as a custom op ------------------------------------------------

def _triton_module():
    return backends.triton_kernel_module("tcr", "TCR", ("tcr_forward_backward", "unsupported_reason"))


def triton_reason(z: torch.Tensor) -> Optional[str]:
    module, reason = _triton_module()
    return reason if module is None else module.unsupported_reason(z)


@torch.library.custom_op(TRITON_OP, mutates_args=())
def tcr_forward_backward_triton(z: torch.Tensor, alpha: float, need_grad: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    module, reason = _triton_module()
    if module is None:
        raise backends.BackendUnavailableError(reason)
    return module.tcr_forward_backward(z, alpha, need_grad)


tcr_forward_backward_triton.register_fake(_fake_forward_backward)


# ---- the extension op: fake registered once the extension is loaded -------------------

@functools.lru_cache(maxsize=None)
def _extension_op_registered() -> Optional[str]:
    reason = backends.extension_op_reason("tcr_forward_backward")
    if reason:
        return reason
    for op in (EXTENSION_OP, COMPOSITE_OP):
        torch.library.register_fake(op)(_fake_forward_backward)
        _register_autograd(op)
    return None


def extension_reason() -> Optional[str]:
    return _extension_op_registered()


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


def _register_autograd(op) -> None:
    torch.library.register_autograd(op, _backward, setup_context=_setup_context)


_register_autograd(TRITON_OP)


# ---- entry point used by empssl.loss -------------------------------------------------------

def coding_rate_fused(z: torch.Tensor, alpha: float, backend: str) -> torch.Tensor:
    """R of every group of z (n, b, d) through a fused backend ("cpu", "cuda" or "triton") that
    empssl.backends found available (its check loads the extension and registers the op)."""
    need_grad = torch.is_grad_enabled() and z.requires_grad
    z = z.contiguous()
    if backend == "triton":
        rate, _ = tcr_forward_backward_triton(z, float(alpha), need_grad)
    else:
        rate, _ = torch.ops.empssl.tcr_forward_backward(z, float(alpha), need_grad)
    return rate
