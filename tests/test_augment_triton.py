"""The Triton augmentation kernel (kernels/augment.py) against the reference applier.

Runs under the Triton interpreter on the CPU (tests/conftest.py sets TRITON_INTERPRET=1), so
batches are tiny. Every comparison uses the same parameter rows for the kernel and
``empssl.reference.augment.apply_augment``:
  - float32: max abs error <= 2e-5 after normalisation;
  - bfloat16 / float16: equal to the reference rounded to that dtype except where the two
    float32 values straddle a rounding boundary: fewer than 0.1% of elements differ, each by
    one unit in the last place of that dtype.
Single-op tests also check that the op changes the patch by far more than the tolerance, so
a kernel that skipped the op could not pass.
"""

import dataclasses

import pytest
import torch
from launch_recorder import record_launches
from solarize_ties import solarize_ties

from empssl import backends
from empssl.augment import params as AP
from empssl.augment.config import AugmentConfig
from empssl.augment.multipatch import sample_augment_params
from empssl.kernels import augment as triton_augment
from empssl.reference.augment import apply_augment

# Not a module-level skip on the interpreter: the GPU run (bench/gpu_check.sh) sets TRITON_INTERPRET=0, and its
# `gpu` tests below run the compiled kernel. Without triton there is nothing to test here at all.
if backends._triton_import_reason() is not None:
    pytest.skip(backends._triton_import_reason(), allow_module_level=True)


@pytest.fixture(autouse=True)
def _interpreter_for_cpu_tests(request):
    """The CPU tests run the kernel under the Triton interpreter: skipped where it is off or broken."""
    reason = backends.triton_reason(torch.device("cpu"))
    if reason is not None and "gpu" not in request.keywords:
        pytest.skip(reason)


FLOAT32_TOL = 2e-5
LOW_PRECISION_DTYPES = (torch.bfloat16, torch.float16)


def _images(num, height, width, generator, nchw_view=False):
    """Random uint8 images viewed as (N, H, W, 3); with ``nchw_view`` stored NCHW and permuted (no copy)."""
    if nchw_view:
        stored = torch.randint(0, 256, (num, 3, height, width), dtype=torch.uint8, generator=generator)
        return stored.permute(0, 2, 3, 1)
    return torch.randint(0, 256, (num, height, width, 3), dtype=torch.uint8, generator=generator)


def _plain_params(num_patches, height, width, generator, min_side=1):
    """Rows with a random crop box (sides >= min_side) and every other op off (identity jitter order)."""
    params = torch.zeros(num_patches, AP.NUM_PARAMS)
    for p in range(num_patches):
        h = int(torch.randint(min_side, height + 1, (), generator=generator))
        w = int(torch.randint(min_side, width + 1, (), generator=generator))
        params[p, AP.CROP_TOP] = int(torch.randint(0, height - h + 1, (), generator=generator))
        params[p, AP.CROP_LEFT] = int(torch.randint(0, width - w + 1, (), generator=generator))
        params[p, AP.CROP_HEIGHT], params[p, AP.CROP_WIDTH] = h, w
    params[:, AP.ORDER_0 : AP.ORDER_3 + 1] = torch.arange(4.0)
    params[:, AP.BRIGHTNESS : AP.SATURATION + 1] = 1.0
    return params


def _max_error(images, source_index, params, config, channels_last=False):
    """Max abs error against the reference, solarize ties (see tests/solarize_ties.py) excluded; they must be rare."""
    out = triton_augment.augment_patches(images, source_index, params, config, torch.float32, channels_last)
    ref = apply_augment(images, source_index, params, config, torch.float32, channels_last)
    assert out.shape == ref.shape == (params.shape[0], 3, config.output_size, config.output_size)
    assert torch.isfinite(out).all()
    ties = solarize_ties(out, ref, params, config)
    assert ties.sum().item() <= 0.01 * ref.numel(), "solarize ties are not rare"
    return torch.where(ties, 0.0, (out.double() - ref.double()).abs()).max().item(), ref


def _set_jitter_op(params, op, column, factor):
    params[:, AP.JITTER] = 1.0
    params[:, column] = factor
    params[:, AP.ORDER_0 : AP.ORDER_3 + 1] = torch.tensor([op] + [o for o in range(4) if o != op], dtype=torch.float32)


