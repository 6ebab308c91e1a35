"""The reference augmentation against torchvision.transforms.v2.functional, op by op and as whole chains.

torchvision runs on float64 images (its hue op computes in float32 internally, whatever the
input dtype); the reference runs in float32. Every comparison asserts max abs error <= 1e-5.
Run with ``-s`` to see the measured errors.
"""

import pytest
import torch
import torchvision.transforms.v2.functional as TF

from empssl.augment import params as AP
from empssl.augment.config import AugmentConfig
from empssl.augment.multipatch import sample_augment_params
from empssl.reference import augment as ref

TOL = 1e-5


def _report(name, error):
    print(f"\n[reference vs torchvision] {name}: max abs error {error:.3e}")
    assert error <= TOL, f"{name}: max abs error {error:.3e} > {TOL}"


def _random_patches(count, size, seed):
    """Float patches (count, 3, size, size) in [0, 1] on the uint8 grid, as float32 and float64."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (count, 3, size, size), generator=g, dtype=torch.uint8)
    return x.float() / 255, x.double() / 255


def _smooth_patches(count, size, seed):
    """Float patches with continuous values (as after a resize), float32 and the same values in float64."""
    g = torch.Generator().manual_seed(seed)
    x32 = torch.rand(count, 3, size, size, generator=g)
    return x32, x32.double()


def _factors(count, low, high, seed):
    g = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(count, generator=g)


# ---------------------------------------------------------------- resized crop


@pytest.mark.parametrize(
    "image_hw, box, size",
    [
        ((72, 80), (5, 9, 64, 64), 32),  # downscale by 2 (antialiased)
        ((72, 80), (0, 0, 72, 80), 24),  # whole non-square image, downscale by 3 and 3.33
        ((32, 32), (7, 3, 16, 16), 32),  # CIFAR recipe: upscale by 2
        ((40, 56), (11, 30, 23, 13), 32),  # non-square crop, upscale by 1.39 and 2.46, touching the right edge
        ((40, 56), (1, 2, 37, 47), 29),  # odd sizes, downscale by 1.28 and 1.62
        ((32, 32), (3, 5, 20, 20), 20),  # same size: identity
    ],
)
def test_resized_crop_matches_torchvision_antialias(image_hw, box, size):
    height, width = image_hw
    top, left, h, w = box
    g = torch.Generator().manual_seed(hash(box) % 2**31)
    images = torch.randint(0, 256, (3, height, width, 3), generator=g, dtype=torch.uint8)
    params = torch.zeros(3, AP.NUM_PARAMS)
    params[:, [AP.CROP_TOP, AP.CROP_LEFT, AP.CROP_HEIGHT, AP.CROP_WIDTH]] = torch.tensor(
        [top, left, h, w], dtype=torch.float32
    )
    ours = ref.resized_crop(images.float() / 255, params, size)
    expected = TF.resized_crop(images.permute(0, 3, 1, 2).double() / 255, top, left, h, w, [size, size], antialias=True)
    _report(f"resized_crop {h}x{w} -> {size}", (ours.double() - expected).abs().max().item())


def test_resize_weights_are_a_partition_of_unity_inside_the_crop():
    crop_start = torch.tensor([0.0, 5.0, 17.0])
    crop_len = torch.tensor([48.0, 16.0, 7.0])
    weights = ref.resize_weights(48, 32, crop_start, crop_len)
    assert weights.shape == (3, 32, 48)
    assert (weights >= 0).all()
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 32, dtype=torch.float64), rtol=0, atol=1e-12)
    index = torch.arange(48, dtype=torch.float64)
    outside = (index < crop_start.view(-1, 1)) | (index >= (crop_start + crop_len).view(-1, 1))
    assert (weights.masked_select(outside.unsqueeze(1).expand_as(weights)) == 0).all()
    # an integer upscale by 2 samples the crop at its half-pixel centres: rows 0 and 31 copy the edge pixels
    assert weights[1, 0, 5] == 1 and weights[1, 31, 20] == 1


# ---------------------------------------------------------------- single ops


def test_horizontal_flip_matches_torchvision():
    x32, x64 = _random_patches(4, 9, seed=1)
    params = torch.zeros(4, AP.NUM_PARAMS)
    params[:, AP.FLIP] = torch.tensor([1.0, 0.0, 1.0, 0.0])
    ours = torch.where((params[:, AP.FLIP] == 1).view(-1, 1, 1, 1), x32.flip(-1), x32)
    expected = torch.stack([TF.horizontal_flip(x) if f else x for x, f in zip(x64, params[:, AP.FLIP])])
    _report("horizontal_flip", (ours.double() - expected).abs().max().item())


@pytest.mark.parametrize(
    "name, ours_fn, torchvision_fn, low, high",
    [
        ("adjust_brightness", ref.adjust_brightness, TF.adjust_brightness, 0.6, 1.4),
        ("adjust_contrast", ref.adjust_contrast, TF.adjust_contrast, 0.6, 1.4),
        ("adjust_saturation", ref.adjust_saturation, TF.adjust_saturation, 0.6, 1.4),
        ("adjust_hue", ref.adjust_hue, TF.adjust_hue, -0.5, 0.5),
    ],
)
@pytest.mark.parametrize("values", ["uint8 grid", "continuous"])
def test_jitter_op_matches_torchvision(name, ours_fn, torchvision_fn, low, high, values):
    count = 16
    x32, x64 = (_random_patches if values == "uint8 grid" else _smooth_patches)(count, 12, seed=2)
    # hue edge cases: gray pixels (max == min), ties between the max channel and another, pure primaries
    special = torch.tensor(
        [
            [0.5, 0.5, 0.5],
            [1.0, 1.0, 0.0],
            [0.0, 1.0, 1.0],
            [1.0, 0.0, 1.0],
            [1.0, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, 1.0],
            [0.0, 0.0, 0.0],
            [1.0, 1.0, 1.0],
            [0.2, 0.6, 0.6],
            [0.6, 0.6, 0.2],
            [0.6, 0.2, 0.6],
        ]
    )
    x32[:, :, 0, : len(special)] = special.T
    x64[:, :, 0, : len(special)] = special.T.double()
    factors = _factors(count, low, high, seed=3)
    factors[0] = high  # the ends of the range
    factors[1] = low
    ours = ours_fn(x32, factors.view(-1, 1, 1, 1))
    expected = torch.stack([torchvision_fn(x, float(f)) for x, f in zip(x64, factors)])
    _report(f"{name} ({values})", (ours.double() - expected).abs().max().item())


def test_hsv_conversions_match_torchvision():
    """The two halves of the hue op on their own (kernels may fuse them differently)."""
    from torchvision.transforms.v2.functional._color import _hsv_to_rgb, _rgb_to_hsv

    x32, _ = _smooth_patches(8, 12, seed=11)
    x32[:, :, 0, :3] = torch.tensor([[0.5, 0.5, 0.5], [1.0, 1.0, 0.0], [0.2, 0.6, 0.6]]).T  # gray and tied pixels
    hsv = ref.rgb_to_hsv(x32)
    assert (hsv >= 0).all() and (hsv[:, 0] < 1).all()
    _report("rgb_to_hsv", (hsv - _rgb_to_hsv(x32)).abs().max().item())
    # hue exactly at the sector boundaries, including 1.0 (remainder of a tiny negative shift rounds up to 1)
    hsv[:, 0, 1, :8] = torch.tensor([0.0, 1 / 6, 2 / 6, 0.5, 4 / 6, 5 / 6, 1.0, 1.0 - 2**-24])
    _report("hsv_to_rgb", (ref.hsv_to_rgb(hsv) - _hsv_to_rgb(hsv)).abs().max().item())


def test_hue_in_float32_is_close_to_float64():
    """torchvision's hue op always computes in float32 (the reference matches it bit for bit);
    this measures what float32 costs against the same formulas evaluated in float64."""
    x32, x64 = _smooth_patches(32, 16, seed=9)
    shift = _factors(32, -0.5, 0.5, seed=10)
    ours = ref.adjust_hue(x32, shift)
    exact = ref.adjust_hue(x64, shift.double())
    _report("adjust_hue float32 vs float64", (ours.double() - exact).abs().max().item())


def test_rgb_to_grayscale_matches_torchvision():
    x32, x64 = _smooth_patches(4, 10, seed=4)
    ours = ref.grayscale(x32).expand_as(x32)
    expected = TF.rgb_to_grayscale(x64, num_output_channels=3)
    _report("rgb_to_grayscale", (ours.double() - expected).abs().max().item())


@pytest.mark.parametrize("size", [32, 17])
def test_gaussian_blur_matches_torchvision(size):
    count = 6
    x32, x64 = _smooth_patches(count, size, seed=5)
    sigma = _factors(count, 0.1, 2.0, seed=6)
    sigma[0], sigma[1], sigma[2] = 0.1, 2.0, 0.0  # range ends, and 0 = no blur
    ours = ref.gaussian_blur(x32, sigma, kernel_size=13)
    expected = torch.stack(
        [TF.gaussian_blur(x, kernel_size=[13, 13], sigma=[float(s)] * 2) if s > 0 else x for x, s in zip(x64, sigma)]
    )
    _report(f"gaussian_blur k=13 on {size}x{size}", (ours.double() - expected).abs().max().item())
    assert torch.equal(ours[2], x32[2])  # sigma 0 leaves the patch bit-identical


def test_solarize_matches_torchvision_at_the_pil_threshold():
    x32, x64 = _random_patches(4, 16, seed=7)
    x32[:, 0, 0, :3] = torch.tensor([127.0, 128.0, 129.0]) / 255  # around PIL's threshold 128
    x64[:, 0, 0, :3] = torch.tensor([127.0, 128.0, 129.0], dtype=torch.float64) / 255
    ours = ref.solarize(x32, 128 / 255)
    expected = TF.solarize(x64, threshold=128 / 255)
    _report("solarize", (ours.double() - expected).abs().max().item())
    assert ours[0, 0, 0, 0] == x32[0, 0, 0, 0] and ours[0, 0, 0, 1] == 1 - x32[0, 0, 0, 1]


def test_normalize_matches_torchvision():
    x32, x64 = _smooth_patches(3, 8, seed=8)
    mean, std = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)
    ours = ref.normalize(x32, mean, std)
    expected = TF.normalize(x64, mean=list(mean), std=list(std))
    _report("normalize", (ours.double() - expected).abs().max().item())


# ---------------------------------------------------------------- whole chains


def torchvision_chain(image_chw, row, config):
    """One patch through torchvision's functional ops, driven by one parameter row."""
    top, left, h, w = (int(row[c]) for c in (AP.CROP_TOP, AP.CROP_LEFT, AP.CROP_HEIGHT, AP.CROP_WIDTH))
    size = config.output_size
    x = TF.resized_crop(image_chw, top, left, h, w, [size, size], antialias=True)
    if row[AP.FLIP] == 1:
        x = TF.horizontal_flip(x)
    if row[AP.JITTER] == 1:
        for column in (AP.ORDER_0, AP.ORDER_1, AP.ORDER_2, AP.ORDER_3):
            op = int(row[column])
            if op == AP.OP_BRIGHTNESS:
                x = TF.adjust_brightness(x, float(row[AP.BRIGHTNESS]))
            elif op == AP.OP_CONTRAST:
                x = TF.adjust_contrast(x, float(row[AP.CONTRAST]))
            elif op == AP.OP_SATURATION:
                x = TF.adjust_saturation(x, float(row[AP.SATURATION]))
            else:
                x = TF.adjust_hue(x, float(row[AP.HUE]))
    if row[AP.GRAYSCALE] == 1:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if row[AP.BLUR_SIGMA] > 0:
        sigma = float(row[AP.BLUR_SIGMA])
        x = TF.gaussian_blur(x, kernel_size=[config.blur_kernel_size] * 2, sigma=[sigma, sigma])
    if row[AP.SOLARIZE] == 1:
        x = TF.solarize(x, threshold=config.solarize_threshold)
    return TF.normalize(x, mean=list(config.mean), std=list(config.std))


