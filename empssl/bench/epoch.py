"""One EMP-SSL epoch from free-running training steps: eager and (on CUDA) captured as a CUDA graph.

Times ``empssl.train.train_step`` as ``empssl train`` runs it, steps back to back with no
synchronisation between them (the device queue stays full), and extrapolates a CIFAR-10 epoch
(50,000 images at batch 100: 500 steps). Methods: "eager" (``--no-cuda-graph``) and, on CUDA,
"captured" (the default of ``empssl train``: recorded once, replayed) and "captured + compiled"
(``--compile``: the encoder compiled by torch.compile, then captured). The limit is the dense
bf16 (GPU) or float32 (CPU) matmul rate measured in the same run, against the step's convolution
and linear FLOPs (3x the forward's).

  empssl bench epoch            # GPU: b=100, n=20, ResNet-18 (the 1-epoch recipe), bf16 channels_last
  empssl bench epoch --quick    # CPU-sized: width 0.25, b=16, n=4
  empssl bench epoch --tiny     # seconds: checks the script, not the speed
"""
from __future__ import annotations

import argparse
import dataclasses
import math

import torch

from ..train import TrainConfig, _CapturedStep, autocast_context, build_train_state, train_step
from . import common
from .step import forward_flops

EPOCH_STEPS = 500  # CIFAR-10: 50,000 train images at batch 100
NUM_IMAGES = 1000  # synthetic uint8 images the batches are drawn from


def _step_runner(state, method: str):
    if method.startswith("captured"):
        return _CapturedStep(state)
    return lambda images, image_ids: train_step(state, images, image_ids)


def time_steps(device: torch.device, config: TrainConfig, method: str, steps: int, repeats: int):
    """Median seconds per free-running step (``repeats`` runs of ``steps`` steps), and the forward FLOPs."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = torch.randint(0, 256, (NUM_IMAGES, 32, 32, 3), dtype=torch.uint8, device=device, generator=generator)
    state = build_train_state(dataclasses.replace(config, compile=method.endswith("compiled")), device, NUM_IMAGES, 32)
    state.encoder.train()
    run = _step_runner(state, method)
    batches = [torch.randperm(NUM_IMAGES, device=device, generator=generator)[:config.batch_size] for _ in range(steps)]

    def run_steps():
        for image_ids in batches:
            run(images[image_ids], image_ids)

    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = device.type == "cuda"
    try:
        # warm-up: the captured runner's eager steps and its capture; cuDNN's algorithm search
        for _ in range(math.ceil((_CapturedStep.WARMUP + 1) / steps)):
            run_steps()
        seconds = common.time_call(run_steps, device, repeats=repeats, warmup=0) / steps
    finally:
        torch.backends.cudnn.benchmark = previous
    patches = state.augment(images[batches[0]], config.num_patches, seed=0, image_ids=batches[0])
    with autocast_context(device, state.bf16):
        flops = forward_flops(state.encoder, patches)
    return seconds, flops


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="empssl bench epoch", description=__doc__.splitlines()[0],
                                     epilog=__doc__.split("\n\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_output_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="CPU-sized model and batch")
    parser.add_argument("--tiny", action="store_true", help="seconds-long run at toy sizes (checks the script, not speed)")
    parser.add_argument("--steps", type=int, default=None, help="free-running steps per timed run")
    args = parser.parse_args(argv)
    results = common.open_results("epoch", args)
    device = torch.device(args.device)
    quick = args.quick or args.tiny or device.type == "cpu"
    sizes = (dict(width=0.125, hidden_dim=64, z_dim=32, batch_size=4, num_patches=2) if args.tiny else
             dict(width=0.25, hidden_dim=512, z_dim=128, batch_size=16, num_patches=4) if quick else
             dict(width=1.0, hidden_dim=4096, z_dim=1024, batch_size=100, num_patches=20))
    config = dataclasses.replace(TrainConfig(), **sizes, device=str(device), progress=False)
    steps = args.steps or (2 if args.tiny else 4 if quick else 100)
    repeats = 1 if args.tiny else 3
    on_gpu = device.type == "cuda"
    matmul_dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = common.matmul_rate(device, matmul_dtype, size=256 if args.tiny else None)
    results.note(f"dense {str(matmul_dtype)[6:]} matmul rate {peak / 1e12:.3g} TFLOP/s")
    case = f"b={config.batch_size} n={config.num_patches} {config.arch} w{config.width}"
    for method in ("eager", "captured", "captured + compiled") if on_gpu else ("eager",):
        seconds, flops = time_steps(device, config, method, steps, repeats)
        step_flops = 3 * flops  # forward + backward (input and weight gradients)
        results.add(case, method, seconds, 1.0 / seconds, "steps/s", "bf16" if on_gpu else "float32",
                    step_flops / seconds / peak, f"{str(matmul_dtype)[6:]} matmul",
                    f"CIFAR-10 epoch ({EPOCH_STEPS} steps) {EPOCH_STEPS * seconds:.1f} s; "
                    f"{step_flops / seconds / 1e12:.3g} TFLOP/s")
    if not on_gpu:
        results.note("the captured step needs a CUDA GPU: only the eager step is timed here")
    return common.finish(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
