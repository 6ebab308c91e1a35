"""One EMP-SSL training step: where the time goes, and what the fused kernels save.

Times one full step (augment n*b patches, encoder forward, EMPSSLLoss, backward, LARS step) and
its parts, for the reference backends and for `auto` (the fastest available), side by side in
one run (methods "PART (reference backends)" and "PART (auto backends)"). The parts are timed with
a synchronisation between them (so their sum is slower than a free-running step); the total is the
median step time. The limit is the dense bf16 (GPU) or float32 (CPU) matmul rate measured in the
same run, against the step's convolution and linear FLOPs.

  empssl bench step            # GPU: b=100, n=20, ResNet-18 (the 1-epoch recipe)
  empssl bench step --quick    # CPU-sized: width 0.25, b=16, n=4
"""

from __future__ import annotations

import statistics
import time

import torch

from ..augment.config import AugmentConfig
from ..augment.multipatch import MultiPatchAugment
from ..device import autocast_context
from ..loss import EMPSSLLoss
from ..models.encoder import build_encoder
from ..optim import build_optimizer
from . import common

PARTS = ("augment", "forward", "loss", "backward+step", "total")


def forward_flops(encoder: torch.nn.Module, patches: torch.Tensor) -> int:
    """Multiply-add FLOPs (x2) of the convolutions and linear layers of one forward pass."""
    flops = [0]

    def count(module, inputs, output):
        if isinstance(module, torch.nn.Conv2d):
            kernel = module.weight[0].numel()  # in/groups * kh * kw
            flops[0] += 2 * output.numel() * kernel
        elif isinstance(module, torch.nn.Linear):
            flops[0] += 2 * output.numel() * module.in_features

    hooks = [
        m.register_forward_hook(count) for m in encoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))
    ]
    try:
        with torch.no_grad():
            encoder(patches)
    finally:
        for hook in hooks:
            hook.remove()
    return flops[0]


def time_step(device, args, augment_backend, loss_backend):
    """Median seconds of each part of the step, and the forward FLOPs."""
    torch.manual_seed(0)
    encoder = build_encoder(args.arch, args.width, args.hidden_dim, args.z_dim).to(device)
    on_gpu = device.type == "cuda"
    if on_gpu:
        encoder = encoder.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(encoder)
    augment = MultiPatchAugment(
        AugmentConfig.cifar(),
        backend=augment_backend,
        out_dtype=torch.bfloat16 if on_gpu else torch.float32,
        channels_last=on_gpu,
    )
    criterion = EMPSSLLoss(backend=loss_backend)
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (args.batch, 32, 32, 3), dtype=torch.uint8, device=device, generator=generator)

    def now():
        common.synchronize(device)
        return time.perf_counter()

    samples = {name: [] for name in PARTS}
    flops = None
    for repeat in range(args.warmup + args.repeats):
        t0 = now()
        patches = augment(images, args.patches, generator=generator)
        t1 = now()
        with autocast_context(device, on_gpu):
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
            for name, seconds in zip(PARTS, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                samples[name].append(seconds)
        if flops is None:
            with autocast_context(device, on_gpu):
                flops = forward_flops(encoder, patches)
        del patches, z, loss
    return {name: statistics.median(values) for name, values in samples.items()}, flops


def main(argv=None) -> int:
    parser = common.make_parser("step", __doc__)
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    results = common.open_results("step", args)
    device = torch.device(args.device)
    quick = args.quick or args.tiny or device.type == "cpu"
    args.arch = "resnet18-cifar"
    args.width = 0.125 if args.tiny else 0.25 if quick else 1.0
    args.hidden_dim, args.z_dim = (64, 32) if args.tiny else (512, 128) if quick else (4096, 1024)
    args.batch, args.patches = (4, 2) if args.tiny else (16, 4) if quick else (100, 20)
    args.warmup = 1 if quick else 3
    args.repeats = args.repeats or (1 if args.tiny else 3 if quick else 10)
    matmul_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    peak = common.matmul_rate(device, matmul_dtype, size=256 if args.tiny else None)
    results.note(f"dense {str(matmul_dtype)[6:]} matmul rate {peak / 1e12:.3g} TFLOP/s")
    case = f"b={args.batch} n={args.patches} {args.arch} w{args.width}"
    for augment_backend, loss_backend in (("reference", "reference"), ("auto", "auto")):
        medians, flops = time_step(device, args, augment_backend, loss_backend)
        step_flops = 3 * flops  # forward + backward (input and weight gradients)
        for part in PARTS:
            seconds = medians[part]
            note = f"{step_flops / 1e12:.3g} TFLOP per step (3x forward)" if part == "total" else ""
            fraction = step_flops / seconds / peak if part == "total" else None
            results.add(
                case,
                f"{part} ({augment_backend} backends)",
                seconds,
                args.batch * args.patches / seconds,
                "patches/s",
                "bf16" if device.type == "cuda" else "float32",
                fraction,
                f"{str(matmul_dtype)[6:]} matmul",
                note,
            )
    return common.finish(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