def _enable(name, params, generator):
    """Turn op ``name`` on in rows of _plain_params, with factors far enough from identity to show."""
    n = params.shape[0]
    uniform = lambda low, high: low + (high - low) * torch.rand(n, generator=generator)  # noqa: E731
    if name == "flip":
        params[:, AP.FLIP] = 1.0
    elif name == "brightness":
        _set_jitter_op(params, AP.OP_BRIGHTNESS, AP.BRIGHTNESS, uniform(0.4, 0.8))
    elif name == "contrast":
        _set_jitter_op(params, AP.OP_CONTRAST, AP.CONTRAST, uniform(0.2, 0.6))
    elif name == "saturation":
        _set_jitter_op(params, AP.OP_SATURATION, AP.SATURATION, uniform(0.0, 0.5))
    elif name == "hue":
        sign = torch.randint(0, 2, (n,), generator=generator) * 2.0 - 1.0
        _set_jitter_op(params, AP.OP_HUE, AP.HUE, sign * uniform(0.1, 0.5))
    elif name == "grayscale":
        params[:, AP.GRAYSCALE] = 1.0
    elif name == "blur":
        params[:, AP.BLUR_SIGMA] = uniform(0.5, 2.0)
    elif name == "solarize":
        params[:, AP.SOLARIZE] = 1.0
    else:
        raise AssertionError(name)


