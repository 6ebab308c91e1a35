"""The epoch each step variant should take on a GPU, predicted from what one training step launches and moves,
counted on the CPU (no GPU needed): kernels, FLOPs and bytes read and written per step.

How it counts (docs/benchmarks.md section 6):
  eager, captured        every aten op ``train_step`` dispatches (a TorchDispatchMode), run on the CPU with the GPU's
                         precision and layout (bf16 autocast, bf16 channels_last patches): each op one kernel that
                         reads its tensor inputs and writes its outputs and the arguments its schema marks as
                         written once (an in-place op, a foreach one too, reads and writes);
                         BatchNorm in training passes over its input twice, forward and backward (statistics, then
                         normalise), as cuDNN's does; FLOPs from torch.utils.flop_counter.
  compiled,              the kernels Inductor schedules for forward and loss, and for their backward (its fused
  compiled-captured      nodes after fusion, each reading and writing its buffers once; the CPU backend's fusion),
                         with the kernels it leaves extern taken from the eager count (the convolutions and matmuls
                         for cuDNN/cuBLAS, the custom ops: the fused loss), plus the eager augmentation and optimiser
                         ops outside the compiled region.
Counted at two small batches of the recipe's model and extrapolated linearly in the patches to the recipe's step
(activations grow with the patches; weights, gradients and the optimiser's tensors do not).

The prediction per kernel is its roofline, max(FLOPs / peak, bytes / bandwidth), summed over the step: a floor at
the given rates. Launches: eager steps are issued by the host one op at a time (``--host-us`` per kernel: the step
takes the longer of the host's and the device's time); back to back on the device, captured or not, each kernel
adds a gap of ``--graph-gap-us``. A second estimate assumes convolutions and matmuls at ``--matmul-efficiency``
of the peak and memory-bound kernels at ``--memory-efficiency`` of the bandwidth. Defaults: an H100 80GB as
measured on a lent one (798 TFLOP/s bf16 dense matmul, 3.0 TB/s device-to-device copy). A last row is a bound,
not a variant: the step with only the convolutions' own passes over memory (every BatchNorm, ReLU and add pass
fused into them).

  empssl bench predict                 # the recipe (b=100, n=20, ResNet-18), every variant; ~3 min on 2 CPU cores
  empssl bench predict --no-compiled   # eager and captured only (no Inductor compile): seconds
"""

from __future__ import annotations

import dataclasses
from typing import Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..config import STEP_VARIANTS, TrainConfig
from ..training.step import build_train_state, forward_and_loss, train_step
from . import common

EPOCH_STEPS = 500  # CIFAR-10: 50,000 train images at batch 100
COUNTED_AT = ((4, 2), (8, 2))  # (images, patches per image) of the two counted steps
NO_KERNEL = {"empty", "empty_like", "empty_strided", "detach", "_record_function_enter_new", "_record_function_exit"}
BATCH_NORM_FORWARD = {"native_batch_norm", "_native_batch_norm_legit", "_native_batch_norm_legit_functional"}
BATCH_NORM_BACKWARD = {"native_batch_norm_backward"}
COMPILED_PHASES = ("empssl.forward", "empssl.loss", "empssl.backward")  # what --step-variant compiled replaces


@dataclasses.dataclass
class Kernel:
    """One kernel of a step: where it runs, what it computes and moves."""

    phase: str
    name: str
    flops: float
    bytes: float
    matmul: bool  # a convolution or matmul (cuDNN/cuBLAS): FLOPs at the matmul peak
    custom: bool = False  # a custom op (not aten's: the fused loss), which Inductor calls as it is


def _unique_bytes(tensor: torch.Tensor) -> int:
    """Bytes a kernel touches of ``tensor``: broadcast (stride-0) dimensions once."""
    elements = 1
    for size, stride in zip(tensor.shape, tensor.stride()):
        if stride != 0:
            elements *= size
    return elements * tensor.element_size()


