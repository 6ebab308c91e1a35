"""Every fast augmentation backend (cpu C++, triton, cuda) against the reference applier on the
same parameters: each op alone, full random chains, every output dtype and layout, NHWC and
NCHW inputs, downscaling crops, odd sizes.

Accuracy contract: float32 output within 2e-5 of the reference (after normalisation); bf16 /
fp16 output equal to the reference rounded to that dtype except near rounding ties (fewer than
0.1% of the values, each within one unit of that dtype). Solarize is a step at the threshold:
a value that lands within 1e-5 of it may fall on either side in two correct implementations
(uint8 levels resampled by weights that sum to 1 up to rounding land exactly there), so such
flips are allowed, counted, and must stay rare.
"""

import dataclasses

import pytest
import torch
from solarize_ties import solarize_ties, unnormalise

from empssl import backends
from empssl.augment import params as AP
from empssl.augment.config import AugmentConfig
from empssl.augment.multipatch import MultiPatchAugment, sample_augment_params
from empssl.ops import augment as augment_op

FLOAT32_TOLERANCE = 2e-5
MAX_TIE_FRACTION = 1e-3


# "triton-cuda": the triton backend on CUDA tensors (compiled kernels); "triton" runs the
# interpreter on CPU tensors
def _device_for(backend):
    return torch.device("cuda" if backend in ("cuda", "triton-cuda") else "cpu")


def _backend_name(backend):
    return "triton" if backend == "triton-cuda" else backend