SINGLE_OPS = ("flip", "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "solarize")


@pytest.mark.parametrize("size", [8, 16, 32])
def test_resized_crop_alone_matches_reference(size):
    """Random crops of a 8..40 px source: up- and downscaling on each axis, crops of 1 px included."""
    gen = torch.Generator().manual_seed(size)
    images = _images(3, 40, 29, gen)
    params = _plain_params(8, 40, 29, gen)
    params[0, AP.CROP_TOP : AP.CROP_WIDTH + 1] = torch.tensor([0.0, 0.0, 40.0, 29.0])  # whole image: downscale
    params[1, AP.CROP_TOP : AP.CROP_WIDTH + 1] = torch.tensor([5.0, 7.0, 1.0, 1.0])  # a single pixel
    source_index = torch.randint(0, 3, (8,), generator=gen)
    error, _ = _max_error(images, source_index, params, AugmentConfig(output_size=size))
    assert error <= FLOAT32_TOL


def test_identity_crop_reproduces_the_image():
    """A crop of the whole image at its own size is the identity: the patch is the image, normalised."""
    gen = torch.Generator().manual_seed(1)
    images = _images(2, 16, 16, gen)
    params = _plain_params(2, 16, 16, gen)
    params[:, AP.CROP_TOP : AP.CROP_WIDTH + 1] = torch.tensor([0.0, 0.0, 16.0, 16.0])
    config = AugmentConfig(output_size=16)
    out = triton_augment.augment_patches(images, torch.tensor([1, 0]), params, config, torch.float32, False)
    expected = (images[[1, 0]].permute(0, 3, 1, 2).double() / 255 - 0.5) / 0.5
    assert (out.double() - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("op", SINGLE_OPS)
def test_each_op_alone_matches_reference(op):
    gen = torch.Generator().manual_seed(hash(op) % 1000)
    size = 16
    images = _images(3, 24, 20, gen)
    params = _plain_params(6, 24, 20, gen, min_side=6)  # no near-constant patch: every op shows
    source_index = torch.randint(0, 3, (6,), generator=gen)
    config = AugmentConfig(output_size=size)
    without_op = apply_augment(images, source_index, params, config)
    _enable(op, params, gen)
    error, ref = _max_error(images, source_index, params, config)
    assert error <= FLOAT32_TOL
    # the op changes every patch by far more than the tolerance, so skipping it would fail
    changed = (ref - without_op).abs().amax(dim=(1, 2, 3))
    assert (changed > 100 * FLOAT32_TOL).all(), changed


def test_jitter_order_is_read_from_the_params():
    """Two patches with the same crop and factors and opposite op orders differ, each as the reference."""
    gen = torch.Generator().manual_seed(7)
    images = _images(1, 20, 20, gen)
    params = _plain_params(1, 20, 20, gen).repeat(2, 1)
    params[:, AP.JITTER] = 1.0
    params[:, AP.BRIGHTNESS : AP.HUE + 1] = torch.tensor([1.5, 0.5, 1.7, 0.3])
    params[0, AP.ORDER_0 : AP.ORDER_3 + 1] = torch.tensor([0.0, 1.0, 2.0, 3.0])
    params[1, AP.ORDER_0 : AP.ORDER_3 + 1] = torch.tensor([3.0, 2.0, 1.0, 0.0])
    config = AugmentConfig(output_size=16)
    source_index = torch.zeros(2, dtype=torch.int64)
    out = triton_augment.augment_patches(images, source_index, params, config, torch.float32, False)
    ref = apply_augment(images, source_index, params, config)
    assert (out - ref).abs().max().item() <= FLOAT32_TOL
    assert (out[0] - out[1]).abs().max().item() > 0.05


def test_jitter_op_with_zero_strength_is_skipped_as_in_the_reference():
    """config.hue == 0 drops the hue op even where the row holds a shift (torchvision's ColorJitter does)."""
    gen = torch.Generator().manual_seed(8)
    images = _images(2, 16, 16, gen)
    params = _plain_params(4, 16, 16, gen)
    _enable("hue", params, gen)
    config = AugmentConfig(output_size=16, hue=0.0)
    source_index = torch.tensor([0, 1, 0, 1])
    error, ref = _max_error(images, source_index, params, config)
    assert error <= FLOAT32_TOL
    with_hue = apply_augment(images, source_index, params, AugmentConfig(output_size=16))
    assert (with_hue - ref).abs().max().item() > 0.05


def _chain_config(size):
    """High probabilities so that a small batch exercises every op, blur on and off included."""
    return AugmentConfig(
        output_size=size,
        crop_scale=(0.08, 1.0),
        crop_ratio=(3 / 4, 4 / 3),
        flip_p=0.5,
        jitter_p=0.9,
        grayscale_p=0.3,
        blur_p=0.5,
        solarize_p=0.5,
    )


def _chain_inputs(size, num_images, num_patches, height, width, seed, nchw_view=False):
    gen = torch.Generator().manual_seed(seed)
    images = _images(num_images, height, width, gen, nchw_view)
    source_index, params = sample_augment_params(_chain_config(size), num_images, num_patches, height, width, gen)
    blurred = params[:, AP.BLUR_SIGMA] > 0
    assert blurred.any() and not blurred.all(), "the batch must mix blurred and unblurred patches"
    return images, source_index, params


@pytest.mark.parametrize("size, height, width", [(8, 40, 33), (16, 12, 21), (32, 32, 32), (12, 9, 40)])
@pytest.mark.parametrize("nchw_view", [False, True])
def test_random_chains_float32(size, height, width, nchw_view):
    """Full chains (downscaling crops included at 40 -> 8) from NHWC and NCHW-view sources."""
    images, source_index, params = _chain_inputs(size, 2, 3, height, width, seed=size + height, nchw_view=nchw_view)
    assert images.is_contiguous() != nchw_view
    error, ref = _max_error(images, source_index, params, _chain_config(size), channels_last=nchw_view)
    assert error <= FLOAT32_TOL


def _low_precision_mismatches(out, ref):
    """Fraction of elements that differ. Each difference must be explained by float32 values
    within 1e-6 of each other: at most one unit in the last place of the 16-bit dtype, plus 1e-6
    where that unit is smaller (near 0, where float16 is subnormal)."""
    differ = out != ref
    finfo = torch.finfo(out.dtype)
    magnitude = torch.maximum(out.float().abs(), ref.float().abs())[differ]
    ulp = finfo.eps * torch.exp2(torch.floor(torch.log2(magnitude.clamp(min=finfo.tiny))))
    assert ((out.float() - ref.float())[differ].abs() <= ulp + 1e-6).all()
    return differ.double().mean().item()


@pytest.mark.parametrize("out_dtype, channels_last", [(torch.bfloat16, True), (torch.float16, False)])
def test_low_precision_output_is_the_float32_output_rounded(out_dtype, channels_last):
    """Stress chains (half the patches blurred): the 16-bit output is exactly the kernel's float32
    output rounded to nearest even, so it differs from the reference rounded only where the two
    float32 values (within 1e-6) straddle a rounding boundary."""
    size = 32
    images, source_index, params = _chain_inputs(size, 2, 4, 32, 32, seed=11, nchw_view=channels_last)
    config = _chain_config(size)
    out = triton_augment.augment_patches(images, source_index, params, config, out_dtype, channels_last)
    out_float32 = triton_augment.augment_patches(images, source_index, params, config, torch.float32, channels_last)
    ref = apply_augment(images, source_index, params, config, out_dtype, channels_last)
    assert out.dtype == out_dtype
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    assert torch.equal(out, out_float32.to(out_dtype))
    assert _low_precision_mismatches(out, ref) < 5e-3


@pytest.mark.parametrize("out_dtype", LOW_PRECISION_DTYPES)
def test_low_precision_cifar_recipe_equals_reference_rounded(out_dtype):
    """The CIFAR recipe (blur on 10% of patches): fewer than 0.1% of 16-bit elements differ from
    the reference rounded, each by one unit in the last place."""
    gen = torch.Generator().manual_seed(12)
    config = AugmentConfig.cifar()
    images = _images(8, 32, 32, gen)
    source_index, params = sample_augment_params(config, 8, 2, 32, 32, gen)
    out = triton_augment.augment_patches(images, source_index, params, config, out_dtype, False)
    ref = apply_augment(images, source_index, params, config, out_dtype, False)
    assert _low_precision_mismatches(out, ref) < 1e-3


def test_output_layout_and_values_do_not_depend_on_memory_format():
    images, source_index, params = _chain_inputs(16, 2, 3, 20, 20, seed=3)
    config = _chain_config(16)
    channels_last = triton_augment.augment_patches(images, source_index, params, config, torch.float32, True)
    contiguous = triton_augment.augment_patches(images, source_index, params, config, torch.float32, False)
    assert channels_last.is_contiguous(memory_format=torch.channels_last) and not channels_last.is_contiguous()
    assert contiguous.is_contiguous()
    assert torch.equal(channels_last, contiguous)


def test_input_strides_are_used_without_a_copy():
    """A patch cut from a strided view (every other image, a sub-window) equals one cut from its copy."""
    gen = torch.Generator().manual_seed(5)
    big = _images(6, 30, 30, gen, nchw_view=True)
    view = big[::2, 3:27, 5:25]  # (3, 24, 20, 3) with non-trivial strides
    source_index, params = sample_augment_params(_chain_config(16), 3, 2, 24, 20, gen)
    config = _chain_config(16)
    from_view = triton_augment.augment_patches(view, source_index, params, config, torch.float32, False)
    from_copy = triton_augment.augment_patches(view.contiguous(), source_index, params, config, torch.float32, False)
    assert torch.equal(from_view, from_copy)
    assert (from_view - apply_augment(view, source_index, params, config)).abs().max().item() <= FLOAT32_TOL


def test_unsupported_reason_and_input_errors():
    gen = torch.Generator().manual_seed(0)
    images = _images(2, 16, 16, gen)
    source_index, params = sample_augment_params(AugmentConfig(), 2, 2, 16, 16, gen)
    cpu = torch.device("cpu")
    assert triton_augment.unsupported_reason(cpu, images, source_index, params, AugmentConfig()) is None
    big = AugmentConfig.imagenet()
    reason = triton_augment.unsupported_reason(cpu, images, source_index, params, big)
    assert reason is not None and "output_size" in reason and str(triton_augment.MAX_OUTPUT_SIZE) in reason
    with pytest.raises(ValueError, match="output_size"):
        triton_augment.augment_patches(images, source_index, params, big, torch.float32, False)
    with pytest.raises(TypeError, match="images_nhwc"):
        triton_augment.augment_patches(images.float(), source_index, params, AugmentConfig(), torch.float32, False)
    with pytest.raises(ValueError, match="params"):
        triton_augment.augment_patches(images, source_index, params[:, :5], AugmentConfig(), torch.float32, False)
    with pytest.raises(TypeError, match="out_dtype"):
        triton_augment.augment_patches(images, source_index, params, AugmentConfig(), torch.float64, False)
    with pytest.raises(ValueError, match="blur_kernel_size"):
        small = AugmentConfig(output_size=6)
        triton_augment.augment_patches(images, source_index, params, small, torch.float32, False)


def test_aot_configs_cover_every_launch_config():
    """Each output size dispatch accepts maps, on sm_80 and on sm_90, to a (BLOCK_S, CHUNK, num_warps)
    listed for that target, for every output dtype."""
    listed = {
        (c["BLOCK_S"], c["CHUNK"], options["num_warps"], sig["out_ptr"], cc)
        for _, sig, c, options in triton_augment.AOT_CONFIGS
        for cc in options["cc"]
    }
    for cc in (80, 90):
        for size in range(1, triton_augment.MAX_OUTPUT_SIZE + 1):
            block_s, chunk, warps = triton_augment.launch_config(size, divmod(cc, 10))
            for dtype in triton_augment.SUPPORTED_OUT_DTYPES:
                assert (block_s, chunk, warps, "*" + triton_augment._SIGNATURE_DTYPES[dtype], cc) in listed
    kernel_args = triton_augment._augment_kernel.arg_names
    for _, signature, _, _ in triton_augment.AOT_CONFIGS:
        assert list(signature) == kernel_args


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config",
    [AugmentConfig.cifar(), AugmentConfig.tinyimagenet(), dataclasses.replace(_chain_config(32), blur_p=0.5)],
    ids=["cifar", "tiny", "chain"],
)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_gpu_full_batch_matches_reference(config, out_dtype):
    """A training-size batch (100 images x 20 patches) on the GPU against the reference on the GPU."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    side = 64 if config.output_size == 64 else 32
    images = torch.randint(0, 256, (100, side, side, 3), dtype=torch.uint8, device="cuda", generator=gen)
    source_index, params = sample_augment_params(config, 100, 20, side, side, gen, "cuda")
    out = triton_augment.augment_patches(images, source_index, params, config, out_dtype, True)
    ref = apply_augment(images, source_index, params, config, out_dtype, True)
    if out_dtype == torch.float32:
        assert (out - ref).abs().max().item() <= FLOAT32_TOL
    else:
        assert (out != ref).double().mean().item() < 1e-3


def test_output_cast_rounds_to_nearest_even():
    """The kernel's float32 -> output cast equals torch's .to(), on exact ties and exponent carries too."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(out_ptr + i, triton_augment._cast_out(tl.load(x_ptr + i), out_ptr.dtype.element_ty))

    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1024, generator=gen) * 3
    ties = torch.tensor([1 + 2**-8, 1 + 3 * 2**-8, 2 - 2**-9, -(1 + 2**-8), 1 + 2**-11, 1 + 3 * 2**-11, 2 - 2**-12])
    x[: ties.numel()] = ties
    for dtype in triton_augment.SUPPORTED_OUT_DTYPES:
        out = torch.empty(1024, dtype=dtype)
        cast_kernel[(1,)](x, out, BLOCK=1024)
        assert torch.equal(out, x.to(dtype)), dtype