class _KernelRecorder(TorchDispatchMode):
    """Records each computing op as a Kernel, its phase named by the step's record_function markers."""

    def __init__(self):
        super().__init__()
        self.kernels: List[Kernel] = []
        self.phase = "outside a phase"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.utils.flop_counter import flop_registry

        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = str(func.overloadpacket.__name__)
        if name == "_record_function_enter_new" and str(args[0]).startswith("empssl."):
            self.phase = str(args[0])
        if func.is_view or name in NO_KERNEL:
            return out
        inputs, written = _tensor_arguments(func, args, kwargs)
        # the outputs not already counted as a written argument (an in-place op returns its own argument)
        in_place = {(t.data_ptr(), t.shape, t.stride()) for t in written}
        outputs = [t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]
        fresh = [t for t in outputs if (t.data_ptr(), t.shape, t.stride()) not in in_place]
        moved = sum(_unique_bytes(t) for t in inputs + written + fresh)
        if name in BATCH_NORM_FORWARD:  # statistics, then normalise: the input twice
            moved += _unique_bytes(inputs[0])
        elif name in BATCH_NORM_BACKWARD:  # the reductions, then the input gradient: dy and x twice
            moved += _unique_bytes(inputs[0]) + _unique_bytes(inputs[1])
        packet = func.overloadpacket
        flops = flop_registry[packet](*args, **kwargs, out_val=out) if packet in flop_registry else 0
        custom = func.namespace != "aten"
        self.kernels.append(Kernel(self.phase, name, float(flops), float(moved), packet in flop_registry, custom))
        return out


def _tensor_arguments(func, args, kwargs) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
    """(the tensors ``func`` reads, the tensors it writes in place): by its schema, an argument marked as written
    (``Tensor(a!)``, ``Tensor(a!)[]``) is written, and read too unless it is an ``out=`` argument."""
    read, written = [], []
    for index, argument in enumerate(func._schema.arguments):
        value = args[index] if index < len(args) and not argument.kwarg_only else kwargs.get(argument.name)
        tensors = [t for t in torch.utils._pytree.tree_leaves(value) if isinstance(t, torch.Tensor)]
        is_written = argument.alias_info is not None and argument.alias_info.is_write
        if is_written:
            written += tensors
        if not (is_written and argument.is_out):
            read += tensors
    return read, written


def _counting_state(config: TrainConfig, batch_size: int, num_patches: int):
    """The recipe's state on the CPU with the GPU's precision and layout, and one step's batch."""
    cpu = dataclasses.replace(
        config, device="cpu", batch_size=batch_size, num_patches=num_patches, channels_last=True, step_variant="eager"
    )
    state = build_train_state(cpu, torch.device("cpu"), 1000, 32)
    state.bf16 = True  # as on CUDA: bf16 autocast, bf16 patches
    state.augment.out_dtype = torch.bfloat16
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch_size, 32, 32, 3), dtype=torch.uint8, generator=generator)
    return state, images, torch.arange(batch_size)


def count_eager_step(config: TrainConfig, batch_size: int, num_patches: int) -> List[Kernel]:
    """The kernels of one eager step (after a first one: the momentum buffers exist)."""
    state, images, ids = _counting_state(config, batch_size, num_patches)
    train_step(state, images, ids)
    recorder = _KernelRecorder()
    with recorder:
        train_step(state, images, ids)
    return recorder.kernels


def inductor_kernels(function, args, params) -> List[Tuple[bool, float]]:
    """(extern, bytes) of every kernel Inductor schedules for ``function(*args)`` (a loss, or a tuple led by one)
    and for its gradient with respect to ``params``, compiled on the CPU: extern kernels are the ones it calls as
    they are (convolutions and matmuls for cuDNN/cuBLAS, custom ops); every other one reads and writes its buffers
    once."""
    import torch._inductor.config as inductor_config

    kernels: List[Tuple[bool, float]] = []

    def record(nodes):
        for node in nodes:
            extern = type(node).__name__ == "ExternKernelSchedulerNode"
            kernels.append((extern, float(node.get_read_write_buffers_sizes())))
        return nodes

    torch._dynamo.reset()
    try:
        with inductor_config.patch({"_post_fusion_custom_pass": record, "fx_graph_cache": False}):
            out = torch.compile(function, fullgraph=True)(*args)
            torch.autograd.grad(out[0] if isinstance(out, tuple) else out, params)
    finally:
        torch._dynamo.reset()
    return kernels


