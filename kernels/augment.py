"""Fused multi-patch augmentation in one Triton launch (docs/method.md section 4).

One program makes one patch, from its uint8 source image to the normalised output, with the
whole S x S patch held in registers as three float32 (BLOCK_S, BLOCK_S) tiles (R, G, B):

  1. Resized crop as matrix products: out_c = Wy @ crop_c @ Wx^T, where Wy (S x crop_h) and
     Wx (S x crop_w) are the antialiased bilinear weights of
     ``interpolate(mode="bilinear", align_corners=False, antialias=True)``: with
     ``scale = crop_len / S``, ``support = max(scale, 1)``, output pixel i centred at
     ``scale * (i + 0.5)``, crop pixel j weighted ``max(0, 1 - |(j + 0.5 - center) / support|)``,
     normalised over the crop (ATen's UpSampleKernel.cpp ``_compute_weights_aa``; its window
     [xmin, xmax) holds every pixel of non-zero weight). The weights are built in registers for
     CHUNK x CHUNK tiles of the crop, so the loop visits only crop pixels and the source size is
     not limited. The horizontal flip is folded into Wx (output column x uses S-1-x).
  2. Colour jitter: the four ops in the order stored in the patch's parameter row (data read
     at run time, branches on it, no recompilation); contrast uses the patch's mean gray.
  3. Grayscale; Gaussian blur (only patches whose sigma > 0): the patch goes through a float32
     scratch slot and each output sums its 13 reflect-padded taps in the reference's order,
     horizontal then vertical, one channel at a time; solarize, normalise, cast, store through
     the output strides (contiguous or channels_last).

The resize dots run in IEEE float32 (no TF32). Measured under the interpreter: float32 max
abs error ~1e-6 against the reference; the 16-bit outputs are the float32 output rounded to
nearest even.

Limit: the patch must fit one program's registers: output_size <= MAX_OUTPUT_SIZE (64). A
224-pixel patch would need a tiled two-pass scheme (contrast mean, blur halo); it is left to
the CUDA backend (``unsupported_reason`` says so).

``launch_config`` is the one place that picks the tile sizes; ``AOT_CONFIGS`` lists, from it,
every kernel configuration that dispatch can launch, for the ahead-of-time compile test.
"""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..augment import params as AP
from .launch import on_device

MAX_OUTPUT_SIZE = 64  # largest patch whose three float32 S x S tiles stay in one program's registers
SUPPORTED_OUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_SIGNATURE_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
_INT32_MAX = 2**31 - 1
# set to 1 to range-check source_index on the host before every CUDA launch (one sync each);
# otherwise the kernel clamps it (CPU tensors are always checked: no sync to avoid there)
DEBUG_CHECKS_ENV = "EMPSSL_DEBUG_CHECKS"

# parameter columns, as constexprs so that the jit functions may read them
_CROP_TOP = tl.constexpr(AP.CROP_TOP)
_CROP_LEFT = tl.constexpr(AP.CROP_LEFT)
_CROP_HEIGHT = tl.constexpr(AP.CROP_HEIGHT)
_CROP_WIDTH = tl.constexpr(AP.CROP_WIDTH)
_FLIP = tl.constexpr(AP.FLIP)
_JITTER = tl.constexpr(AP.JITTER)
_BRIGHTNESS = tl.constexpr(AP.BRIGHTNESS)
_CONTRAST = tl.constexpr(AP.CONTRAST)
_SATURATION = tl.constexpr(AP.SATURATION)
_HUE = tl.constexpr(AP.HUE)
_ORDER_0 = tl.constexpr(AP.ORDER_0)
_GRAYSCALE = tl.constexpr(AP.GRAYSCALE)
_BLUR_SIGMA = tl.constexpr(AP.BLUR_SIGMA)
_SOLARIZE = tl.constexpr(AP.SOLARIZE)
_OP_BRIGHTNESS = tl.constexpr(AP.OP_BRIGHTNESS)
_OP_CONTRAST = tl.constexpr(AP.OP_CONTRAST)
_OP_SATURATION = tl.constexpr(AP.OP_SATURATION)
_NUM_JITTER_OPS = tl.constexpr(AP.NUM_JITTER_OPS)

