"""The public augmentation API: AugmentConfig, MultiPatchAugment (layouts, patch-major order,
dtypes, memory format, dispatch) and its input validation."""

import dataclasses

import pytest
import torch

import empssl
from empssl.augment import params as AP
from empssl.augment.config import AugmentConfig
from empssl.augment.multipatch import MultiPatchAugment, sample_augment_params
from empssl.backends import BackendUnavailableError
from empssl.ops import augment as augment_op
from empssl.reference import augment as ref

# every colour op off, no normalisation: a constant image stays its colour
NO_COLOUR = AugmentConfig(
    output_size=8, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, solarize_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0)
)


def _images(batch=3, height=20, width=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, height, width, 3), generator=g, dtype=torch.uint8)


# ---------------------------------------------------------------- recipes


def test_recipes_follow_spec_section_4():
    cifar, tiny, imagenet = AugmentConfig.cifar(), AugmentConfig.tinyimagenet(), AugmentConfig.imagenet()
    assert (cifar.output_size, cifar.crop_scale, cifar.crop_ratio) == (32, (0.25, 0.25), (1.0, 1.0))
    assert (tiny.output_size, tiny.crop_scale, tiny.crop_ratio) == (64, (0.25, 0.25), (1.0, 1.0))
    assert (imagenet.output_size, imagenet.crop_scale, imagenet.crop_ratio) == (224, (0.25, 0.25), (3 / 4, 4 / 3))
    for config in (cifar, tiny, imagenet):
        assert (config.flip_p, config.jitter_p, config.grayscale_p, config.blur_p, config.solarize_p) == (
            0.5,
            0.8,
            0.2,
            0.1,
            0.1,
        )
        assert (config.brightness, config.contrast, config.saturation, config.hue) == (0.4, 0.4, 0.4, 0.2)
        assert config.blur_sigma == (0.1, 2.0) and config.blur_kernel_size == 13
        assert config.solarize_threshold == 128 / 255
        assert config.mean == (0.5, 0.5, 0.5) and config.std == (0.5, 0.5, 0.5)


def test_config_is_frozen_and_hashable_with_lists_turned_into_tuples():
    config = AugmentConfig(crop_scale=[0.2, 0.5], mean=[0.1, 0.2, 0.3])
    assert config.crop_scale == (0.2, 0.5) and config.mean == (0.1, 0.2, 0.3)
    assert hash(config) == hash(AugmentConfig(crop_scale=(0.2, 0.5), mean=(0.1, 0.2, 0.3)))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.flip_p = 0.0


@pytest.mark.parametrize(
    "field, value",
    [
        ("output_size", 0),
        ("output_size", 32.0),
        ("crop_scale", (0.5, 0.25)),
        ("crop_scale", (0.0, 0.5)),
        ("crop_ratio", (1.0,)),
        ("crop_ratio", (-1.0, 1.0)),
        ("flip_p", 1.5),
        ("jitter_p", -0.1),
        ("grayscale_p", float("nan")),
        ("blur_p", "0.1"),
        ("solarize_p", 2),
        ("brightness", -0.4),
        ("contrast", float("inf")),
        ("saturation", None),
        ("hue", 0.6),
        ("blur_sigma", (2.0, 0.1)),
        ("blur_kernel_size", 12),
        ("blur_kernel_size", 0),
        ("solarize_threshold", 1.5),
        ("mean", (0.5, 0.5)),
        ("std", (0.5, 0.0, 0.5)),
    ],
)
def test_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        AugmentConfig(**{field: value})


def test_config_rejects_a_blur_kernel_too_large_for_the_patch():
    with pytest.raises(ValueError, match="blur_kernel_size"):
        AugmentConfig(output_size=6, blur_kernel_size=13)
    AugmentConfig(output_size=6, blur_kernel_size=13, blur_p=0.0)  # no blur: no constraint


# ---------------------------------------------------------------- shapes and order


