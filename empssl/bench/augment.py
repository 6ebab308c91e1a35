"""Multi-patch augmentation throughput: patches/s, and output bandwidth against the device copy.

Cases: 32x32 patches from 32x32 images (CIFAR recipe) at several patch counts P, and 224x224
patches from 256x256 images (ImageNet recipe). Contenders, side by side in one run:
  pil-1core, pil-Ncores  the published pipeline (torchvision transforms on PIL images), one process
                         and a pool of all cores
  torchvision-v2         torchvision.transforms.v2 on uint8 tensors, called once per patch
  kornia, albumentations the same recipe in those libraries, where installed
  reference              empssl's plain-PyTorch applier
  cpu, cpu-1thread, cuda, triton   empssl's fused backends where they run (on a GPU also with
                         bf16 channels_last output, as training uses)
Every empssl row includes the parameter sampling, as the training step calls it. "per core"
rates divide by the threads used. On a GPU run the CPU-only contenders (PIL, torchvision-v2,
albumentations) are not timed: their figures do not depend on the GPU (docs/benchmarks.md section 2 quotes the CPU
machine's).

  empssl bench augment            # GPU sizes
  empssl bench augment --quick    # under about 90 s on a 2-core CPU
"""

from __future__ import annotations

import multiprocessing
import os
import random

import torch

from .. import backends
from ..augment import params as AP
from ..augment.config import AugmentConfig
from ..augment.multipatch import MultiPatchAugment
from . import common


def pil_pipeline(output_size):
    import torchvision.transforms as T
    from PIL import ImageFilter

    class GaussianBlur:  # the authors' PIL blur, radius U(0.1, 2)
        def __call__(self, image):
            return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    ratio = (1.0, 1.0) if output_size == 32 else (3 / 4, 4 / 3)
    return T.Compose(
        [
            T.RandomResizedCrop(output_size, scale=(0.25, 0.25), ratio=ratio),
            T.RandomHorizontalFlip(),
            T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
            T.RandomGrayscale(0.2),
            T.RandomApply([GaussianBlur()], p=0.1),
            T.RandomSolarize(128, p=0.1),
            T.ToTensor(),
            T.Normalize([0.5] * 3, [0.5] * 3),
        ]
    )


_WORKER = {}


def _pil_worker_init(images_np, output_size):
    from PIL import Image

    torch.set_num_threads(1)
    _WORKER["images"] = [Image.fromarray(a) for a in images_np]
    _WORKER["pipeline"] = pil_pipeline(output_size)


def _pil_worker(indices):
    images, pipeline = _WORKER["images"], _WORKER["pipeline"]
    for i in indices:
        pipeline(images[i % len(images)])
    return len(indices)


def time_pil(images, output_size, num_patches, processes, repeats):
    """Seconds for num_patches patches of the published pipeline over `processes` processes."""
    images_np = [image.numpy() for image in images]
    cpu = torch.device("cpu")
    if processes == 1:
        saved_threads = torch.get_num_threads()  # the worker setup pins torch to 1 thread: undo it after
        _pil_worker_init(images_np, output_size)
        try:
            return common.time_call(lambda: _pil_worker(range(num_patches)), cpu, repeats)
        finally:
            torch.set_num_threads(saved_threads)
    chunks = [list(range(k, num_patches, processes)) for k in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes, _pil_worker_init, (images_np, output_size)) as pool:
        return common.time_call(lambda: pool.map(_pil_worker, chunks), cpu, repeats)


def _torchvision_v2(config):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(config.output_size, scale=config.crop_scale, ratio=config.crop_ratio, antialias=True),
            v2.RandomHorizontalFlip(config.flip_p),
            v2.RandomApply([v2.ColorJitter(*config.jitter_strengths())], p=config.jitter_p),
            v2.RandomGrayscale(config.grayscale_p),
            v2.RandomApply([v2.GaussianBlur(config.blur_kernel_size, config.blur_sigma)], p=config.blur_p),
            v2.RandomSolarize(128, p=config.solarize_p),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(config.mean), list(config.std)),
        ]
    )