# The kernel packs the rest of a parameter row into one int32 (see _augment_kernel): the op at
# jitter position k in bits [2k, 2k + 2), then one bit per flag.
_ORDER_BITS = tl.constexpr(2)  # an op id < NUM_JITTER_OPS = 4
_ORDER_MASK = tl.constexpr((1 << _ORDER_BITS.value) - 1)
_PACKED_JITTER_BIT = tl.constexpr(_ORDER_BITS.value * AP.NUM_JITTER_OPS)
_PACKED_GRAYSCALE_BIT = tl.constexpr(_PACKED_JITTER_BIT.value + 1)
_PACKED_SOLARIZE_BIT = tl.constexpr(_PACKED_JITTER_BIT.value + 2)


@triton.jit
def _triangle(out_index, crop_index, scale, support):
    """Unnormalised antialiased bilinear weight of crop pixel ``crop_index`` for output pixel ``out_index``."""
    center = scale * (out_index.to(tl.float32) + 0.5)
    distance = (crop_index.to(tl.float32) + 0.5 - center) / support
    return tl.maximum(1.0 - tl.abs(distance), 0.0)


@triton.jit
def _resize_totals(out_index, crop_len, scale, support):
    """Sum of the triangle weights over the crop, per output pixel (the normaliser of each row of W).

    Only the taps within ``support`` of the centre can be non-zero: from trunc(center - support)
    on, int(2 support) + 3 taps cover them.
    """
    center = scale * (out_index.to(tl.float32) + 0.5)
    first = tl.maximum((center - support).to(tl.int32), 0)
    total = tl.zeros(out_index.shape, tl.float32)
    num_taps = (2.0 * support).to(tl.int32) + 3
    for tap in range(0, num_taps):
        j = first + tap
        w = _triangle(out_index, j, scale, support)
        total += tl.where(j < crop_len, w, 0.0)
    return tl.where(total > 0.0, total, 1.0)  # padded rows (out_index >= S) are masked later


@triton.jit
def _gray(r, g, b):
    return r * 0.2989 + g * 0.587 + b * 0.114


@triton.jit
def _clamp01(x):
    return tl.minimum(tl.maximum(x, 0.0), 1.0)


@triton.jit
def _blend(x, other, factor):
    """torchvision's _blend for float images: clamp(f x + (1 - f) other, 0, 1)."""
    return _clamp01(x * factor + other * (1.0 - factor))


@triton.jit
def _adjust_hue(r, g, b, shift):
    """torchvision's _rgb_to_hsv, h = (h + shift) mod 1, _hsv_to_rgb, with its float formulas."""
    maxc = tl.maximum(tl.maximum(r, g), b)
    minc = tl.minimum(tl.minimum(r, g), b)
    gray_pixel = maxc == minc  # hue and saturation are 0 there; avoid dividing by 0
    chroma = maxc - minc
    s = chroma / tl.where(gray_pixel, 1.0, maxc)
    divisor = tl.where(gray_pixel, 1.0, chroma)
    rc = (maxc - r) / divisor
    gc = (maxc - g) / divisor
    bc = (maxc - b) / divisor
    max_is_r = maxc == r
    max_is_g = (maxc == g) & (~max_is_r)
    h = tl.where(max_is_r, bc - gc, tl.where(max_is_g, (rc + 2.0) - bc, (gc + 4.0) - rc))
    h = h * (1.0 / 6.0) + 1.0
    h = h - tl.floor(h)  # fmod(h, 1) for h in [0, 2)
    h = h + shift
    h = h - tl.floor(h)  # torch.remainder(h, 1.0)
    v = maxc
    h6 = h * 6.0
    sector_f = tl.floor(h6)
    frac = h6 - sector_f
    sector = sector_f.to(tl.int32) % 6
    p = _clamp01(v * (1.0 - s))
    q = _clamp01(v * (1.0 - s * frac))
    t = _clamp01(v * (s * frac + (1.0 - s)))
    # sector -> (r, g, b): 0 (v,t,p) 1 (q,v,p) 2 (p,v,t) 3 (p,q,v) 4 (t,p,v) 5 (v,p,q)
    r_out = tl.where((sector == 0) | (sector == 5), v, tl.where(sector == 1, q, tl.where(sector == 4, t, p)))
    g_out = tl.where((sector == 1) | (sector == 2), v, tl.where(sector == 0, t, tl.where(sector == 3, q, p)))
    b_out = tl.where((sector == 3) | (sector == 4), v, tl.where(sector == 2, t, tl.where(sector == 5, q, p)))
    return r_out, g_out, b_out