def _clamped_as_crop_box(params, height, width):
    """The crop box rule of csrc/include/augment_math.h crop_box(), which every kernel applies."""
    params = params.clone()
    top = params[:, AP.CROP_TOP].trunc().clamp(0, height - 1)
    left = params[:, AP.CROP_LEFT].trunc().clamp(0, width - 1)
    params[:, AP.CROP_TOP], params[:, AP.CROP_LEFT] = top, left
    params[:, AP.CROP_HEIGHT] = torch.minimum(params[:, AP.CROP_HEIGHT].trunc().clamp(min=1), height - top)
    params[:, AP.CROP_WIDTH] = torch.minimum(params[:, AP.CROP_WIDTH].trunc().clamp(min=1), width - left)
    return params


def test_crop_boxes_outside_the_image_are_clamped_into_it():
    """Boxes above, left of, below and right of the image (the ops take unchecked rows): the kernel
    reads only inside the image, the box clamped as the C++ and CUDA kernels clamp it."""
    gen = torch.Generator().manual_seed(21)
    images = _images(2, 20, 18, gen)
    params = _plain_params(4, 20, 18, gen)
    params[:, AP.CROP_TOP : AP.CROP_WIDTH + 1] = torch.tensor(
        [[-5.0, -3.0, 12.0, 10.0], [-30.0, 4.0, 8.0, 40.0], [15.0, -1.0, 20.0, 6.0], [25.0, 30.0, 9.0, 9.0]]
    )
    source_index = torch.tensor([0, 1, 1, 0])
    config = AugmentConfig(output_size=16)
    out = triton_augment.augment_patches(images, source_index, params, config, torch.float32, False)
    ref = apply_augment(images, source_index, _clamped_as_crop_box(params, 20, 18), config)
    assert (out - ref).abs().max().item() <= FLOAT32_TOL


