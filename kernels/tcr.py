"""Fused Total Coding Rate forward + backward in one Triton launch (docs/method.md section 2).

For each group Z (b, d) of z (n, b, d), one program computes, on the b x b side,

    M = I_b + alpha Z Z^T,   R = 1/2 logdet M,   dR/dZ = alpha M^{-1} Z.

Steps inside the program:
  1. Gram: M accumulated with tl.dot over chunks of d (float32 input: IEEE products, not TF32,
     whose Gram error reaches 1e-2 relative; bf16/fp16: native dot, float32 accumulator).
     Each chunk's dot starts from a zero accumulator and its partial Gram is then added to the
     running total: one fma chain over all of d (the dot's own accumulator carried across
     chunks) lets the rounding error grow with d (R off by 4.8e-5 on nearly collapsed Z at
     d = 1024 in tests/test_tcr_float32_model.py); with chunk partials the Gram adds little
     to what a float32 M and sweep cost anyway there (1-2e-5).
     b is padded up to a power of two BLOCK_B; the padded rows of Z load as 0, so the padded
     block of M is the identity and does not change logdet or M^{-1}.
  2. Symmetric Gauss-Jordan sweep on the register-resident tile, no pivoting (M is SPD with
     eigenvalues in [1, 1 + alpha b max|z|^2]: stable in float32). Sweeping pivot k maps
         A_ij -> A_ij - A_ik A_kj / p,  A_ik -> A_ik / p,  A_kj -> A_kj / p,  A_kk -> -1 / p
     and after all b pivots the tile holds -M^{-1}; logdet M = sum of log pivots. 1 / p is
     refined by one Newton step: compiled Triton division is approximate (div.full.f32, 2 ulp),
     the interpreter's is exact, and the refined reciprocal is within an ulp on both.
  3. If the gradient is wanted: dZ = alpha M^{-1} Z in a second pass over the d chunks
     (tl.dot of the tile with each Z chunk). For 16-bit inputs the float32 inverse is split
     into hi + lo parts in the input dtype, two native dots recover ~16 mantissa bits.

Offsets within a group are int32 (the group offset is int64): int64 tile offsets cost the
BLOCK_B = 128 float32 kernel a stack frame (registers are at the 128 cap of 16 warps). A view
whose group spans 2^31 elements or more (a transposed view of a huge buffer) is refused by
``unsupported_reason``; the contiguous z that dispatch passes spans b * d elements. The launch
runs under z's device (kernels/launch.py).

Padding beyond b = 128 does not fit the register tile: b > 128 goes to the torch path
(``unsupported_reason`` says so). b > d is fine here (Sylvester's identity holds for any b, d).

``launch_config`` is the one place that picks the tile sizes; ``AOT_CONFIGS`` lists, from it,
every kernel configuration that dispatch can launch, for the ahead-of-time compile test.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from .launch import on_device

MAX_B = 128  # largest padded group size whose b x b float32 tile stays in registers
_INT32_MAX = 2**31 - 1
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SIGNATURE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def _tile_offsets(rows, cols, stride_row, stride_col):
    """int32 element offsets of a (rows, cols) tile within one group (see the module docstring)."""
    return rows[:, None] * stride_row + cols[None, :] * stride_col


@triton.jit
def _load_chunk(z_group, rows, row_ok, cols, d, stride_zb, stride_zd, UPCAST_DOT: tl.constexpr):
    """The (rows, cols) tile of one group's z, zero outside (b, d); float32 under ``UPCAST_DOT``."""
    mask = row_ok[:, None] & (cols[None, :] < d)
    zc = tl.load(z_group + _tile_offsets(rows, cols, stride_zb, stride_zd), mask=mask, other=0.0)
    if UPCAST_DOT:
        zc = zc.to(tl.float32)
    return zc


@triton.jit
def _reciprocal(x):
    """1 / x to within an ulp: the compiled division (div.full.f32) errs by up to 2 ulp; one
    Newton step r + r (1 - x r), with the residual from an fma, squares that error away."""
    r = 1.0 / x
    return tl.fma(r, tl.fma(-x, r, 1.0), r)