@triton.jit
def _gaussian_total(sigma, kernel_size):
    """Sum of the unnormalised taps exp(-0.5 (t / sigma)^2), t = -radius..radius, added in order."""
    radius = kernel_size // 2
    total = 0.0
    for tap in range(0, kernel_size):
        z = (tap - radius).to(tl.float32) / sigma
        total += tl.exp(-0.5 * (z * z))
    return total


@triton.jit
def _gaussian_tap(tap, sigma, kernel_size, total):
    """Normalised weight of tap ``tap`` (0..kernel_size-1), as the reference: pdf / pdf.sum()."""
    z = (tap - kernel_size // 2).to(tl.float32) / sigma
    return tl.exp(-0.5 * (z * z)) / total


@triton.jit
def _reflect(pos, size):
    """Index into [0, size) of a position up to size - 1 outside it, with reflect padding."""
    pos = tl.where(pos < 0, -pos, pos)
    return tl.where(pos > size - 1, 2 * (size - 1) - pos, pos)


@triton.jit
def _store_rgb(ptrs, r, g, b, plane, mask):
    tl.store(ptrs, r, mask=mask)
    tl.store(ptrs + plane, g, mask=mask)
    tl.store(ptrs + 2 * plane, b, mask=mask)


@triton.jit
def _blur_pass(plane_ptr, rows, cols, size, sigma, kernel_size, total, inside, VERTICAL: tl.constexpr):
    """One separable Gaussian pass over a size x size plane stored at plane_ptr.

    Output (i, x) = sum over t = 0, 1, ... in order of weight_t * X[i, reflect(x + t - radius)]
    (or X[reflect(i + t - radius), x] when VERTICAL): the reference's taps in its order, so the
    float32 result matches it closely (a dot with reflect folded into the weights rounds
    differently at the borders)."""
    acc = tl.zeros((rows.shape[0], cols.shape[0]), tl.float32)
    for tap in range(0, kernel_size):
        weight = _gaussian_tap(tap, sigma, kernel_size, total)
        offset = tap - kernel_size // 2
        if VERTICAL:
            offsets = _reflect(rows + offset, size)[:, None] * size + cols[None, :]
        else:
            offsets = rows[:, None] * size + _reflect(cols + offset, size)[None, :]
        acc = acc + weight * tl.load(plane_ptr + offsets, mask=inside, other=0.0)
    return acc


@triton.jit
def _blur_plane(plane_ptr, rows, cols, size, sigma, kernel_size, total, inside):
    """Blur one stored plane (horizontal pass, written back in place, then vertical pass).

    The caller stored the plane and synchronised; the plane is read by all threads, so it is
    overwritten only after a barrier, and read back after another."""
    x = _blur_pass(plane_ptr, rows, cols, size, sigma, kernel_size, total, inside, VERTICAL=False)
    tl.debug_barrier()
    tl.store(plane_ptr + rows[:, None] * size + cols[None, :], x, mask=inside)
    tl.debug_barrier()
    return _blur_pass(plane_ptr, rows, cols, size, sigma, kernel_size, total, inside, VERTICAL=True)


@triton.jit
def _finish_channel(x, out_ptrs, solarize, solarize_threshold, mean, std, inside):
    """Solarize (if drawn), normalise, cast and store one channel.

    Plain division: exact for the recipes' std = 0.5; tl.math.div_rn would round correctly for
    any std, but its slow path is a call with a stack frame on sm_80/sm_90."""
    if solarize:
        x = tl.where(x >= solarize_threshold, 1.0 - x, x)
    tl.store(out_ptrs, _cast_out((x - mean) / std, out_ptrs.dtype.element_ty), mask=inside)


@triton.jit
def _resized_crop_channel(
    channel_ptr,
    stride_h,
    stride_w,
    height,
    width,
    top,
    left,
    crop_h,
    crop_w,
    size,
    rows,
    cols,
    resized_cols,
    scale_y,
    scale_x,
    support_y,
    support_x,
    total_y,
    total_x,
    BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr,
):
    """One channel of the resized crop: Wy @ crop @ Wx^T over CHUNK x CHUNK tiles of the crop.

    Horizontal pass first, as ATen's resize; IEEE float32 products (no TF32). One channel at a
    time: three channels' dot operands at once spill at BLOCK_S = 64."""
    chunk = tl.arange(0, CHUNK)
    acc = tl.zeros((BLOCK_S, BLOCK_S), tl.float32)
    for y0 in range(0, crop_h, CHUNK):
        jy = y0 + chunk  # crop rows of this tile
        wy = _triangle(rows[:, None], jy[None, :], scale_y, support_y) / total_y[:, None]
        wy = tl.where((rows[:, None] < size) & (jy[None, :] < crop_h), wy, 0.0)
        src_rows = top + jy
        rows_ok = (jy < crop_h) & (src_rows >= 0) & (src_rows < height)
        for x0 in range(0, crop_w, CHUNK):
            jx = x0 + chunk
            wxt = _triangle(resized_cols[None, :], jx[:, None], scale_x, support_x) / total_x[None, :]
            wxt = tl.where((jx[:, None] < crop_w) & (cols[None, :] < size), wxt, 0.0)
            src_cols = left + jx
            tile_ok = rows_ok[:, None] & ((jx < crop_w) & (src_cols >= 0) & (src_cols < width))[None, :]
            tile_ptrs = channel_ptr + src_rows[:, None] * stride_h + src_cols[None, :] * stride_w
            # uint8 -> [0, 1] as the reference: multiply by float32(1/255)
            tile = tl.load(tile_ptrs, mask=tile_ok, other=0).to(tl.float32) * (1.0 / 255.0)
            acc = tl.dot(wy, tl.dot(tile, wxt, input_precision="ieee"), acc, input_precision="ieee")
    return acc


@triton.jit
def _cast_out(x, dtype: tl.constexpr):
    """float32 -> output dtype, rounding to nearest even as torch's .to().

    bfloat16 rounds with integer ops on the bits (exact for finite values): the interpreter's
    own float32 -> bfloat16 cast truncates, so spelling it out makes the CPU tests check the
    very arithmetic the GPU runs."""
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit(
    do_not_specialize=[
        "stride_in",
        "stride_ih",
        "stride_iw",
        "stride_ic",
        "stride_pp",
        "stride_pc",
        "stride_op",
        "stride_oc",
        "stride_oh",
        "stride_ow",
        "num_images",
        "height",
        "width",
        "size",
        "blur_kernel_size",
        "enabled_ops",
    ]
)  # one compiled variant serves every layout and shape of a given BLOCK_S and output dtype
def _augment_kernel(
    images_ptr,
    source_index_ptr,
    params_ptr,
    out_ptr,
    scratch_ptr,
    stride_in,
    stride_ih,
    stride_iw,
    stride_ic,
    stride_pp,
    stride_pc,
    stride_op,
    stride_oc,
    stride_oh,
    stride_ow,
    num_images,
    height,
    width,
    size,
    blur_kernel_size,
    enabled_ops,
    solarize_threshold,
    mean_r,
    mean_g,
    mean_b,
    std_r,
    std_g,
    std_b,
    BLOCK_S: tl.constexpr,
    CHUNK: tl.constexpr,
):
    patch = tl.program_id(0).to(tl.int64)
    row = params_ptr + patch * stride_pp
    # the crop box clamped into the image as crop_box() of csrc/include/augment_math.h does for
    # the C++ and CUDA kernels (the ops take unchecked rows; the masks below also hold both ways)
    top = tl.minimum(tl.maximum(tl.load(row + _CROP_TOP * stride_pc).to(tl.int32), 0), height - 1)
    left = tl.minimum(tl.maximum(tl.load(row + _CROP_LEFT * stride_pc).to(tl.int32), 0), width - 1)
    crop_h = tl.minimum(tl.maximum(tl.load(row + _CROP_HEIGHT * stride_pc).to(tl.int32), 1), height - top)
    crop_w = tl.minimum(tl.maximum(tl.load(row + _CROP_WIDTH * stride_pc).to(tl.int32), 1), width - left)
    flip = tl.load(row + _FLIP * stride_pc) != 0.0
    # the rest of the row is read now, packed (a live row pointer or nine live scalars across
    # the crop loops made ptxas spill): ops in application order, _ORDER_BITS each, then the flags
    ops = (
        tl.load(row + _ORDER_0 * stride_pc).to(tl.int32)
        | (tl.load(row + (_ORDER_0 + 1) * stride_pc).to(tl.int32) << _ORDER_BITS)
        | (tl.load(row + (_ORDER_0 + 2) * stride_pc).to(tl.int32) << (2 * _ORDER_BITS))
        | (tl.load(row + (_ORDER_0 + 3) * stride_pc).to(tl.int32) << (3 * _ORDER_BITS))
        | ((tl.load(row + _JITTER * stride_pc) != 0.0).to(tl.int32) << _PACKED_JITTER_BIT)
        | ((tl.load(row + _GRAYSCALE * stride_pc) != 0.0).to(tl.int32) << _PACKED_GRAYSCALE_BIT)
        | ((tl.load(row + _SOLARIZE * stride_pc) != 0.0).to(tl.int32) << _PACKED_SOLARIZE_BIT)
    )
    brightness = tl.load(row + _BRIGHTNESS * stride_pc)
    contrast = tl.load(row + _CONTRAST * stride_pc)
    saturation = tl.load(row + _SATURATION * stride_pc)
    hue = tl.load(row + _HUE * stride_pc)
    sigma = tl.load(row + _BLUR_SIGMA * stride_pc)
    # clamped, not checked: a check would need a host sync (see DEBUG_CHECKS_ENV)
    source = tl.minimum(tl.maximum(tl.load(source_index_ptr + patch), 0), num_images - 1)
    image = images_ptr + source * stride_in
    # channel planes by pointer steps: 2 * stride_ic in int32 would wrap for stride_ic >= 2^30
    image_g = image + stride_ic
    image_b = image_g + stride_ic

    rows = tl.arange(0, BLOCK_S)
    cols = tl.arange(0, BLOCK_S)
    inside = (rows[:, None] < size) & (cols[None, :] < size)

    # 1. resized crop (+ flip): out_c = Wy @ crop_c @ Wx^T, over CHUNK x CHUNK tiles of the crop
    size_f = size.to(tl.float32)
    scale_y = crop_h.to(tl.float32) / size_f
    scale_x = crop_w.to(tl.float32) / size_f
    support_y = tl.maximum(scale_y, 1.0)
    support_x = tl.maximum(scale_x, 1.0)
    resized_cols = tl.where(flip, size - 1 - cols, cols)  # output column x shows resized column S-1-x
    total_y = _resize_totals(rows, crop_h, scale_y, support_y)
    total_x = _resize_totals(resized_cols, crop_w, scale_x, support_x)
    r = _resized_crop_channel(
        image,
        stride_ih,
        stride_iw,
        height,
        width,
        top,
        left,
        crop_h,
        crop_w,
        size,
        rows,
        cols,
        resized_cols,
        scale_y,
        scale_x,
        support_y,
        support_x,
        total_y,
        total_x,
        BLOCK_S,
        CHUNK,
    )
    g = _resized_crop_channel(
        image_g,
        stride_ih,
        stride_iw,
        height,
        width,
        top,
        left,
        crop_h,
        crop_w,
        size,
        rows,
        cols,
        resized_cols,
        scale_y,
        scale_x,
        support_y,
        support_x,
        total_y,
        total_x,
        BLOCK_S,
        CHUNK,
    )
    b = _resized_crop_channel(
        image_b,
        stride_ih,
        stride_iw,
        height,
        width,
        top,
        left,
        crop_h,
        crop_w,
        size,
        rows,
        cols,
        resized_cols,
        scale_y,
        scale_x,
        support_y,
        support_x,
        total_y,
        total_x,
        BLOCK_S,
        CHUNK,
    )

    # 2. colour jitter, the four ops in this patch's order; an op whose strength is 0 is skipped
    if ((ops >> _PACKED_JITTER_BIT) & 1) != 0:
        for position in tl.static_range(_NUM_JITTER_OPS):
            op = (ops >> (_ORDER_BITS * position)) & _ORDER_MASK
            if ((enabled_ops >> op) & 1) != 0:
                if op == _OP_BRIGHTNESS:
                    r = _clamp01(r * brightness)
                    g = _clamp01(g * brightness)
                    b = _clamp01(b * brightness)
                elif op == _OP_CONTRAST:
                    mean_gray = tl.sum(tl.sum(tl.where(inside, _gray(r, g, b), 0.0), axis=1), axis=0) / (
                        size_f * size_f
                    )
                    r = _blend(r, mean_gray, contrast)
                    g = _blend(g, mean_gray, contrast)
                    b = _blend(b, mean_gray, contrast)
                elif op == _OP_SATURATION:
                    gray = _gray(r, g, b)
                    r = _blend(r, gray, saturation)
                    g = _blend(g, gray, saturation)
                    b = _blend(b, gray, saturation)
                else:
                    r, g, b = _adjust_hue(r, g, b, hue)

    # 3. grayscale, then blur, solarize, normalise, cast, store through the strides (per channel)
    if ((ops >> _PACKED_GRAYSCALE_BIT) & 1) != 0:
        gray = _gray(r, g, b)
        r = gray
        g = gray
        b = gray
    solarize = ((ops >> _PACKED_SOLARIZE_BIT) & 1) != 0
    out = out_ptr + patch * stride_op + rows[:, None] * stride_oh + cols[None, :] * stride_ow
    if sigma > 0.0:
        # Separable taps need neighbours held by other threads: the patch goes through this
        # patch's float32 scratch slot (three size x size planes); one channel at a time keeps
        # the registers of one plane live, not three.
        plane = size * size
        scratch_patch = scratch_ptr + patch * (3 * plane)
        _store_rgb(scratch_patch + rows[:, None] * size + cols[None, :], r, g, b, plane, inside)
        tl.debug_barrier()  # the whole patch is stored before any thread reads its neighbours
        total = _gaussian_total(sigma, blur_kernel_size)
        x = _blur_plane(scratch_patch, rows, cols, size, sigma, blur_kernel_size, total, inside)
        _finish_channel(x, out, solarize, solarize_threshold, mean_r, std_r, inside)
        x = _blur_plane(scratch_patch + plane, rows, cols, size, sigma, blur_kernel_size, total, inside)
        _finish_channel(x, out + stride_oc, solarize, solarize_threshold, mean_g, std_g, inside)
        x = _blur_plane(scratch_patch + 2 * plane, rows, cols, size, sigma, blur_kernel_size, total, inside)
        _finish_channel(x, out + 2 * stride_oc, solarize, solarize_threshold, mean_b, std_b, inside)
    else:
        _finish_channel(r, out, solarize, solarize_threshold, mean_r, std_r, inside)
        _finish_channel(g, out + stride_oc, solarize, solarize_threshold, mean_g, std_g, inside)
        _finish_channel(b, out + 2 * stride_oc, solarize, solarize_threshold, mean_b, std_b, inside)


def launch_config(output_size: int, capability: Tuple[int, int] = (9, 0)) -> Tuple[int, int, int]:
    """(BLOCK_S, CHUNK, num_warps) for patches of output_size x output_size pixels on a GPU of this capability.

    BLOCK_S is the size padded to a power of two, at least 16 (tl.dot's smallest tile). The
    crop is read in CHUNK x CHUNK tiles (16: a CIFAR crop is one tile). The warp count keeps
    the three patch tiles in registers with no stack frame on sm_80 and sm_90 under triton 3.6
    and 3.8 (tests/test_triton_aot.py checks it). At BLOCK_S = 16 no one count does for both:
    2 warps leave an 8-byte stack on sm_90 under triton 3.6, 4 warps one on sm_80 under 3.6,
    1 warp a 16-byte one on sm_80 under 3.8; so sm_90 and newer take 4 warps, older GPUs 2.
    """
    if not 1 <= output_size <= MAX_OUTPUT_SIZE:
        raise ValueError(
            f"output_size must be in [1, {MAX_OUTPUT_SIZE}] for the Triton augment kernel, got {output_size}"
        )
    block_s = max(16, triton.next_power_of_2(output_size))
    num_warps = {16: 4 if tuple(capability) >= (9, 0) else 2, 32: 4, 64: 8}[block_s]
    return block_s, 16, num_warps


def _capability(device: torch.device) -> Tuple[int, int]:
    """The GPU's compute capability (the interpreter on a CPU is given the default's)."""
    return torch.cuda.get_device_capability(device) if device.type == "cuda" else (9, 0)


def _interpreted() -> bool:
    return not isinstance(_augment_kernel, triton.runtime.JITFunction)


def _input_error(images_nhwc, source_index, params, config) -> Optional[Tuple[type, str]]:
    """(exception class, message) for inputs that no backend could take, else None."""
    for name, value in (("images_nhwc", images_nhwc), ("source_index", source_index), ("params", params)):
        if not isinstance(value, torch.Tensor):
            return TypeError, f"{name} must be a torch.Tensor, got {type(value).__name__}"
    if images_nhwc.dtype != torch.uint8:
        return TypeError, f"images_nhwc must be uint8, got {images_nhwc.dtype}"
    if images_nhwc.ndim != 4 or images_nhwc.shape[3] != 3:
        return ValueError, f"images_nhwc must have shape (N, H, W, 3), got {tuple(images_nhwc.shape)}"
    if source_index.dtype != torch.int64 or source_index.ndim != 1:
        return (
            TypeError,
            f"source_index must be a 1-D int64 tensor, got {source_index.dtype} of shape {tuple(source_index.shape)}",
        )
    if params.dtype != torch.float32:
        return TypeError, f"params must be float32, got {params.dtype}"
    if params.ndim != 2 or params.shape[1] != AP.NUM_PARAMS or params.shape[0] != source_index.shape[0]:
        return ValueError, (
            f"params must have shape (P, {AP.NUM_PARAMS}) with P = len(source_index) = "
            f"{source_index.shape[0]}, got {tuple(params.shape)}"
        )
    if not (images_nhwc.device == source_index.device == params.device):
        return ValueError, (
            f"images_nhwc, source_index and params must be on one device, got "
            f"{images_nhwc.device}, {source_index.device}, {params.device}"
        )
    size = config.output_size
    if not isinstance(size, int) or size < 1:
        return ValueError, f"config.output_size must be a positive int, got {size!r}"
    kernel_size = config.blur_kernel_size
    if not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        return ValueError, f"config.blur_kernel_size must be a positive odd int, got {kernel_size!r}"
    if kernel_size // 2 >= size:
        return ValueError, (
            f"config.blur_kernel_size {kernel_size} needs output_size > {kernel_size // 2} "
            f"(reflect padding), got {size}"
        )
    if len(config.mean) != 3 or len(config.std) != 3 or any(s == 0 for s in config.std):
        return (
            ValueError,
            f"config.mean and config.std must be 3 numbers, std non-zero, got {config.mean}, {config.std}",
        )
    return None


def unsupported_reason(device, images_nhwc, source_index, params, config) -> Optional[str]:
    """None when ``augment_patches`` can run these inputs on ``device``, else a sentence saying why not.
    Whether Triton can run on the device at all (a GPU, the interpreter) is the dispatcher's check (empssl.backends)."""
    device = torch.device(device)
    error = _input_error(images_nhwc, source_index, params, config)
    if error:
        return error[1]
    if config.output_size > MAX_OUTPUT_SIZE:
        return (
            f"the Triton augment kernel holds a whole patch in one program's registers (the contrast "
            f"mean and the blur need all of it), so output_size <= {MAX_OUTPUT_SIZE}; got {config.output_size}"
        )
    if any(abs(s) > _INT32_MAX for s in images_nhwc.stride()):
        return f"the Triton augment kernel takes int32 image strides, got {images_nhwc.stride()}"
    # the largest offset within one channel plane, and the step to the last channel (the image
    # offset itself, source * stride_n, is int64)
    _, height, width, _ = images_nhwc.shape
    plane_span = (height - 1) * abs(images_nhwc.stride(1)) + (width - 1) * abs(images_nhwc.stride(2))
    if plane_span > _INT32_MAX or 2 * abs(images_nhwc.stride(3)) > _INT32_MAX:
        return (
            f"the Triton augment kernel indexes within one image in int32; this image's offsets reach "
            f"{plane_span} within a channel and {2 * abs(images_nhwc.stride(3))} across channels "
            f"(strides {images_nhwc.stride()}), beyond 2^31 - 1"
        )
    if device.type == "cpu" and not _interpreted():
        return "TRITON_INTERPRET=1 was set after triton was imported, so the kernel cannot run on CPU tensors"
    return None


def _check_source_index(source_index: torch.Tensor, num_images: int) -> None:
    """Raise IndexError unless every source_index is in [0, num_images) (reads the values: a sync on CUDA)."""
    if source_index.numel() == 0:
        return
    lowest, highest = (int(v) for v in torch.aminmax(source_index))
    if lowest < 0 or highest >= num_images:
        raise IndexError(f"source_index must be in [0, {num_images}), got values in [{lowest}, {highest}]")


def augment_patches(
    images_nhwc: torch.Tensor,
    source_index: torch.Tensor,
    params: torch.Tensor,
    config,
    out_dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
) -> torch.Tensor:
    """Patches (P, 3, S, S) in ``out_dtype``: patch p cut from ``images_nhwc[source_index[p]]`` with ``params[p]``.

    ``images_nhwc`` is uint8 (N, H, W, 3) of any strides (an NCHW tensor permuted is fine: the
    strides go to the kernel, no copy). With ``channels_last`` the kernel writes the output in
    torch.channels_last memory format directly. Crop boxes are clamped into the image and
    ``source_index`` into [0, N) in the kernel, as the C++/CUDA kernels do; ``source_index`` is
    also checked (IndexError) for CPU tensors, and for CUDA ones when EMPSSL_DEBUG_CHECKS=1.
    """
    error = _input_error(images_nhwc, source_index, params, config)
    if error:
        raise error[0](error[1])
    if out_dtype not in SUPPORTED_OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {SUPPORTED_OUT_DTYPES}, got {out_dtype}")
    reason = unsupported_reason(images_nhwc.device, images_nhwc, source_index, params, config)
    if reason:
        raise ValueError(reason)
    size = config.output_size
    block_s, chunk, num_warps = launch_config(size, _capability(images_nhwc.device))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    num_patches = params.shape[0]
    out = torch.empty(
        (num_patches, 3, size, size), dtype=out_dtype, device=images_nhwc.device, memory_format=memory_format
    )
    if num_patches == 0:
        return out
    num_images, height, width, _ = images_nhwc.shape
    if images_nhwc.device.type == "cpu" or os.environ.get(DEBUG_CHECKS_ENV) == "1":
        _check_source_index(source_index, num_images)
    # float32 slot per patch for the blur's second read of the patch (only blurred patches touch it)
    scratch = torch.empty(num_patches * 3 * size * size, dtype=torch.float32, device=images_nhwc.device)
    with on_device(images_nhwc.device):
        _augment_kernel[(num_patches,)](
            images_nhwc,
            source_index,
            params,
            out,
            scratch,
            *images_nhwc.stride(),
            *params.stride(),
            *out.stride(),
            num_images,
            height,
            width,
            size,
            config.blur_kernel_size,
            config.jitter_op_mask(),
            float(config.solarize_threshold),
            *(float(m) for m in config.mean),
            *(float(s) for s in config.std),
            BLOCK_S=block_s,
            CHUNK=chunk,
            num_warps=num_warps,
        )
    return out


def _aot_configs():
    """Every (kernel, signature, constexprs, options) that dispatch launches on sm_80 and sm_90.

    The integer arguments are not specialised (do_not_specialize), so one signature per
    (BLOCK_S, output dtype) covers every stride pattern and shape; ``options["cc"]`` names the
    targets whose launch_config picks that warp count.
    """
    configs = []
    for size in (16, 32, 64):
        warps_by_cc = {cc: launch_config(size, divmod(cc, 10))[2] for cc in (80, 90)}
        block_s, chunk, _ = launch_config(size)
        for dtype in SUPPORTED_OUT_DTYPES:
            signature = {
                "images_ptr": "*u8",
                "source_index_ptr": "*i64",
                "params_ptr": "*fp32",
                "out_ptr": "*" + _SIGNATURE_DTYPES[dtype],
                "scratch_ptr": "*fp32",
                **{
                    name: "i32"
                    for name in (
                        "stride_in",
                        "stride_ih",
                        "stride_iw",
                        "stride_ic",
                        "stride_pp",
                        "stride_pc",
                        "stride_op",
                        "stride_oc",
                        "stride_oh",
                        "stride_ow",
                        "num_images",
                        "height",
                        "width",
                        "size",
                        "blur_kernel_size",
                        "enabled_ops",
                    )
                },
                **{
                    name: "fp32"
                    for name in ("solarize_threshold", "mean_r", "mean_g", "mean_b", "std_r", "std_g", "std_b")
                },
                "BLOCK_S": "constexpr",
                "CHUNK": "constexpr",
            }
            constexprs = {"BLOCK_S": block_s, "CHUNK": chunk}
            for num_warps in sorted(set(warps_by_cc.values())):
                targets = [cc for cc, warps in warps_by_cc.items() if warps == num_warps]
                configs.append((_augment_kernel, signature, constexprs, {"num_warps": num_warps, "cc": targets}))
    return configs


AOT_CONFIGS = _aot_configs()