def count_compiled_graphs(config: TrainConfig, batch_size: int, num_patches: int) -> List[Tuple[bool, float]]:
    """``inductor_kernels`` of the step's compiled region (forward_and_loss, what --step-variant compiled compiles)."""
    state, images, ids = _counting_state(config, batch_size, num_patches)
    patches = state.augment(images, num_patches, seed=0, step=state.step, image_ids=ids)
    return inductor_kernels(forward_and_loss, (state, patches, batch_size), list(state.encoder.parameters()))


def _extrapolate(small: float, large: float, patches: Tuple[int, int], target: int) -> float:
    """Linear in the patches through the two counts (the fixed part: weights, gradients, the optimiser)."""
    slope = (large - small) / (patches[1] - patches[0])
    return max(0.0, small + slope * (target - patches[0]))


def extrapolated_kernels(counts: Tuple[List[Kernel], List[Kernel]], patches, target: int) -> List[Kernel]:
    small, large = counts
    if [k.name for k in small] != [k.name for k in large]:
        raise RuntimeError("the two counted steps launched different ops: the step is not the same at both sizes")
    return [
        dataclasses.replace(
            a,
            flops=_extrapolate(a.flops, b.flops, patches, target),
            bytes=_extrapolate(a.bytes, b.bytes, patches, target),
        )
        for a, b in zip(small, large)
    ]


@dataclasses.dataclass
class Rates:
    flops: float = 798e12  # bf16 dense matmul, FLOP/s
    bandwidth: float = 3.0e12  # device copy, bytes read + written per second
    host_seconds: float = 5e-6  # per kernel an eager step issues
    graph_gap: float = 1e-6  # per kernel a replayed CUDA graph runs
    matmul_efficiency: float = 0.5
    memory_efficiency: float = 0.7

    def seconds(self, kernels: List[Kernel], efficient: bool) -> float:
        """The step's device time: each kernel's roofline, at the peaks or at the stated efficiencies."""
        compute = self.flops * (self.matmul_efficiency if efficient else 1.0)
        memory = self.bandwidth * (self.memory_efficiency if efficient else 1.0)
        return sum(max(k.flops / compute if k.matmul else 0.0, k.bytes / memory) for k in kernels)


@dataclasses.dataclass
class Prediction:
    variant: str
    kernels: int
    flops: float
    bytes: float
    floor: float  # seconds per step at the peaks
    expected: float  # at the stated efficiencies
    host_bound: bool


def predict(variant: str, kernels: List[Kernel], rates: Rates) -> Prediction:
    captured = variant in ("captured", "compiled-captured")
    times = []
    for efficient in (False, True):
        device = rates.seconds(kernels, efficient)
        queued = device + len(kernels) * rates.graph_gap  # back to back on the stream, whoever issued them
        times.append(queued if captured else max(queued, len(kernels) * rates.host_seconds))
    host_bound = not captured and len(kernels) * rates.host_seconds > queued  # the expected device time
    flops = sum(k.flops for k in kernels)
    return Prediction(variant, len(kernels), flops, sum(k.bytes for k in kernels), times[0], times[1], host_bound)


def compiled_kernels(eager: List[Kernel], graphs: List[Tuple[bool, float]]) -> List[Kernel]:
    """The compiled step: the eager ops outside the compiled region, the eager kernels Inductor calls as they are
    (its extern kernels: convolutions and matmuls for cuDNN/cuBLAS, the custom ops such as the fused loss), and
    Inductor's own kernels, memory-bound."""
    outside = [k for k in eager if k.phase not in COMPILED_PHASES]
    called = [k for k in eager if k.phase in COMPILED_PHASES and (k.matmul or k.custom)]
    fused = [Kernel("inductor", "fused", 0.0, nbytes, False) for extern, nbytes in graphs if not extern]
    return outside + called + fused