def test_source_index_out_of_range_is_refused_on_the_cpu_and_clamped_in_the_kernel(monkeypatch):
    gen = torch.Generator().manual_seed(22)
    images = _images(3, 16, 16, gen)
    params = _plain_params(3, 16, 16, gen)
    config = AugmentConfig(output_size=16)
    for bad in ([0, 3, 1], [-1, 0, 2]):
        with pytest.raises(IndexError, match=r"source_index must be in \[0, 3\)"):
            triton_augment.augment_patches(images, torch.tensor(bad), params, config, torch.float32, False)
    # what CUDA tensors get without EMPSSL_DEBUG_CHECKS=1 (no host sync): the kernel's clamp
    monkeypatch.setattr(triton_augment, "_check_source_index", lambda source_index, num_images: None)
    out = triton_augment.augment_patches(images, torch.tensor([-4, 7, 1]), params, config, torch.float32, False)
    ref = apply_augment(images, torch.tensor([0, 2, 1]), params, config)
    assert (out - ref).abs().max().item() <= FLOAT32_TOL


@pytest.mark.parametrize(
    "strides, words",
    [
        ((1, 32, 1, 2**30), "across channels"),  # channel planes 2^30 apart (NCHW view, H*W = 2^30): 2 * stride_c wraps
        ((1, 2**27, 1, 2**20), "within a channel"),  # (H - 1) * stride_h beyond 2^31
    ],
)
def test_image_offsets_beyond_int32_are_refused(strides, words):
    images = torch.empty_strided((1, 32, 32, 3), strides, dtype=torch.uint8, device="meta")  # no memory
    source_index = torch.zeros(1, dtype=torch.int64, device="meta")
    params = torch.zeros(1, AP.NUM_PARAMS, device="meta")
    reason = triton_augment.unsupported_reason("meta", images, source_index, params, AugmentConfig(output_size=16))
    assert reason is not None and "int32" in reason and words in reason


