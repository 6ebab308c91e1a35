"""empssl bench predict: the kernels, FLOPs and bytes of a step counted on the CPU, their extrapolation to the recipe's
patches, and the roofline that turns them into a predicted epoch."""

import dataclasses

import pytest
import torch

from empssl.bench import predict as P
from empssl.config import TrainConfig

TINY = dict(width=0.125, hidden_dim=64, z_dim=32)


def _recorded(fn):
    recorder = P._KernelRecorder()
    with recorder:
        fn()
    return recorder.kernels


def test_each_op_is_one_kernel_reading_its_inputs_and_writing_its_outputs():
    generator = torch.Generator().manual_seed(torch.seed())
    a, b = torch.randn(64, 32, generator=generator), torch.randn(32, 16, generator=generator)
    row = torch.randn(1, 16, generator=generator).expand(64, 16)  # broadcast: its 16 values read once
    kernels = _recorded(lambda: (a @ b).relu_().add(row))
    assert [k.name for k in kernels] == ["mm", "relu_", "add"]
    mm, relu, add = kernels
    assert mm.matmul and mm.flops == 2 * 64 * 32 * 16 and mm.bytes == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    assert not relu.matmul and relu.flops == 0 and relu.bytes == 4 * 2 * 64 * 16  # in place: read and written
    assert add.bytes == 4 * (64 * 16 + 16 + 64 * 16)


def test_an_op_writing_its_arguments_counts_them_as_written():
    """By the op's schema: a foreach op in place (it returns nothing) reads and writes its tensors, an out= one
    writes its out tensor without reading it."""
    a, b = [torch.randn(1000) for _ in range(3)], [torch.randn(1000) for _ in range(3)]
    (foreach,) = _recorded(lambda: torch._foreach_add_(a, b))
    assert foreach.bytes == 4 * 3 * 1000 * 3  # a read, b read, a written
    x, y, out = torch.randn(1000), torch.randn(1000), torch.empty(1000)
    (add,) = _recorded(lambda: torch.add(x, y, out=out))
    assert add.bytes == 4 * 1000 * 3 and not add.custom


def test_batchnorm_in_training_passes_over_its_input_twice():
    norm = torch.nn.BatchNorm2d(8).train()
    x = torch.randn(4, 8, 6, 6, requires_grad=True)
    kernels = _recorded(lambda: norm(x).square().sum().backward())  # a dense gradient reaches the BatchNorm
    forward = next(k for k in kernels if k.name in P.BATCH_NORM_FORWARD)
    backward = next(k for k in kernels if k.name in P.BATCH_NORM_BACKWARD)
    activation = x.numel() * 4
    assert forward.bytes >= 3 * activation  # read for the statistics, read again to normalise, write
    assert backward.bytes >= 5 * activation  # dy and x twice each, dx once


@pytest.mark.slow  # three steps of the recipe's model on the CPU: ~5 s
def test_counts_extrapolate_exactly_in_the_patches_outside_the_loss():
    """Counted at 4 and 8 patches, extrapolated to 12: every kernel of the augmentation, forward, backward and
    optimiser is what a step of 12 patches counts (the loss's b x b terms are not linear, and are a few kB)."""
    config = dataclasses.replace(TrainConfig(), **TINY)
    small, large, direct = (P.count_eager_step(config, b, 2) for b in (2, 4, 6))
    extrapolated = P.extrapolated_kernels((small, large), (4, 8), 12)
    assert [k.name for k in extrapolated] == [k.name for k in direct]
    for guess, truth in zip(extrapolated, direct):
        if guess.phase != "empssl.loss":
            assert (guess.flops, guess.bytes) == pytest.approx((truth.flops, truth.bytes), rel=1e-9), guess.name
    custom = [k.name for k in direct if k.custom]
    assert custom == [k.name for k in extrapolated if k.custom] == ["augment_patches", "tcr_forward_backward"]
    phases = {k.phase for k in direct}
    assert phases == {f"empssl.{p}" for p in ("augment", "forward", "loss", "backward", "optimizer")}
    assert sum(k.flops for k in direct if k.matmul) > 0.99 * sum(k.flops for k in direct)


def test_the_roofline_and_the_launches_of_each_variant():
    rates = P.Rates(
        flops=1e12, bandwidth=1e9, host_seconds=1e-3, graph_gap=1e-4, matmul_efficiency=0.5, memory_efficiency=0.5
    )
    kernels = [P.Kernel("f", "conv", 2e9, 1e6, True), P.Kernel("f", "relu", 0.0, 3e6, False)]
    # at the peaks: conv max(2 ms, 1 ms) + relu 3 ms = 5 ms; at the efficiencies: 4 + 6 = 10 ms
    assert rates.seconds(kernels, efficient=False) == pytest.approx(5e-3)
    assert rates.seconds(kernels, efficient=True) == pytest.approx(10e-3)
    captured = P.predict("captured", kernels, rates)
    assert (captured.floor, captured.expected) == pytest.approx((5.2e-3, 10.2e-3)) and not captured.host_bound
    assert P.predict("eager", kernels, rates) == dataclasses.replace(captured, variant="eager")  # device-bound
    slow_host = dataclasses.replace(rates, host_seconds=20e-3)  # the host issues 2 kernels slower than they run
    eager = P.predict("eager", kernels, slow_host)
    assert eager.expected == pytest.approx(40e-3) and eager.host_bound
    assert (captured.kernels, captured.flops, captured.bytes) == (2, 2e9, 4e6)


def test_the_compiled_step_keeps_the_eager_matmuls_and_ops_outside_its_region():
    eager = [
        P.Kernel("empssl.augment", "augment", 0.0, 5.0, False),
        P.Kernel("empssl.forward", "convolution", 9.0, 7.0, True),
        P.Kernel("empssl.forward", "relu", 0.0, 4.0, False),
        P.Kernel("empssl.loss", "tcr_forward_backward", 0.0, 3.0, False, custom=True),  # extern to Inductor too
        P.Kernel("empssl.backward", "convolution_backward", 18.0, 9.0, True),
        P.Kernel("empssl.optimizer", "_foreach_add_", 0.0, 6.0, False),
    ]
    compiled = P.compiled_kernels(eager, [(True, 7.0), (False, 2.0), (True, 9.0), (False, 3.0)])
    assert [k.name for k in compiled] == [
        "augment",
        "_foreach_add_",
        "convolution",
        "tcr_forward_backward",
        "convolution_backward",
        "fused",
        "fused",
    ]
    assert [k.bytes for k in compiled if k.name == "fused"] == [2.0, 3.0]


@pytest.mark.slow  # an Inductor compile on the CPU: ~10 s
def test_inductor_kernels_of_a_conv_block_fuse_its_batchnorm_and_relu():
    """Inductor's scheduled kernels of conv -> BatchNorm (training) -> ReLU and their backward: the convolutions are
    extern (cuDNN/cuBLAS on a GPU), and the BatchNorm and ReLU passes fuse into fewer kernels than eager launches."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU()).train()
    x = torch.randn(4, 3, 8, 8)
    kernels = P.inductor_kernels(lambda inputs: block(inputs).square().mean(), (x,), list(block.parameters()))
    eager = _recorded(lambda: torch.autograd.grad(block(x).square().mean(), list(block.parameters())))
    extern = [nbytes for is_extern, nbytes in kernels if is_extern]
    assert len(extern) >= 2 and all(
        nbytes > 0 for is_extern, nbytes in kernels if not is_extern
    )  # the conv, its backward
    assert len(kernels) < len(eager)