def time_torchvision_v2(images, config, num_patches, repeats):
    pipeline = _torchvision_v2(config)
    chw = images.permute(0, 3, 1, 2)
    count = images.shape[0]

    def run():
        for i in range(num_patches):
            pipeline(chw[i % count])

    return common.time_call(run, images.device, repeats)


def time_kornia(images, config, num_patches, repeats):
    import kornia.augmentation as K

    size = config.output_size
    pipeline = K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=config.crop_scale, ratio=config.crop_ratio),
        K.RandomHorizontalFlip(p=config.flip_p),
        K.ColorJitter(*config.jitter_strengths(), p=config.jitter_p),
        K.RandomGrayscale(p=config.grayscale_p),
        K.RandomGaussianBlur((config.blur_kernel_size,) * 2, config.blur_sigma, p=config.blur_p),
        K.RandomSolarize(0.0, 0.0, p=config.solarize_p),
        K.Normalize(torch.tensor(config.mean), torch.tensor(config.std)),
    ).to(images.device)
    per_image = max(1, num_patches // images.shape[0])
    batch = images.permute(0, 3, 1, 2).float().div(255).repeat(per_image, 1, 1, 1)
    return common.time_call(lambda: pipeline(batch), images.device, repeats), batch.shape[0]


def time_albumentations(images, config, num_patches, repeats):
    import albumentations as A

    size = config.output_size
    pipeline = A.Compose(
        [
            A.RandomResizedCrop(size=(size, size), scale=config.crop_scale, ratio=config.crop_ratio),
            A.HorizontalFlip(p=config.flip_p),
            A.ColorJitter(*config.jitter_strengths(), p=config.jitter_p),
            A.ToGray(p=config.grayscale_p),
            A.GaussianBlur(blur_limit=(config.blur_kernel_size,) * 2, sigma_limit=config.blur_sigma, p=config.blur_p),
            A.Solarize(p=config.solarize_p),
            A.Normalize(mean=config.mean, std=config.std),
        ]
    )
    arrays = [image.numpy() for image in images.cpu()]

    def run():
        for i in range(num_patches):
            pipeline(image=arrays[i % len(arrays)])

    return common.time_call(run, torch.device("cpu"), repeats)


def time_backend(
    backend, images, config, num_patches, repeats, threads=None, out_dtype=torch.float32, channels_last=False
):
    """Median seconds of sample + apply of num_patches patches (rounded to whole patches per image)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        augment = MultiPatchAugment(config, backend=backend, out_dtype=out_dtype, channels_last=channels_last)
        per_image = max(1, num_patches // images.shape[0])
        generator = torch.Generator(device=images.device).manual_seed(0)
        seconds = common.time_call(lambda: augment(images, per_image, generator=generator), images.device, repeats)
        return seconds, per_image * images.shape[0]
    finally:
        torch.set_num_threads(saved)


def case_name(recipe: str, image_size: int, output_size: int, patches: int) -> str:
    return f"{recipe} {image_size}->{output_size} P={patches}"


def main(argv=None) -> int:
    parser = common.make_parser("augment", __doc__)
    args = parser.parse_args(argv)
    results = common.open_results("augment", args)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    cores = os.cpu_count() or 1
    if args.tiny:
        cases = [("cifar", 32, [64])]
        per_patch_count, repeats = {32: 16}, 1
    elif args.quick or not on_gpu:
        cases = [("cifar", 32, [2000, 20000]), ("imagenet", 224, [64])]
        per_patch_count, repeats = {32: 1000, 224: 16}, 2
    else:  # sized to fit the device check's bench_augment step (20 s): the per-patch contenders run on fewer patches
        cases = [("cifar", 32, [20000, 200000]), ("imagenet", 224, [2000])]
        per_patch_count, repeats = {32: 1000, 224: 100}, 3
    reference_cap = {32: 2000 if not on_gpu else 200000, 224: 16 if not on_gpu else 2000}
    bandwidth = common.copy_bandwidth(device, megabytes=16 if args.tiny else 256)
    results.note(f"device copy bandwidth {bandwidth / 1e9:.1f} GB/s (read + write)")
    notes = set()
    for name, output_size, sizes in cases:
        config = AugmentConfig.cifar() if name == "cifar" else AugmentConfig.imagenet()
        image_size = 32 if name == "cifar" else 256
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (100, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
        dev_images = images.to(device)

        def record(method, patches, seconds, threads, out_dtype=torch.float32, note=""):
            rate = patches / seconds
            out_bytes = patches * 3 * output_size * output_size * torch.empty((), dtype=out_dtype).element_size()
            per_core = f"{rate / threads:.4g} patches/s per core" if threads > 1 else ""
            results.add(
                case_name(name, image_size, output_size, patches),
                method,
                seconds,
                rate,
                "patches/s",
                str(out_dtype).replace("torch.", ""),
                out_bytes / seconds / bandwidth,
                "copy GB/s",
                "; ".join(x for x in (note, per_core) if x),
            )

        count = per_patch_count[output_size]
        # their figures do not depend on the GPU: the CPU machine times them (docs/benchmarks.md), the GPU's minutes
        # go elsewhere
        if on_gpu:
            notes.add(
                "CPU-only contenders (PIL, torchvision-v2 per patch, albumentations) not timed on a GPU run: "
                "see the CPU figures of docs/benchmarks.md (empssl bench augment --device cpu)"
            )
        else:
            with results.row(case_name(name, image_size, output_size, count), "pil-1core"):
                record(
                    "pil-1core", count, time_pil(images, output_size, count, 1, repeats), 1, note="published pipeline"
                )
            if cores > 1 and not args.tiny:
                with results.row(case_name(name, image_size, output_size, count), f"pil-{cores}cores"):
                    record(f"pil-{cores}cores", count, time_pil(images, output_size, count, cores, repeats), cores)
            few = max(1, count // 5)  # a few ms per patch each
            with results.row(case_name(name, image_size, output_size, few), "torchvision-v2 per patch"):
                record("torchvision-v2 per patch", few, time_torchvision_v2(images, config, few, repeats), 1)
            try:
                record("albumentations", few, time_albumentations(images, config, few, repeats), 1)
            except ImportError:
                notes.add("albumentations not installed: no albumentations row")
        for size in sizes:
            why_not = backends.reasons(
                "augment",
                device,
                dev_images,
                torch.zeros(1, dtype=torch.int64, device=device),
                torch.zeros(1, AP.NUM_PARAMS, device=device),
                config,
            )
            contenders = [("reference", "reference", None, torch.float32, False)]
            if on_gpu:
                for backend in ("cuda", "triton"):
                    contenders += [
                        (backend, backend, None, torch.float32, False),
                        (f"{backend} bf16 channels_last", backend, None, torch.bfloat16, True),
                    ]
            else:
                contenders += [
                    ("cpu", "cpu", None, torch.float32, False),
                    ("cpu-1thread", "cpu", 1, torch.float32, False),
                ]
            for label, backend, threads, out_dtype, channels_last in contenders:
                if why_not[backend] is not None:
                    notes.add(f"{label} skipped: {why_not[backend]}")
                    continue
                wanted = min(size, reference_cap[output_size]) if backend == "reference" else size
                # a row on its own: an error in it (out of memory, say) is its row's, and the next one runs
                with results.row(
                    case_name(name, image_size, output_size, wanted), label, str(out_dtype).replace("torch.", "")
                ):
                    seconds, patches = time_backend(
                        backend, dev_images, config, wanted, repeats, threads, out_dtype, channels_last
                    )
                    used = threads or (torch.get_num_threads() if not on_gpu else 1)
                    record(label, patches, seconds, used, out_dtype)
            try:
                with results.row(
                    case_name(name, image_size, output_size, min(size, reference_cap[output_size])), "kornia"
                ):
                    seconds, patches = time_kornia(dev_images, config, min(size, reference_cap[output_size]), repeats)
                    record("kornia", patches, seconds, torch.get_num_threads() if not on_gpu else 1)
            except ImportError:
                notes.add("kornia not installed: no kornia row")
    for note in sorted(notes):
        results.note(note)
    return common.finish(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