def test_launch_runs_inside_the_guard_of_the_images_device(monkeypatch):
    events = record_launches(monkeypatch, triton_augment, "_augment_kernel")
    gen = torch.Generator().manual_seed(23)
    images = _images(1, 16, 16, gen)
    params = _plain_params(1, 16, 16, gen)
    out = triton_augment.augment_patches(
        images, torch.tensor([0]), params, AugmentConfig(output_size=16), torch.float32, False
    )
    assert events == [("enter", images.device), ("launch", None), ("exit", images.device)]
    assert (
        out - apply_augment(images, torch.tensor([0]), params, AugmentConfig(output_size=16))
    ).abs().max() <= FLOAT32_TOL


@pytest.mark.gpu
def test_images_on_a_second_gpu_are_augmented_there():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a CUDA GPU: two devices")
    images, source_index, params = _chain_inputs(32, 2, 4, 32, 32, seed=24)
    images, source_index, params = images.to("cuda:1"), source_index.to("cuda:1"), params.to("cuda:1")
    with torch.cuda.device(0):  # the current device is not the images'
        out = triton_augment.augment_patches(images, source_index, params, _chain_config(32), torch.float32, False)
    assert out.device == images.device
    ref = apply_augment(images.cpu(), source_index.cpu(), params.cpu(), _chain_config(32))
    assert (out.cpu() - ref).abs().max().item() <= FLOAT32_TOL


@pytest.mark.gpu
@pytest.mark.parametrize("size", [12, 40, 64], ids=["block16", "block64-odd", "block64"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gpu_every_output_size_class_dtype_and_layout(size, out_dtype, channels_last):
    """Each compiled (BLOCK_S, output dtype) variant, both output layouts, against the reference
    (size 32, the third class, is the other gpu tests' CIFAR size)."""
    images, source_index, params = _chain_inputs(size, 4, 8, 48, 56, seed=size)
    config = _chain_config(size)
    cuda = [t.cuda() for t in (images, source_index, params)]
    out = triton_augment.augment_patches(*cuda, config, out_dtype, channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    out32 = triton_augment.augment_patches(*cuda, config, torch.float32, channels_last)
    ref = apply_augment(images, source_index, params, config, torch.float32, channels_last)
    assert (out32.cpu() - ref).abs().max().item() <= FLOAT32_TOL
    if out_dtype != torch.float32:
        # the 16-bit output is the kernel's float32 output rounded to nearest even
        assert torch.equal(out.cpu(), out32.cpu().to(out_dtype))


@pytest.mark.gpu
def test_gpu_source_index_is_clamped_and_checked_in_debug_mode(monkeypatch):
    images, _, params = _chain_inputs(16, 3, 2, 20, 20, seed=25)
    images, params = images.cuda(), params[:3].cuda()
    config = _chain_config(16)
    out = triton_augment.augment_patches(
        images, torch.tensor([-2, 9, 1], device="cuda"), params, config, torch.float32, False
    )
    clamped = triton_augment.augment_patches(
        images, torch.tensor([0, 2, 1], device="cuda"), params, config, torch.float32, False
    )
    assert torch.equal(out, clamped)
    monkeypatch.setenv(triton_augment.DEBUG_CHECKS_ENV, "1")
    with pytest.raises(IndexError, match="source_index"):
        triton_augment.augment_patches(
            images, torch.tensor([-2, 9, 1], device="cuda"), params, config, torch.float32, False
        )