def test_output_is_patch_major():
    colours = torch.tensor([[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 120, 230]], dtype=torch.uint8)
    images = colours.view(4, 1, 1, 3).expand(4, 20, 24, 3).contiguous()
    augment = MultiPatchAugment(NO_COLOUR)
    patches = augment(images, 5, generator=torch.Generator().manual_seed(0))
    assert patches.shape == (5 * 4, 3, 8, 8) and patches.dtype == torch.float32
    expected = (colours.float() / 255)[torch.arange(20) % 4].view(20, 3, 1, 1).expand(20, 3, 8, 8)
    torch.testing.assert_close(patches, expected, rtol=0, atol=1e-6)


def test_nhwc_and_nchw_inputs_give_identical_patches():
    images = _images()
    augment = MultiPatchAugment(AugmentConfig(output_size=16))
    source_index, params = augment.sample(images, 4, generator=torch.Generator().manual_seed(1))
    from_nhwc = augment.apply(images, source_index, params)
    nchw = images.permute(0, 3, 1, 2).contiguous()
    assert torch.equal(augment.apply(nchw, source_index, params), from_nhwc)
    # any strides: a channels_last NCHW tensor and a strided view of a bigger batch
    assert torch.equal(
        augment.apply(nchw.contiguous(memory_format=torch.channels_last), source_index, params), from_nhwc
    )
    bigger = torch.zeros(6, 20, 24, 3, dtype=torch.uint8)
    bigger[::2] = images
    assert torch.equal(augment.apply(bigger[::2], source_index, params), from_nhwc)
    # sampling from either layout sees the same image size
    same = augment.sample(nchw, 4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(same[0], source_index) and torch.equal(same[1], params)


def test_a_batch_with_3_in_dimensions_1_and_3_is_refused_and_its_permutation_read():
    images = torch.randint(0, 256, (2, 3, 30, 3), dtype=torch.uint8)  # both dim 1 and dim 3 have size 3
    augment = MultiPatchAugment(AugmentConfig(output_size=4, blur_p=0.0))
    with pytest.raises(ValueError, match=r"ambiguous: as \(B, 3, H, W\) they are 2 images of 30x3 pixels"):
        augment.sample(images, 50, generator=torch.Generator().manual_seed(2))
    images = images.permute(0, 2, 3, 1)  # the (B, 3, H, W) reading, said with the layout: 30x3 images
    _, params = augment.sample(images, 50, generator=torch.Generator().manual_seed(2))
    assert (params[:, AP.CROP_TOP] + params[:, AP.CROP_HEIGHT] <= 30).all()
    assert (params[:, AP.CROP_LEFT] + params[:, AP.CROP_WIDTH] <= 3).all()
    # a 16x16-area square crop cannot fit: torchvision's centre-crop fallback, a 3x3 box halfway down a 30-high image
    assert (params[:, AP.CROP_TOP] == 13).all() and (params[:, AP.CROP_LEFT] == 0).all()


def test_call_is_sample_then_apply_and_reproducible():
    images = _images()
    augment = MultiPatchAugment(AugmentConfig(output_size=16))
    patches = augment(images, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(augment(images, 3, generator=torch.Generator().manual_seed(4)), patches)
    source_index, params = augment.sample(images, 3, generator=torch.Generator().manual_seed(4))
    assert torch.equal(augment.apply(images, source_index, params), patches)
    assert not torch.equal(augment(images, 3, generator=torch.Generator().manual_seed(5)), patches)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_output_dtype_and_memory_format(out_dtype, channels_last):
    images = _images()
    config = AugmentConfig(output_size=16)
    source_index, params = sample_augment_params(config, 3, 2, 20, 24, generator=torch.Generator().manual_seed(6))
    reference = MultiPatchAugment(config, backend="reference").apply(images, source_index, params)
    augment = MultiPatchAugment(config, backend="reference", out_dtype=out_dtype, channels_last=channels_last)
    patches = augment.apply(images, source_index, params)
    assert patches.dtype == out_dtype and patches.shape == (6, 3, 16, 16)
    assert patches.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if channels_last:
        assert not patches.is_contiguous()
    assert torch.equal(patches, reference.to(out_dtype))  # computed in float32, cast once at the end


def test_auto_backend_matches_the_reference():
    images = _images()
    config = AugmentConfig(output_size=16)
    source_index, params = sample_augment_params(config, 3, 4, 20, 24, generator=torch.Generator().manual_seed(7))
    expected = ref.apply_augment(images, source_index, params, config)
    patches = MultiPatchAugment(config, backend="auto").apply(images, source_index, params)
    torch.testing.assert_close(patches, expected, rtol=0, atol=1e-5)


def test_public_exports():
    assert empssl.MultiPatchAugment is MultiPatchAugment
    assert empssl.AugmentConfig is AugmentConfig
    assert empssl.sample_augment_params is sample_augment_params


# ---------------------------------------------------------------- nn.Module behaviour


def test_module_moves_with_to_float_and_inside_a_parent():
    # nn.Module.to / .float / .cuda all go through Module._apply(fn); an override with another
    # signature made every one of them raise TypeError.
    images = _images()
    augment = MultiPatchAugment(AugmentConfig(output_size=16), backend="reference")
    expected = augment(images, 3, generator=torch.Generator().manual_seed(10))
    assert augment.to("cpu") is augment and augment.to(torch.float64) is augment
    assert augment.float() is augment and augment.half() is augment and augment.to("meta") is augment
    assert augment.out_dtype == torch.float32  # a setting of the output, not a parameter: .half() leaves it
    parent = torch.nn.ModuleDict({"augment": augment, "head": torch.nn.Linear(4, 2)})
    parent.to(torch.float64)
    assert parent["head"].weight.dtype == torch.float64
    parent.to("meta")
    assert parent["head"].weight.device.type == "meta"
    assert torch.equal(parent["augment"](images, 3, generator=torch.Generator().manual_seed(10)), expected)


@pytest.mark.gpu
def test_module_moves_with_cuda():
    parent = torch.nn.Sequential(torch.nn.Linear(4, 2))
    parent.add_module("augment", MultiPatchAugment(AugmentConfig(output_size=16)))
    parent.cuda()
    assert parent[0].weight.is_cuda
    images = _images().cuda()
    assert parent.augment(images, 2, generator=torch.Generator(device="cuda").manual_seed(0)).is_cuda


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "images, error, match",
    [
        (_images().numpy(), TypeError, "torch.Tensor"),
        (_images().float(), TypeError, "uint8"),
        (_images()[0], ValueError, "shape"),
        (torch.zeros(2, 20, 24, 4, dtype=torch.uint8), ValueError, "3 colour channels"),
        (torch.zeros(2, 1, 20, 24, dtype=torch.uint8), ValueError, "3 colour channels"),
        (torch.zeros(0, 20, 24, 3, dtype=torch.uint8), ValueError, "empty"),
    ],
)
def test_bad_images_are_rejected(images, error, match):
    augment = MultiPatchAugment(NO_COLOUR)
    with pytest.raises(error, match=match):
        augment(images, 2)
    with pytest.raises(error, match=match):
        augment.sample(images, 2)


@pytest.mark.parametrize(
    "num_patches, error", [(0, ValueError), (-3, ValueError), (2.0, TypeError), (True, TypeError), ("2", TypeError)]
)
def test_bad_num_patches_is_rejected(num_patches, error):
    with pytest.raises(error, match="num_patches"):
        MultiPatchAugment(NO_COLOUR)(_images(), num_patches)


def test_generator_on_another_device_is_rejected():
    images = torch.zeros(2, 20, 24, 3, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="generator"):
        MultiPatchAugment(NO_COLOUR)(images, 2, generator=torch.Generator())
    with pytest.raises(TypeError, match="generator"):
        MultiPatchAugment(NO_COLOUR)(_images(), 2, generator=0)


def _valid_params(count=6):
    return sample_augment_params(NO_COLOUR, 3, count // 3, 20, 24, generator=torch.Generator().manual_seed(8))


def _with(params, column, value, row=4):
    params = params.clone()
    params[row, column] = value
    return params


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda i, p: (i.clone().index_fill_(0, torch.tensor([2]), 3), p), ValueError, "source_index out of range"),
        (lambda i, p: (i.clone().index_fill_(0, torch.tensor([2]), -1), p), ValueError, "source_index out of range"),
        (lambda i, p: (i.int(), p), ValueError, "int64"),
        (lambda i, p: (i.tolist(), p), TypeError, "source_index must be a torch.Tensor"),
        (lambda i, p: (i, p.double()), TypeError, "float32"),
        (lambda i, p: (i, p[:, :-1]), ValueError, "shape"),
        (lambda i, p: (i, p[:-1]), ValueError, "shape"),
        (lambda i, p: (i, _with(p, AP.CROP_TOP, 19)), ValueError, "crop box outside"),
        (lambda i, p: (i, _with(p, AP.CROP_LEFT, -1)), ValueError, "crop box outside"),
        (lambda i, p: (i, _with(p, AP.CROP_WIDTH, 25)), ValueError, "crop box outside"),
        (lambda i, p: (i, _with(p, AP.CROP_HEIGHT, 0)), ValueError, "crop box outside"),
        (lambda i, p: (i, _with(p, AP.CROP_HEIGHT, 2.5)), ValueError, "integer"),
        (lambda i, p: (i, _with(p, AP.FLIP, 0.5)), ValueError, "flags"),
        (lambda i, p: (i, _with(p, AP.ORDER_2, p[4, AP.ORDER_1].item())), ValueError, "permutation"),
        (lambda i, p: (i, _with(p, AP.BLUR_SIGMA, float("nan"))), ValueError, "BLUR_SIGMA"),
        (lambda i, p: (i, _with(p, AP.HUE, 0.7)), ValueError, "hue"),
        (lambda i, p: (i, _with(p, AP.CONTRAST, -0.1)), ValueError, "factor"),
    ],
)
def test_bad_parameters_are_rejected_before_applying(change, error, match, monkeypatch):
    def must_not_run(*args):
        raise AssertionError("the backend ran on invalid parameters")

    monkeypatch.setattr(augment_op.BACKENDS["reference"], "run", must_not_run)
    source_index, params = change(*_valid_params())
    with pytest.raises(error, match=match) as raised:
        MultiPatchAugment(NO_COLOUR, backend="reference").apply(_images(), source_index, params)
    if "box" in match or "flags" in match or "permutation" in match:
        assert "first bad patch is 4" in str(raised.value)


def test_unknown_backend_and_bad_options_are_rejected():
    with pytest.raises(ValueError, match="unknown backend"):
        MultiPatchAugment(NO_COLOUR, backend="fastest")
    with pytest.raises(ValueError, match="out_dtype"):
        MultiPatchAugment(NO_COLOUR, out_dtype=torch.float64)
    with pytest.raises(TypeError, match="config"):
        MultiPatchAugment({"output_size": 8})


def test_cuda_backend_on_cpu_tensors_says_why_not():
    augment = MultiPatchAugment(NO_COLOUR, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="cuda"):
        augment(_images(), 2)


@pytest.mark.gpu
def test_reference_on_cuda_matches_cpu():
    config = AugmentConfig.cifar()
    images = _images(4, 32, 32)
    source_index, params = sample_augment_params(config, 4, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    cpu = ref.apply_augment(images, source_index, params, config)
    gpu = ref.apply_augment(images.cuda(), source_index.cuda(), params.cuda(), config)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=0, atol=1e-5)
    g = torch.Generator(device="cuda").manual_seed(0)
    patches = MultiPatchAugment(config)(images.cuda(), 5, generator=g)
    assert patches.shape == (20, 3, 32, 32) and patches.device.type == "cuda"
