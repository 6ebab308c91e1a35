"""Multi-patch augmentation throughput: patches/s and output GB/s.

Cases: 32x32 patches from 32x32 images (CIFAR recipe) at P in {2000, 20000, 200000}, and
224x224 patches from 256x256 images (ImageNet recipe). Contenders, side by side in one run:
  - pil-1core:     the published pipeline (torchvision transforms on PIL images), one process
  - pil-Ncores:    the same over a multiprocessing Pool of all cores
  - reference:     empssl's plain-PyTorch applier on the same device
  - kornia:        kornia.augmentation.AugmentationSequential (skipped with a note if not installed)
  - cpu / cpu-1thread / cuda / triton: empssl's fused backends where available
"per core" rates divide by the threads used; cpu-1thread runs the C++ backend with
torch.set_num_threads(1) (OpenMP follows it).

    python bench/augment.py [--quick] [--device cpu|cuda] [--out results/]

--quick keeps the run under about 90 s on a 2-core CPU (small P, few repetitions, the slow
contenders on fewer patches). Results: a table on stdout, CSV (and a PNG if matplotlib is
installed) under --out.

Measured (2-core shared CPU, torch 2.14.1, --quick): see the table printed by the run; the
numbers quoted in the project notes come from such a run.
"""
from __future__ import annotations

import argparse
import csv
import multiprocessing
import os
import platform
import random
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from empssl import backends  # noqa: E402
from empssl.augment import AugmentConfig, MultiPatchAugment  # noqa: E402


def _pil_pipeline(output_size):
    import torchvision.transforms as T
    from PIL import ImageFilter

    class GaussianBlur:  # the authors' PIL blur, radius U(0.1, 2)
        def __call__(self, image):
            return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(0.1, 2.0)))

    ratio = (1.0, 1.0) if output_size == 32 else (3 / 4, 4 / 3)
    return T.Compose([
        T.RandomResizedCrop(output_size, scale=(0.25, 0.25), ratio=ratio),
        T.RandomHorizontalFlip(),
        T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.2)], p=0.8),
        T.RandomGrayscale(0.2),
        T.RandomApply([GaussianBlur()], p=0.1),
        T.RandomSolarize(128, p=0.1),
        T.ToTensor(),
        T.Normalize([0.5] * 3, [0.5] * 3),
    ])


_WORKER = {}


def _pil_worker_init(images_np, output_size):
    from PIL import Image

    torch.set_num_threads(1)
    _WORKER["images"] = [Image.fromarray(a) for a in images_np]
    _WORKER["pipeline"] = _pil_pipeline(output_size)


def _pil_worker(indices):
    images, pipeline = _WORKER["images"], _WORKER["pipeline"]
    for i in indices:
        pipeline(images[i % len(images)])
    return len(indices)


def bench_pil(images, output_size, num_patches, processes, repeats=1):
    """Seconds for num_patches patches of the published pipeline over `processes` processes
    (one process: after a warm-up, the best of `repeats` passes, as for the backends)."""
    images_np = [image.numpy() for image in images]
    if processes == 1:
        saved_threads = torch.get_num_threads()  # the worker setup pins torch to 1 thread: undo it here
        _pil_worker_init(images_np, output_size)
        _pil_worker(range(min(num_patches, 50)))  # warm-up: lazy imports and PIL's first calls
        seconds = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            _pil_worker(range(num_patches))
            seconds = min(seconds, time.perf_counter() - start)
        torch.set_num_threads(saved_threads)
        return seconds
    chunks = [list(range(k, num_patches, processes)) for k in range(processes)]
    with multiprocessing.get_context("fork").Pool(processes, _pil_worker_init, (images_np, output_size)) as pool:
        pool.map(_pil_worker, [[0]] * processes)  # warm the workers
        start = time.perf_counter()
        pool.map(_pil_worker, chunks)
        return time.perf_counter() - start