@triton.jit(do_not_specialize=["need_grad"])  # one compiled variant serves both values
def _tcr_fwd_bwd_kernel(
    z_ptr,
    rate_ptr,
    grad_ptr,
    b,
    d,
    stride_zn,
    stride_zb,
    stride_zd,
    stride_gn,
    stride_gb,
    stride_gd,
    alpha,
    need_grad,
    BLOCK_B: tl.constexpr,
    BLOCK_D: tl.constexpr,
    UPCAST_DOT: tl.constexpr,  # interpreter only: its bf16 tl.dot multiplies the raw uint16 bits
):
    group = tl.program_id(0).to(tl.int64)
    rows = tl.arange(0, BLOCK_B)
    chunk = tl.arange(0, BLOCK_D)
    row_ok = rows < b
    z_group = z_ptr + group * stride_zn

    # 1. Gram of the group, IEEE float32 products for float32 input; each chunk's partial Gram
    #    from a zero accumulator, then added (short fma chains, see the module docstring)
    gram = tl.zeros((BLOCK_B, BLOCK_B), dtype=tl.float32)
    for d0 in range(0, d, BLOCK_D):
        zc = _load_chunk(z_group, rows, row_ok, d0 + chunk, d, stride_zb, stride_zd, UPCAST_DOT)
        # an fma by 1, not `gram += dot`: Triton's combiner rewrites add(dot(a, b, 0), c) into
        # dot(a, b, c), which is the one long chain again (seen in the TTIR of triton 3.8)
        gram = tl.fma(tl.dot(zc, tl.trans(zc), input_precision="ieee"), 1.0, gram)

    diagonal = rows[:, None] == rows[None, :]
    tile = alpha * gram + diagonal.to(tl.float32)

    # 2. symmetric Gauss-Jordan sweep over the b real pivots (the padded block stays I)
    logdet = tl.zeros((), dtype=tl.float32)
    for k in range(0, b):
        in_row_k = rows[:, None] == k
        in_col_k = rows[None, :] == k
        col = tl.sum(tl.where(in_col_k, tile, 0.0), axis=1)  # A[:, k], indexed by row
        row = tl.sum(tl.where(in_row_k, tile, 0.0), axis=0)  # A[k, :], indexed by column
        pivot = tl.sum(tl.where(rows == k, col, 0.0), axis=0)
        inv_pivot = _reciprocal(pivot)
        logdet += tl.log(pivot)
        # zeroing row and column k, then subtracting u v^T with u_k = v_k = -1, gives all four
        # cases of the sweep in one rank-1 update
        u = tl.where(rows == k, -1.0, col) * inv_pivot
        v = tl.where(rows == k, -1.0, row)
        tile = tl.where(in_row_k | in_col_k, 0.0, tile) - u[:, None] * v[None, :]
    tl.store(rate_ptr + group, 0.5 * logdet)

    # 3. dR/dZ = alpha M^{-1} Z = -alpha * tile @ Z
    if need_grad:
        neg_alpha = -alpha
        if z_ptr.dtype.element_ty == tl.float32:
            inverse_hi = tile
            inverse_lo = tile  # unused
        else:
            inverse_hi = tile.to(z_ptr.dtype.element_ty)
            inverse_lo = (tile - inverse_hi.to(tl.float32)).to(z_ptr.dtype.element_ty)
            if UPCAST_DOT:
                inverse_hi = inverse_hi.to(tl.float32)
                inverse_lo = inverse_lo.to(tl.float32)
        g_group = grad_ptr + group * stride_gn
        for d0 in range(0, d, BLOCK_D):
            cols = d0 + chunk
            mask = row_ok[:, None] & (cols[None, :] < d)
            zc = _load_chunk(z_group, rows, row_ok, cols, d, stride_zb, stride_zd, UPCAST_DOT)
            acc = tl.dot(inverse_hi, zc, input_precision="ieee")
            if z_ptr.dtype.element_ty != tl.float32:
                acc = tl.dot(inverse_lo, zc, acc, input_precision="ieee")
            grad = (neg_alpha * acc).to(grad_ptr.dtype.element_ty)
            tl.store(g_group + _tile_offsets(rows, cols, stride_gb, stride_gd), grad, mask=mask)


# BLOCK_B -> (BLOCK_D, num_warps). Measured with ptxas of triton 3.8 (sm_80 and sm_90, every dtype,
# no software pipelining): these give no stack / local memory; larger chunks or fewer warps spill
# (e.g. 128 with 8 warps: ~250 registers for fp32; 64 with 4 warps and a 64-wide chunk: 255 + spills).
_CHUNK_AND_WARPS = {16: (32, 2), 32: (32, 4), 64: (32, 8), 128: (16, 16)}
# Pipelining the d loop (cp.async, num_stages > 1) keeps extra chunks live and spills at BLOCK_B >= 64.
NUM_STAGES = 1


def launch_config(b: int, d: int, dtype: torch.dtype) -> Tuple[int, int, int]:
    """(BLOCK_B, BLOCK_D, num_warps) for groups of b rows of d features.

    BLOCK_B is b padded to a power of two, at least 16 (tl.dot's smallest tile). The d chunk
    and warp count depend only on BLOCK_B, chosen so that the tile and the chunk stay in
    registers with no local memory on sm_80 and sm_90 (tests/test_triton_aot.py checks it);
    d only sets the number of chunks. dtype is part of the key for future tuning.
    """
    if not 1 <= b <= MAX_B:
        raise ValueError(f"b must be in [1, {MAX_B}] for the Triton TCR kernel, got {b}")
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    block_b = max(16, triton.next_power_of_2(b))
    block_d, num_warps = _CHUNK_AND_WARPS[block_b]
    return block_b, block_d, num_warps


