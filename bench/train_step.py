"""End-to-end EMP-SSL training step: where the time goes, and what the fused kernels save.

Times one full step (augment n*b patches, encoder forward, EMPSSLLoss, backward, LARS step)
and its three parts, for the reference backends and for `auto` (the fastest available),
side by side in one run. Medians over repeats; the device name and versions are printed.

  python bench/train_step.py --out results/            # GPU: b=100, n=20, ResNet-18 (the 1-epoch recipe)
  python bench/train_step.py --quick --out results/    # CPU-sized: width 0.25, b=16, n=4
"""
import argparse
import csv
import os
import statistics
import time

import torch

import empssl
from empssl.augment import AugmentConfig, MultiPatchAugment
from empssl.loss import EMPSSLLoss
from empssl.models import build_encoder
from empssl.optim import build_optimizer
from empssl.train import autocast_context


def _clock(device):
    """A function returning seconds, exact for device work (synchronises on CUDA)."""
    if device.type == "cuda":
        def now():
            torch.cuda.synchronize()
            return time.perf_counter()
        return now
    return time.perf_counter


def time_step(device, args, augment_backend, loss_backend):
    torch.manual_seed(0)
    encoder = build_encoder(args.arch, args.width, args.hidden_dim, args.z_dim).to(device)
    encoder = encoder.to(memory_format=torch.channels_last) if device.type == "cuda" else encoder
    optimizer = build_optimizer(encoder)
    bf16 = device.type == "cuda"
    augment = MultiPatchAugment(AugmentConfig.cifar(), backend=augment_backend,
                                out_dtype=torch.bfloat16 if bf16 else torch.float32, channels_last=bf16)
    criterion = EMPSSLLoss(backend=loss_backend)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 32, 32, 3), dtype=torch.uint8, device=device, generator=generator)
    now = _clock(device)
    parts = {"augment": [], "forward": [], "loss": [], "backward+step": [], "total": []}
    for repeat in range(args.warmup + args.repeats):
        t0 = now()
        patches = augment(images, args.patches, generator=generator)
        t1 = now()
        with autocast_context(device, bf16):
            z = encoder(patches)
        z = z.float().reshape(args.patches, args.batch, -1)
        t2 = now()
        loss = criterion(z)
        t3 = now()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        t4 = now()
        if repeat >= args.warmup:
            for name, seconds in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                parts[name].append(seconds)
    return {name: statistics.median(values) for name, values in parts.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results", help="folder for train_step.csv")
    parser.add_argument("--quick", action="store_true", help="CPU-sized model and batch")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    quick = args.quick or args.device == "cpu"
    args.arch, args.width = "resnet18-cifar", (0.25 if quick else 1.0)
    args.hidden_dim, args.z_dim = (512, 128) if quick else (4096, 1024)
    args.batch, args.patches = (16, 4) if quick else (100, 20)
    args.warmup = 1 if quick else 3
    args.repeats = args.repeats or (3 if quick else 10)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}; empssl {empssl.__version__}")
    print(f"step: b={args.batch} images x n={args.patches} patches, {args.arch} width {args.width}, "
          f"median of {args.repeats}")
    rows = []
    for augment_backend, loss_backend in (("reference", "reference"), ("auto", "auto")):
        medians = time_step(device, args, augment_backend, loss_backend)
        patches_per_s = args.batch * args.patches / medians["total"]
        rows.append([name, augment_backend, loss_backend] + [f"{medians[k] * 1e3:.2f}" for k in medians]
                    + [f"{patches_per_s:.0f}"])
    header = ["device", "augment", "loss", "augment_ms", "forward_ms", "loss_ms", "backward_step_ms", "total_ms",
              "patches_per_s"]
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "train_step.csv"), "w", newline="") as f:
        csv.writer(f).writerows([header] + rows)
    for row in [header] + rows:
        print("  ".join(f"{c:>16}" for c in row[1:]))


if __name__ == "__main__":
    main()