BACKEND_PARAMS = [
    pytest.param("cpu", id="cpu"),
    pytest.param("triton", id="triton"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    pytest.param("triton-cuda", id="triton-cuda", marks=pytest.mark.gpu),
]


def _require(backend, images_nhwc, source_index, params, config):
    backend = _backend_name(backend)
    why = backends.reasons("augment", images_nhwc.device, images_nhwc, source_index, params, config)[backend]
    if why is not None:
        pytest.skip(f"{backend} backend unavailable: {why}")


def _images(num, height, width, generator, device, layout="nhwc"):
    images = torch.randint(0, 256, (num, height, width, 3), dtype=torch.uint8, generator=generator)
    # flat regions as in real images (equal neighbours exercise exact ties in hue and solarize)
    images[:, : height // 4, : width // 4] = 128
    images = images.to(device)
    return images.permute(0, 3, 1, 2).contiguous() if layout == "nchw" else images


def _sampled(config, images, num_patches, generator):
    nhwc = images if images.shape[-1] == 3 else images.permute(0, 2, 3, 1)
    num, height, width, _ = nhwc.shape
    source_index, params = sample_augment_params(config, num, num_patches, height, width, generator=generator)
    return source_index.to(images.device), params.to(images.device)


def assert_matches_reference(out, ref, params, config, out_dtype, channels_last):
    """The accuracy contract of the module docstring; returns the number of solarize ties."""
    assert out.dtype == out_dtype
    assert out.shape == ref.shape
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    assert out.is_contiguous(memory_format=memory_format)
    # 2e-5 is the contract for std = 0.5; a smaller std magnifies the [0, 1] errors by 0.5 / std
    tolerance = FLOAT32_TOLERANCE * (0.5 / torch.tensor(config.std, device=ref.device)).clamp(min=1.0).view(1, 3, 1, 1)
    ties = solarize_ties(out, ref, params, config)
    # flat source regions at level 128 resample to within an ulp of the threshold, all together
    assert ties.sum().item() <= 0.01 * ref.numel(), "solarize ties are not rare"
    out32 = out.float()
    if out_dtype == torch.float32:
        error = torch.where(ties, 0.0, (out32 - ref).abs())
        assert (error <= tolerance).all(), f"max abs error {error.max().item():.3g}"
        return int(ties.sum())
    rounded = ref.to(out_dtype)
    mismatch = (out != rounded) & ~ties
    # the contract is a tie RATE below MAX_TIE_FRACTION; a small sample (the interpreted Triton
    # cases have ~5000 values, i.e. ~5 ties allowed) is judged with a 4-sigma Poisson margin
    allowed = MAX_TIE_FRACTION * ref.numel()
    assert mismatch.sum().item() <= allowed + 4 * allowed**0.5, (
        f"{mismatch.sum().item()} of {ref.numel()} values differ"
    )
    # each mismatch is a rounding tie: the rounding (at most half a unit of the dtype) of a float32
    # value within the float32 tolerance of the reference
    half_unit = 0.5 * torch.finfo(out_dtype).eps * ref.abs()
    gap = torch.where(mismatch & torch.isfinite(out32), (out32 - ref).abs(), 0.0)
    assert (gap <= half_unit * 1.001 + tolerance).all()
    assert torch.equal(torch.isinf(out32), torch.isinf(rounded.float()))
    return int(ties.sum())


def _run(backend, images, source_index, params, config, out_dtype=torch.float32, channels_last=False):
    nhwc = images if images.shape[-1] == 3 else images.permute(0, 2, 3, 1)
    _require(backend, nhwc, source_index, params, config)
    fast = MultiPatchAugment(config, backend=_backend_name(backend), out_dtype=out_dtype, channels_last=channels_last)
    out = fast.apply(images, source_index, params)
    ref = MultiPatchAugment(config, backend="reference").apply(images, source_index, params)
    return out, ref


def _patches_for(backend):
    return 4 if backend == "triton" else 96  # the interpreter is slow


def _chain_patches_for(backend):
    # enough values (about 1e6) that the fp16 tie fraction (about 0.08%) is measured to +-0.005%
    return 4 if backend == "triton" else 300


# ---- each op alone --------------------------------------------------------------------------

NO_JITTER = dict(brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)


def _only(op, params, config):
    """Params with every random step off except ``op``, and the config whose strengths select it."""
    params = params.clone()
    for column in (AP.FLIP, AP.JITTER, AP.GRAYSCALE, AP.BLUR_SIGMA, AP.SOLARIZE):
        params[:, column] = 0.0
    if op == "crop":
        return params, config
    if op in ("flip", "grayscale", "solarize"):
        params[:, {"flip": AP.FLIP, "grayscale": AP.GRAYSCALE, "solarize": AP.SOLARIZE}[op]] = 1.0
        return params, config
    if op == "blur":
        params[:, AP.BLUR_SIGMA] = 0.1 + 1.9 * torch.rand(params.shape[0], device=params.device)
        return params, config
    params[:, AP.JITTER] = 1.0
    strengths = dict(NO_JITTER, **{op: getattr(config, op)})
    return params, dataclasses.replace(config, **strengths)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize(
    "op", ["crop", "flip", "brightness", "contrast", "saturation", "hue", "grayscale", "blur", "solarize"]
)
def test_each_op_alone(backend, op):
    generator = torch.Generator().manual_seed(sum(map(ord, op)))
    device = _device_for(backend)
    config = AugmentConfig.cifar()
    images = _images(12, 32, 32, generator, device)
    source_index, params = _sampled(config, images, _patches_for(backend) // 12 + 1, generator)
    params, config = _only(op, params, config)
    out, ref = _run(backend, images, source_index, params, config)
    assert_matches_reference(out, ref, params, config, torch.float32, False)
    # the op did something: the patches differ from those of the plain resized crop
    if op != "crop":
        plain, _ = _only("crop", params, config)
        baseline = MultiPatchAugment(config, backend="reference").apply(images, source_index, plain)
        assert (ref - baseline).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_solarize_threshold_on_exact_levels(backend):
    """Identity crops keep every uint8 level exact, 127 and 128 included: x >= 128/255 in float32
    must solarize exactly as the reference does (no tie allowed here)."""
    device = _device_for(backend)
    config = AugmentConfig.cifar()
    levels = torch.arange(32 * 32 * 3) % 256
    images = levels.view(1, 32, 32, 3).to(torch.uint8).repeat(2, 1, 1, 1).to(device)
    source_index, params = _sampled(config, images, 2, torch.Generator().manual_seed(0))
    params, config = _only("solarize", params, config)
    params[:, AP.CROP_TOP : AP.CROP_WIDTH + 1] = torch.tensor([0.0, 0.0, 32.0, 32.0], device=device)
    out, ref = _run(backend, images, source_index, params, config)
    assert torch.equal(out, ref)
    solarized_128 = ref[unnormalise(ref, config) == 1 - torch.tensor(128 / 255, dtype=torch.float32)]
    assert solarized_128.numel() > 0  # level 128 was solarized


# ---- full random chains over dtypes and layouts ---------------------------------------------

DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}
# every (dtype, output layout, input layout) for the compiled backends; under the Triton
# interpreter (seconds per patch) a covering subset: each dtype, each layout at least once
CHAIN_CASES = [
    pytest.param(
        backend,
        DTYPES[dtype],
        channels_last,
        layout,
        id=f"{backend}-{dtype}-{'cl' if channels_last else 'nchw'}_out-{layout}",
        marks=[pytest.mark.gpu] if backend in ("cuda", "triton-cuda") else [],
    )
    for backend in ("cpu", "cuda", "triton-cuda")
    for dtype in DTYPES
    for channels_last in (False, True)
    for layout in ("nhwc", "nchw")
] + [
    pytest.param(
        "triton",
        DTYPES[dtype],
        channels_last,
        layout,
        id=f"triton-{dtype}-{'cl' if channels_last else 'nchw'}_out-{layout}",
    )
    for dtype, channels_last, layout in (("f32", False, "nhwc"), ("bf16", True, "nchw"), ("f16", False, "nchw"))
]


@pytest.mark.parametrize("backend, out_dtype, channels_last, input_layout", CHAIN_CASES)
def test_random_chains(backend, out_dtype, channels_last, input_layout):
    generator = torch.Generator().manual_seed(1234 + 7 * int(channels_last) + (input_layout == "nchw"))
    device = _device_for(backend)
    # steps more frequent than in the recipe, so that the chains mix all of them; blur keeps the
    # recipe's 0.1: its Gaussian weights differ from torch's (vectorised exp, reduction order) in
    # the last float32 bit, which alone flips fp16 roundings of about 0.4% of a blurred patch
    config = AugmentConfig(jitter_p=0.9, grayscale_p=0.3, blur_p=0.1, solarize_p=0.4)
    num_images = 2 if backend == "triton" else 10
    images = _images(num_images, 32, 32, generator, device, input_layout)
    source_index, params = _sampled(config, images, _chain_patches_for(backend) // num_images, generator)
    out, ref = _run(backend, images, source_index, params, config, out_dtype, channels_last)
    assert_matches_reference(out, ref, params, config, out_dtype, channels_last)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_downscaling_crops(backend):
    """64x64 sources, crops of 35..64 pixels resized to 16: the antialiased (widened) filter."""
    generator = torch.Generator().manual_seed(99)
    device = _device_for(backend)
    config = AugmentConfig(output_size=16, crop_scale=(0.3, 1.0), crop_ratio=(3 / 4, 4 / 3), blur_p=0.3, solarize_p=0.3)
    images = _images(6, 64, 64, generator, device)
    source_index, params = _sampled(config, images, _patches_for(backend) // 6 + 1, generator)
    assert (params[:, AP.CROP_HEIGHT] > 16).all() and (params[:, AP.CROP_WIDTH] > 16).all()
    out, ref = _run(backend, images, source_index, params, config)
    assert_matches_reference(out, ref, params, config, torch.float32, False)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
def test_odd_sizes(backend):
    """Non-square 37x29 sources, 19-pixel patches (lane tails), kernel 9, non-default mean/std."""
    generator = torch.Generator().manual_seed(5)
    device = _device_for(backend)
    config = AugmentConfig(
        output_size=19,
        crop_scale=(0.1, 0.9),
        crop_ratio=(0.5, 2.0),
        blur_p=0.5,
        blur_kernel_size=9,
        mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225),
    )
    images = _images(5, 37, 29, generator, device)
    source_index, params = _sampled(config, images, _patches_for(backend) // 5 + 1, generator)
    out, ref = _run(backend, images, source_index, params, config, torch.bfloat16, True)
    assert_matches_reference(out, ref, params, config, torch.bfloat16, True)


@pytest.mark.parametrize("backend", BACKEND_PARAMS)
@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_low_precision_extremes(backend, out_dtype):
    """Normalisation to huge and tiny magnitudes: fp16 overflow to inf and subnormals, bf16 rounding."""
    generator = torch.Generator().manual_seed(17)
    device = _device_for(backend)
    config = AugmentConfig(mean=(0.0, 0.0, 0.5), std=(1e-5, 1e4, 1.0))
    images = _images(4, 32, 32, generator, device)
    source_index, params = _sampled(config, images, _patches_for(backend) // 4 + 1, generator)
    out, ref = _run(backend, images, source_index, params, config, out_dtype)
    if out_dtype == torch.float16:
        assert torch.isinf(ref.to(out_dtype)[:, 0]).any() and (ref.to(out_dtype)[:, 1].abs() < 6.1e-5).any()
    assert_matches_reference(out, ref, params, config, out_dtype, False)


@pytest.mark.gpu
def test_cuda_large_patches_two_pass():
    """224-pixel patches: tiles with blur halos and the two-launch contrast mean."""
    generator = torch.Generator().manual_seed(3)
    config = dataclasses.replace(AugmentConfig.imagenet(), blur_p=0.5, solarize_p=0.3)
    images = _images(3, 256, 256, generator, torch.device("cuda"))
    source_index, params = _sampled(config, images, 3, generator)
    out, ref = _run("cuda", images, source_index, params, config)
    assert_matches_reference(out, ref, params, config, torch.float32, False)


# ---- the extension op itself -------------------------------------------------------------------


def _extension_op_inputs(device="cpu"):
    config = AugmentConfig.cifar()
    generator = torch.Generator().manual_seed(0)
    images = _images(3, 32, 32, generator, device)
    source_index, params = _sampled(config, images, 2, generator)
    return config, images, source_index, params


def test_extension_op_schema_and_fake():
    config, images, source_index, params = _extension_op_inputs()
    reason = augment_op.cpu_reason(torch.device("cpu"), images, source_index, params, config)
    if reason:
        pytest.skip(reason)
    args = (
        images,
        source_index,
        params,
        32,
        13,
        config.solarize_threshold,
        list(config.mean),
        list(config.std),
        config.jitter_op_mask(),
        torch.bfloat16,
        True,
    )
    torch.library.opcheck(torch.ops.empssl.augment_patches.default, args, test_utils=("test_schema", "test_faketensor"))


def test_triton_op_fake():
    config, images, source_index, params = _extension_op_inputs()
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode() as mode:
        fake = augment_op.augment_patches_triton(
            mode.from_tensor(images),
            mode.from_tensor(source_index),
            mode.from_tensor(params),
            32,
            13,
            0.5,
            [0.5] * 3,
            [0.5] * 3,
            15,
            torch.float16,
            True,
        )
    assert fake.shape == (params.shape[0], 3, 32, 32) and fake.dtype == torch.float16
    assert fake.is_contiguous(memory_format=torch.channels_last)


def test_extension_op_rejects_bad_input_before_launch():
    config, images, source_index, params = _extension_op_inputs()
    if augment_op.cpu_reason(torch.device("cpu"), images, source_index, params, config):
        pytest.skip("extension not built")
    good = dict(output_size=32, blur_kernel_size=13)

    def call(
        images=images,
        source_index=source_index,
        params=params,
        output_size=32,
        blur_kernel_size=13,
        out_dtype=torch.float32,
    ):
        return torch.ops.empssl.augment_patches(
            images, source_index, params, output_size, blur_kernel_size, 0.5, [0.5] * 3, [0.5] * 3, 15, out_dtype, False
        )

    assert call(**good).shape == (params.shape[0], 3, 32, 32)
    with pytest.raises(RuntimeError, match="uint8"):
        call(images=images.float())
    with pytest.raises(RuntimeError, match="params"):
        call(params=params[:, :5])
    with pytest.raises(RuntimeError, match="rows"):
        call(source_index=source_index[:-1])
    with pytest.raises(RuntimeError, match="odd"):
        call(blur_kernel_size=12)
    with pytest.raises(RuntimeError, match="reflect"):
        call(output_size=6)
    with pytest.raises(RuntimeError, match="out_dtype"):
        call(out_dtype=torch.float64)
    # the CPU op checks source_index's range itself (the CUDA kernel clamps it: no host sync)
    for bad in (images.shape[0], -1):
        with pytest.raises(RuntimeError, match=r"source_index must be in \[0, 3\)"):
            call(source_index=torch.full_like(source_index, bad))


@pytest.mark.gpu
def test_cuda_op_clamps_source_index_out_of_range():
    config, images, source_index, params = _extension_op_inputs("cuda")
    if augment_op.cuda_reason(images.device, images, source_index, params, config):
        pytest.skip("needs a CUDA GPU: the CUDA extension is not built")

    def call(index):
        return torch.ops.empssl.augment_patches(
            images, index, params, 32, 13, 0.5, [0.5] * 3, [0.5] * 3, 15, torch.float32, False
        )

    out_of_range = torch.tensor([-5, images.shape[0] + 2], device="cuda")
    assert torch.equal(call(out_of_range), call(torch.tensor([0, images.shape[0] - 1], device="cuda")))


def test_backend_check_states_the_limit():
    """A recipe whose blur kernel is too wide for the patch: the cpu backend says why, before any launch."""
    config = AugmentConfig(output_size=6, blur_p=0.0, blur_kernel_size=13)
    images = torch.zeros(2, 8, 8, 3, dtype=torch.uint8)
    source_index, params = sample_augment_params(config, 2, 2, 8, 8)
    reason = augment_op.cpu_reason(torch.device("cpu"), images, source_index, params, config)
    assert reason is not None and "blur_kernel_size" in reason
    with pytest.raises(backends.BackendUnavailableError, match="blur_kernel_size"):
        MultiPatchAugment(config, backend="cpu").apply(images, source_index, params)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_cpu_vector_builds_agree_bitwise(monkeypatch, out_dtype, channels_last):
    """The CPU kernel is compiled for AVX-512, AVX2 and baseline x86-64 and picks one at run time
    (EMPSSL_AUGMENT_ISA caps it): whichever a machine gets, the patches are the same bits."""
    generator = torch.Generator().manual_seed(4321)
    config = AugmentConfig(output_size=24, crop_scale=(0.2, 1.0), crop_ratio=(3 / 4, 4 / 3), blur_p=0.5, solarize_p=0.3)
    images = _images(8, 40, 40, generator, torch.device("cpu"))
    source_index, params = _sampled(config, images, 12, generator)
    _require("cpu", images, source_index, params, config)
    augment = MultiPatchAugment(config, backend="cpu", out_dtype=out_dtype, channels_last=channels_last)
    outputs = {}
    for isa in ("baseline", "avx2", "native"):
        monkeypatch.setenv("EMPSSL_AUGMENT_ISA", isa)
        outputs[isa] = augment.apply(images, source_index, params)
    for isa in ("avx2", "native"):
        # compare bit patterns (torch.equal on floats would pass -0.0 == 0.0)
        assert torch.equal(outputs["baseline"].float().view(torch.int32), outputs[isa].float().view(torch.int32)), isa