CHAIN_CONFIGS = {
    "cifar": (AugmentConfig.cifar(), (32, 32), 3, 8),
    # every branch taken often, crops of every size from a non-square image: up- and downscaling
    "mixed": (
        AugmentConfig(
            output_size=24,
            crop_scale=(0.08, 1.0),
            crop_ratio=(0.5, 2.0),
            flip_p=0.5,
            jitter_p=0.9,
            grayscale_p=0.5,
            blur_p=0.5,
            solarize_p=0.5,
            mean=(0.485, 0.456, 0.406),
            std=(0.229, 0.224, 0.225),
        ),
        (40, 57),
        4,
        12,
    ),
}


@pytest.mark.parametrize("name", list(CHAIN_CONFIGS))
def test_whole_chain_matches_torchvision(name):
    config, (height, width), num_images, num_patches = CHAIN_CONFIGS[name]
    g = torch.Generator().manual_seed(11)
    images = torch.randint(0, 256, (num_images, height, width, 3), generator=g, dtype=torch.uint8)
    source_index, params = sample_augment_params(config, num_images, num_patches, height, width, generator=g)
    ours = ref.apply_augment(images, source_index, params, config)
    expected = torch.stack(
        [
            torchvision_chain(images[int(j)].permute(2, 0, 1).double() / 255, row, config)
            for j, row in zip(source_index, params)
        ]
    )
    assert ours.dtype == torch.float32 and ours.shape == expected.shape
    _report(f"whole chain ({name}, {len(params)} patches)", (ours.double() - expected).abs().max().item())
    if name == "mixed":  # the comparison exercised every branch
        for column in (AP.FLIP, AP.JITTER, AP.GRAYSCALE, AP.SOLARIZE):
            assert 0 < params[:, column].sum() < len(params)
        assert 0 < (params[:, AP.BLUR_SIGMA] > 0).sum() < len(params)
        assert (params[:, AP.CROP_HEIGHT] > config.output_size).any() and (
            params[:, AP.CROP_HEIGHT] < config.output_size
        ).any()


def test_chain_is_independent_of_patch_chunking(monkeypatch):
    """Chunking over patches (to bound memory) must not change any patch."""
    config = CHAIN_CONFIGS["mixed"][0]
    g = torch.Generator().manual_seed(12)
    images = torch.randint(0, 256, (3, 30, 26, 3), generator=g, dtype=torch.uint8)
    source_index, params = sample_augment_params(config, 3, 5, 30, 26, generator=g)
    whole = ref.apply_augment(images, source_index, params, config)
    monkeypatch.setattr(ref, "_CHUNK_ELEMENTS", 2 * 30 * 26 * 3)  # two patches per chunk
    assert torch.equal(ref.apply_augment(images, source_index, params, config), whole)