def main(argv=None) -> int:
    parser = common.make_parser("predict", __doc__)
    defaults = Rates()
    parser.add_argument("--tflops", type=float, default=defaults.flops / 1e12, help="bf16 matmul peak, TFLOP/s")
    parser.add_argument("--bandwidth", type=float, default=defaults.bandwidth / 1e12, help="memory bandwidth, TB/s")
    parser.add_argument("--host-us", type=float, default=defaults.host_seconds * 1e6, help="host time per eager kernel")
    parser.add_argument(
        "--graph-gap-us", type=float, default=defaults.graph_gap * 1e6, help="gap per kernel run back to back"
    )
    parser.add_argument("--matmul-efficiency", type=float, default=defaults.matmul_efficiency)
    parser.add_argument("--memory-efficiency", type=float, default=defaults.memory_efficiency)
    parser.add_argument("--no-compiled", action="store_true", help="eager and captured only (no Inductor compile)")
    args = parser.parse_args(argv)
    args.device = "cpu"  # counted on the CPU whatever is present
    rates = Rates(
        args.tflops * 1e12,
        args.bandwidth * 1e12,
        args.host_us * 1e-6,
        args.graph_gap_us * 1e-6,
        args.matmul_efficiency,
        args.memory_efficiency,
    )
    config = TrainConfig()
    if args.tiny:
        config = dataclasses.replace(config, width=0.125, hidden_dim=64, z_dim=32)
    target = config.batch_size * config.num_patches
    patches = tuple(b * n for b, n in COUNTED_AT)
    results = common.open_results("predict", args)
    results.note(
        f"counted on the CPU at {patches[0]} and {patches[1]} patches, extrapolated to {target}; rates "
        f"{rates.flops / 1e12:.0f} TFLOP/s, {rates.bandwidth / 1e12:.2g} TB/s, {rates.host_seconds * 1e6:g} us per "
        f"eager kernel, {rates.graph_gap * 1e6:g} us per replayed kernel; expected at {rates.matmul_efficiency:.0%} of "
        f"the matmul peak and {rates.memory_efficiency:.0%} of the bandwidth"
    )
    eager = extrapolated_kernels(tuple(count_eager_step(config, b, n) for b, n in COUNTED_AT), patches, target)
    kernels: Dict[str, List[Kernel]] = {"eager": eager, "captured": eager}
    if not args.no_compiled:
        graphs = [count_compiled_graphs(config, b, n) for b, n in COUNTED_AT]
        fused = [sum(nbytes for extern, nbytes in g if not extern) for g in graphs]
        counts = [sum(1 for extern, _ in g if not extern) for g in graphs]
        total = _extrapolate(fused[0], fused[1], patches, target)
        results.note(
            f"Inductor (CPU backend) scheduled {counts[0]} and {counts[1]} kernels of its own, "
            f"{sum(1 for extern, _ in graphs[0] if extern)} extern (cuDNN/cuBLAS and custom ops) at the two counted "
            "sizes"
        )
        compiled = compiled_kernels(eager, graphs[1])
        scale = total / max(1.0, sum(k.bytes for k in compiled if k.phase == "inductor"))
        compiled = [dataclasses.replace(k, bytes=k.bytes * scale) if k.phase == "inductor" else k for k in compiled]
        kernels.update({"compiled": compiled, "compiled-captured": compiled})
    # a bound, not a variant: every BatchNorm, ReLU and add pass inside the convolutions (cuDNN's fused
    # conv-statistics and normalise-ReLU prologue), the rest of the step as eager
    kernels["bound: only the convolutions' passes"] = [
        k for k in eager if k.matmul or k.phase not in ("empssl.forward", "empssl.backward")
    ]
    case = f"b={config.batch_size} n={config.num_patches} {config.arch} w{config.width}"
    for variant in [*STEP_VARIANTS, "bound: only the convolutions' passes"]:
        if variant not in kernels:
            continue
        p = predict("captured" if variant.startswith("bound") else variant, kernels[variant], rates)
        results.add(
            case,
            f"{variant} (predicted)",
            p.expected,
            1.0 / p.expected,
            "steps/s",
            "bf16",
            note=f"CIFAR-10 epoch {EPOCH_STEPS * p.expected:.3g} s expected, {EPOCH_STEPS * p.floor:.3g} s floor; "
            f"{p.kernels} kernels, {p.flops / 1e12:.3g} TFLOP, {p.bytes / 1e9:.3g} GB per step"
            + ("; host-bound" if p.host_bound else ""),
        )
    by_phase: Dict[str, Tuple[int, float]] = {}
    for k in eager:
        count, moved = by_phase.get(k.phase, (0, 0.0))
        by_phase[k.phase] = (count + 1, moved + k.bytes)
    results.note(
        "eager step by phase (kernels, GB): "
        + ", ".join(
            f"{phase[7:] if phase.startswith('empssl.') else phase} {c}, {b / 1e9:.3g}"
            for phase, (c, b) in by_phase.items()
        )
    )
    return common.finish(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
