"""A step variant on CUDA against the eager step, by the 2x rule (docs/design.md section 8): after the same steps, the
variant's float32 parameters and running statistics are at most twice as far from a float64 run's as the eager
float32 run's are.

cuDNN is deterministic in every run (the trainer then leaves cudnn.benchmark off, so cuDNN's heuristics pick the
algorithms), so the eager run carries no run-to-run noise of its own; float32 rounding amplified by the steps is the
eager run's distance, and the variant may not add more than that again."""

import dataclasses
import functools

import torch

from empssl.config import TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.device import cudnn_benchmark, float32_precision
from empssl.training import step as S


class _Float64Patches:
    """The state's augmentation with its patches in float64, for a float64 run of the same steps."""

    def __init__(self, augment):
        self.augment = augment

    def __call__(self, *args, **kwargs):
        return self.augment(*args, **kwargs).double()


def _flat(state):
    """The parameters and the floating buffers (BatchNorm's running statistics, which evaluation reads and a captured
    step must update too), as one float64 vector."""
    buffers = [b for b in state.encoder.buffers() if b.is_floating_point()]
    return torch.cat([t.detach().double().flatten() for t in [*state.encoder.parameters(), *buffers]]).cpu()


def parameters_after(config: TrainConfig, steps: int, num_images: int, image_size: int, float64: bool = False):
    """(flattened parameters, metric sums) after ``steps`` CUDA steps of ``config`` as ``train`` runs them
    (cudnn.benchmark, TF32 as TrainConfig sets it); ``float64``: the same steps in float64, eager."""
    device = torch.device("cuda")
    if float64:
        config = dataclasses.replace(config, step_variant="eager")
    state = S.build_train_state(config, device, num_images, image_size)
    if float64:
        state.encoder.double()  # in place: the optimiser holds the same parameters
        state.augment = _Float64Patches(state.augment)
    images = make_synthetic(num_images, 8, image_size, seed=0).train_images.to(device)
    run = S.captured_train_step(state) if config.captured else functools.partial(S.train_step, state)
    generator = torch.Generator().manual_seed(0)
    with cudnn_benchmark(True), float32_precision(config.tf32):
        for _ in range(steps):
            ids = torch.randperm(num_images, generator=generator)[: config.batch_size].to(device)
            run(images[ids], ids)
    torch.cuda.synchronize()
    return _flat(state), state.metric_sums.double().cpu()


def assert_variant_follows_eager(config: TrainConfig, steps: int, num_images: int, image_size: int) -> None:
    """``config`` (float32, bf16 off) run as its step variant holds the 2x rule against its eager run."""
    torch.backends.cudnn.deterministic = True  # conftest restores it after the test
    cpu = dataclasses.replace(config, device="cpu")
    initial = _flat(S.build_train_state(cpu, torch.device("cpu"), num_images, image_size))
    reference, reference_sums = parameters_after(config, steps, num_images, image_size, float64=True)
    eager_config = dataclasses.replace(config, step_variant="eager")
    eager, eager_sums = parameters_after(eager_config, steps, num_images, image_size)
    try:
        variant, variant_sums = parameters_after(config, steps, num_images, image_size)
    finally:
        torch._dynamo.reset()
    moved = (reference - initial).norm()
    eager_error, variant_error = (eager - reference).norm(), (variant - reference).norm()
    # float32 rounding, amplified by the steps (3e-3 of the distance moved for the tiny ResNet-18 on the CPU): the
    # runs follow the float64 trajectory, the comparison below is between runs on one path
    assert 0 < eager_error < 0.1 * moved, (eager_error, moved)
    assert variant_error <= 2 * eager_error + 1e-12 * moved, (config.step_variant, variant_error, eager_error)
    ulp = 2**-23 * reference_sums.abs().max()  # the sums are float32
    sums_error = (variant_sums - reference_sums).abs().max()
    assert sums_error <= 2 * (eager_sums - reference_sums).abs().max() + ulp, sums_error