def bench_backend(backend, images, config, num_patches, repeats, threads=None):
    """Best seconds of `repeats` runs of sample + apply (as the training step calls it)."""
    saved = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        augment = MultiPatchAugment(config, backend=backend)
        per_image = max(1, num_patches // images.shape[0])
        generator = torch.Generator(device=images.device).manual_seed(0)
        augment(images, per_image, generator=generator)  # warm-up, compile
        best = float("inf")
        for _ in range(repeats):
            if images.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            augment(images, per_image, generator=generator)
            if images.is_cuda:
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        return best, per_image * images.shape[0]
    finally:
        torch.set_num_threads(saved)


def bench_kornia(images, config, num_patches, repeats):
    import kornia.augmentation as K

    size = config.output_size
    pipeline = K.AugmentationSequential(
        K.RandomResizedCrop((size, size), scale=config.crop_scale, ratio=config.crop_ratio),
        K.RandomHorizontalFlip(),
        K.ColorJitter(0.4, 0.4, 0.4, 0.2, p=0.8),
        K.RandomGrayscale(p=0.2),
        K.RandomGaussianBlur((config.blur_kernel_size,) * 2, config.blur_sigma, p=0.1),
        K.RandomSolarize(0.0, 0.0, p=0.1),
        K.Normalize(torch.tensor(config.mean), torch.tensor(config.std)),
    ).to(images.device)
    per_image = max(1, num_patches // images.shape[0])
    batch = images.permute(0, 3, 1, 2).float().div(255).repeat(per_image, 1, 1, 1)
    pipeline(batch[:8])
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        pipeline(batch)
        if images.is_cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, batch.shape[0]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run under about 90 s on a 2-core CPU")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=None, help="folder for augment.csv (and augment.png)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cores = os.cpu_count() or 1

    if args.quick:
        cases = [("cifar", 32, 32, [2000, 20000]), ("imagenet", 256, 224, [64])]
        pil_patches = {32: 1000, 224: 16}
        reference_cap = {32: 2000, 224: 16}
        repeats = 2
    else:
        cases = [("cifar", 32, 32, [2000, 20000, 200000]), ("imagenet", 256, 224, [1000])]
        pil_patches = {32: 4000, 224: 200}
        reference_cap = {32: 20000, 224: 200}
        repeats = 5

    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or platform.machine())
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"device: {device_name} ({device.type}), {cores} CPU cores; torch {torch.__version__}, triton {triton_version}")

    rows, notes = [], []
    for name, image_size, output_size, sizes in cases:
        config = AugmentConfig.cifar() if output_size == 32 else AugmentConfig.imagenet()
        generator = torch.Generator().manual_seed(0)
        images = torch.randint(0, 256, (100, image_size, image_size, 3), dtype=torch.uint8, generator=generator)
        patch_bytes = 3 * output_size * output_size * 4  # float32 output
        dev_images = images.to(device)

        def record(contender, patches, seconds, threads):
            rate = patches / seconds
            rows.append(dict(case=name, image=image_size, patch=output_size, P=patches, contender=contender,
                             threads=threads, seconds=seconds, patches_per_s=rate, patches_per_s_per_core=rate / threads,
                             output_GB_per_s=rate * patch_bytes / 1e9))

        n = pil_patches[output_size]
        record("pil-1core", n, bench_pil(images, output_size, n, 1, repeats), 1)
        if cores > 1:
            record(f"pil-{cores}cores", n, bench_pil(images, output_size, n, cores), cores)
        for size in sizes:
            why = backends.reasons("augment", device, dev_images, torch.zeros(1, dtype=torch.int64, device=device),
                                   torch.zeros(1, 17, device=device), config)
            contenders = [("reference", "reference", None)]
            if device.type == "cpu":
                contenders += [("cpu", "cpu", None), ("cpu-1thread", "cpu", 1)]
            else:
                contenders += [("cuda", "cuda", None), ("triton", "triton", None)]
            for label, backend, threads in contenders:
                if why[backend] is not None:
                    notes.append(f"{label} skipped: {why[backend]}")
                    continue
                count = min(size, reference_cap[output_size]) if backend == "reference" else size
                seconds, patches = bench_backend(backend, dev_images, config, count, repeats, threads)
                used = threads or (torch.get_num_threads() if device.type == "cpu" else 1)
                record(label if device.type == "cpu" else f"{label}", patches, seconds, used)
            try:
                seconds, patches = bench_kornia(dev_images, config, min(size, reference_cap[output_size]), repeats)
                record("kornia", patches, seconds, torch.get_num_threads() if device.type == "cpu" else 1)
            except ImportError:
                notes.append("kornia skipped: not installed")

    header = f"{'case':9s} {'P':>7s} {'contender':14s} {'thr':>3s} {'patches/s':>11s} {'per core':>11s} {'GB/s':>7s}"
    print(header)
    print("-" * len(header))
    for row in rows:
        print(f"{row['case']:9s} {row['P']:7d} {row['contender']:14s} {row['threads']:3d} {row['patches_per_s']:11.0f} "
              f"{row['patches_per_s_per_core']:11.0f} {row['output_GB_per_s']:7.3f}")
    for case in ("cifar", "imagenet"):
        pil = [r for r in rows if r["case"] == case and r["contender"] == "pil-1core"]
        fast = [r for r in rows if r["case"] == case and r["contender"] in ("cpu-1thread",)]
        if pil and fast:
            best = max(r["patches_per_s_per_core"] for r in fast)
            print(f"{case}: C++ backend on 1 thread / PIL pipeline on 1 core = {best / pil[0]['patches_per_s']:.1f}x")
    for note in sorted(set(notes)):
        print("note:", note)

    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "augment.csv"), "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(8, 4))
            labels = [f"{r['case']} P={r['P']}\n{r['contender']}" for r in rows]
            ax.barh(labels, [r["patches_per_s"] for r in rows])
            ax.set_xscale("log")
            ax.set_xlabel("patches/s")
            ax.set_title(f"augmentation throughput on {device_name}")
            fig.tight_layout()
            fig.savefig(os.path.join(args.out, "augment.png"), dpi=120)
        except ImportError:
            print("note: matplotlib not installed, no plot")


if __name__ == "__main__":
    main()