def _interpreted() -> bool:
    return not isinstance(_tcr_fwd_bwd_kernel, triton.runtime.JITFunction)


def unsupported_reason(z) -> Optional[str]:
    """None when ``tcr_forward_backward`` can run ``z``, else a sentence saying why not.
    Whether Triton can run on the device at all (a GPU, the interpreter) is the dispatcher's check (empssl.backends)."""
    if not isinstance(z, torch.Tensor):
        return f"z must be a torch.Tensor, got {type(z).__name__}"
    if z.ndim != 3:
        return f"the Triton TCR kernel takes z of shape (n, b, d), got {z.ndim} dimensions {tuple(z.shape)}"
    if z.dtype not in SUPPORTED_DTYPES:
        return f"the Triton TCR kernel supports float32, bfloat16 and float16, got {z.dtype}"
    if 0 in z.shape:
        return f"the Triton TCR kernel needs a non-empty z, got shape {tuple(z.shape)}"
    if z.shape[1] > MAX_B:
        return f"the Triton TCR kernel holds b x b in registers for b <= {MAX_B}, got b = {z.shape[1]}"
    _, b, d = z.shape
    group_span = (b - 1) * abs(z.stride(1)) + (d - 1) * abs(z.stride(2))
    if max(group_span, b * d - 1) > _INT32_MAX:  # z's group and the gradient's (contiguous)
        return (
            f"the Triton TCR kernel indexes within a group in int32, and this z's group spans "
            f"{max(group_span, b * d - 1) + 1} elements (>= 2^31; strides {z.stride()}): pass z.contiguous() "
            f"with b * d < 2^31"
        )
    if z.device.type == "cpu" and not _interpreted():
        return "TRITON_INTERPRET=1 was set after triton was imported, so the kernel cannot run on CPU tensors"
    return None


def tcr_forward_backward(z: torch.Tensor, alpha: float, need_grad: bool):
    """(R (n,) float32, dR/dz (n, b, d) in z's dtype, or ``z.new_empty(0)`` without need_grad).

    ``alpha`` = d / (b * eps). z may have any strides (they are passed to the kernel, no copy).
    """
    reason = unsupported_reason(z)
    if reason:
        raise (TypeError if not isinstance(z, torch.Tensor) or z.dtype not in SUPPORTED_DTYPES else ValueError)(reason)
    if not (isinstance(alpha, (int, float)) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    n, b, d = z.shape
    block_b, block_d, num_warps = launch_config(b, d, z.dtype)
    rate = torch.empty(n, dtype=torch.float32, device=z.device)
    grad = torch.empty((n, b, d), dtype=z.dtype, device=z.device) if need_grad else z.new_empty(0)
    grad_strides = grad.stride() if need_grad else (0, 0, 0)
    with on_device(z.device):
        _tcr_fwd_bwd_kernel[(n,)](
            z,
            rate,
            grad,
            b,
            d,
            *z.stride(),
            *grad_strides,
            float(alpha),
            int(bool(need_grad)),
            BLOCK_B=block_b,
            BLOCK_D=block_d,
            UPCAST_DOT=_interpreted() and z.dtype == torch.bfloat16,
            num_warps=num_warps,
            num_stages=NUM_STAGES,
        )
    return rate, grad


def _aot_configs():
    """Every (kernel, signature, constexprs, compile options) that dispatch launches on a GPU.

    The signature mirrors the launch of a contiguous z: Triton specialises integer arguments
    equal to 1 into constants, so the unit feature strides are constexprs here as at run time.
    """
    configs = []
    for b in (16, 32, 64, 128):
        for dtype in SUPPORTED_DTYPES:
            block_b, block_d, num_warps = launch_config(b, 1024, dtype)
            pointer = "*" + _SIGNATURE_DTYPES[dtype]
            signature = {
                "z_ptr": pointer,
                "rate_ptr": "*fp32",
                "grad_ptr": pointer,
                "b": "i32",
                "d": "i32",
                "stride_zn": "i32",
                "stride_zb": "i32",
                "stride_zd": "constexpr",
                "stride_gn": "i32",
                "stride_gb": "i32",
                "stride_gd": "constexpr",
                "alpha": "fp32",
                "need_grad": "i32",
                "BLOCK_B": "constexpr",
                "BLOCK_D": "constexpr",
                "UPCAST_DOT": "constexpr",
            }
            constexprs = {"stride_zd": 1, "stride_gd": 1, "BLOCK_B": block_b, "BLOCK_D": block_d, "UPCAST_DOT": False}
            options = {"num_warps": num_warps, "num_stages": NUM_STAGES}
            configs.append((_tcr_fwd_bwd_kernel, signature, constexprs, options))
    return configs


AOT_CONFIGS = _aot_configs()
