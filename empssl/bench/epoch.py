"""One EMP-SSL epoch and its evaluation: free-running steps of each step variant against the published path.

Times ``empssl.training.step.train_step`` as ``empssl train`` runs it, steps back to back with no
synchronisation between them (the device queue stays full; CUDA events around >= 100 steps on a
GPU), and extrapolates a CIFAR-10 epoch (50,000 images at batch 100: 500 steps). The step variants
(``--step-variant`` of ``empssl train``, docs/training.md section 6), timed side by side so that the
default can be chosen by measurement:
  eager                  op by op
  captured               (CUDA) recorded once as a CUDA graph and replayed: the default of ``empssl train``
  compiled               torch.compile of the encoder's forward and the loss (Inductor fuses BatchNorm, ReLU
                         and the residual add), the rest eager
  compiled-captured      (CUDA) both
  published              the authors' path on the same synthetic CIFAR-shaped data and model
                         (empssl.bench.published): PIL augmentation in DataLoader workers, float32 NCHW, the
                         d x d logdet loop, under torch's TF32 defaults as the authors ran it (the speed-up's
                         baseline); on CUDA also a row with TF32 off, labelled
Each step row is written the moment it is timed; its profile follows as rows of its own: kernels per
step (CUDA: profiled device kernels; CPU: aten ops dispatched) with host syncs per step in the note
(CUDA: torch.cuda.set_sync_debug_mode warnings), and for the eager step the "share" rows:
augmentation / forward / loss / backward / optimiser of one profiled step (their ``record_function``
markers; device time on CUDA). The evaluation rows (empssl.bench.evaluation) come last. The limit
is the dense bf16 (GPU) or float32 (CPU) matmul rate measured in the same run, against 3x the
forward's FLOPs. Each row stands on its own: an error in one (a failed capture or compile, out of
memory) is written as that row's error and the next row runs. The first lines name the backends the
step runs (augmentation, loss).

  empssl bench epoch                                  # GPU: b=100, n=20, ResNet-18 (the 1-epoch recipe), bf16
  empssl bench epoch --variants compiled,compiled-captured --parts steps --steps 50   # the compiled rows alone
  empssl bench epoch --quick                          # CPU-sized: width 0.25, b=16, n=4 (about a minute on 2 cores)
  empssl bench epoch --tiny                           # seconds: checks the script, not the speed
"""

from __future__ import annotations

import dataclasses
import functools
import os
import warnings
from typing import Callable, Dict, List, Optional

import torch

from .. import backends
from ..augment.config import augment_config_for
from ..augment.params import NUM_PARAMS
from ..config import STEP_VARIANTS, TrainConfig
from ..device import autocast_context, cudnn_benchmark, float32_precision
from ..ops.augment import KernelConfig
from ..training.step import CAPTURE_WARMUP_STEPS, TrainState, build_train_state, captured_train_step, train_step
from . import common
from .evaluation import synthetic_images, time_evaluation
from .published import TF32_OFF, TORCH_DEFAULT_TF32, tf32_label, time_published
from .step import forward_flops

EPOCH_STEPS = 500  # CIFAR-10: 50,000 train images at batch 100
NUM_IMAGES = 1000  # synthetic uint8 images the batches are drawn from
PHASES = ("augment", "forward", "loss", "backward", "optimizer")  # train_step's record_function markers
PARTS = ("steps", "published", "evaluation")
CUDA_ONLY_VARIANTS = ("captured", "compiled-captured")  # off CUDA they would time the eager step again

# per size: the model and batch; published-path steps and DataLoader workers; the evaluation's
# feature images x patches, probe train/test features and epochs, kNN train/test features
SIZES = {
    "tiny": dict(
        model=dict(width=0.125, hidden_dim=64, z_dim=32, batch_size=4, num_patches=2),
        steps=2,
        repeats=1,
        published_steps=2,
        workers=1,
        feature_images=8,
        feature_patches=4,
        probe=(500, 100, 1),
        knn=(500, 100),
    ),
    "quick": dict(
        model=dict(width=0.25, hidden_dim=512, z_dim=128, batch_size=16, num_patches=4),
        steps=3,
        repeats=2,
        published_steps=3,
        workers=2,
        feature_images=32,
        feature_patches=16,
        probe=(5000, 1000, 2),
        knn=(5000, 1000),
    ),
    "gpu": dict(
        model=dict(width=1.0, hidden_dim=4096, z_dim=1024, batch_size=100, num_patches=20),
        steps=100,
        repeats=2,
        published_steps=10,
        workers=None,
        feature_images=1024,
        feature_patches=128,
        probe=(50000, 10000, 100),
        knn=(50000, 10000),
    ),
}


def count_kernels(fn: Callable[[], object], device: torch.device) -> int:
    """Device kernels (CUDA: profiled, copies and memsets included) or, on a CPU, aten ops dispatched by one
    ``fn()``."""
    if device.type == "cuda":
        from torch.autograd import DeviceType
        from torch.profiler import ProfilerActivity, profile

        torch.cuda.synchronize(device)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        return sum(1 for event in prof.events() if event.device_type == DeviceType.CUDA)
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            _Count.ops += 1
            return func(*args, **(kwargs or {}))

    with _Count():
        fn()
    return _Count.ops


def count_host_syncs(fn: Callable[[], object], device: torch.device, calls: int = 3) -> Optional[float]:
    """Host synchronisations per ``fn()`` that torch.cuda.set_sync_debug_mode("warn") reports; None off CUDA."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(calls):
                fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize(device)
    return sum("synchroniz" in str(w.message) for w in caught) / calls


def phase_seconds(fn: Callable[[], object], device: torch.device) -> Dict[str, float]:
    """Seconds of each ``empssl.<phase>`` record_function range in one profiled ``fn()`` (device time on CUDA)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    common.synchronize(device)
    with profile(activities=activities) as prof:
        fn()
        common.synchronize(device)
    totals = {event.key: event for event in prof.key_averages()}
    seconds = {}
    for phase in PHASES:
        event = totals.get(f"empssl.{phase}")
        micros = 0.0 if event is None else (event.device_time_total if device.type == "cuda" else event.cpu_time_total)
        seconds[phase] = micros / 1e6
    return seconds


@dataclasses.dataclass
class VariantRun:
    """A step variant ready to run free: ``one_step(index)`` runs step ``index`` of the prepared batches."""

    state: TrainState
    one_step: Callable[[int], object]
    steps: int


def prepare_variant(device: torch.device, config: TrainConfig, variant: str, steps: int, images) -> VariantRun:
    """The state of ``variant`` and its step, warmed up as train() runs it: the captured runner's eager steps and
    its capture, cuDNN's algorithm search, the compilation."""
    generator = torch.Generator(device=device).manual_seed(0)
    state = build_train_state(dataclasses.replace(config, step_variant=variant), device, NUM_IMAGES, 32)
    state.encoder.train()
    captured = device.type == "cuda" and variant in CUDA_ONLY_VARIANTS
    run = captured_train_step(state) if captured else functools.partial(train_step, state)
    batches = [
        torch.randperm(NUM_IMAGES, device=device, generator=generator)[: config.batch_size] for _ in range(steps)
    ]

    def one_step(index=0):
        image_ids = batches[index % steps]
        run(images[image_ids], image_ids)

    for index in range(CAPTURE_WARMUP_STEPS + 2 if device.type == "cuda" else 1):
        one_step(index)
    return VariantRun(state, one_step, steps)


def step_flops(state: TrainState, images, config: TrainConfig) -> int:
    """FLOPs of one step's convolutions and linear layers: 3x the forward's (input and weight gradients)."""
    ids = torch.arange(config.batch_size, device=images.device)
    patches = state.augment(images[ids], config.num_patches, seed=0, image_ids=ids)
    with autocast_context(images.device, state.bf16):
        return 3 * forward_flops(state.encoder, patches)


def step_backends(config: TrainConfig, device: torch.device, image_size: int = 32) -> Dict[str, str]:
    """{op: backend} the step of ``config`` will run on ``device``: the dispatcher's choice for the step's inputs
    (uint8 NHWC images, the float32 embeddings the loss takes), before anything runs."""
    patches = config.batch_size * config.num_patches
    images = torch.empty(config.batch_size, image_size, image_size, 3, dtype=torch.uint8, device=device)
    augment_inputs = (
        images,
        torch.empty(patches, dtype=torch.int64, device=device),
        torch.empty(patches, NUM_PARAMS, device=device),
        KernelConfig.of(augment_config_for(image_size)),
    )
    z = torch.empty(config.num_patches, config.batch_size, config.z_dim, device=device)
    chosen = {}
    for op, requested, inputs in (
        ("augment", config.augment_backend, augment_inputs),
        ("tcr", config.loss_backend, (z,)),
    ):
        try:
            chosen[op] = backends.select_backend(op, requested, device, *inputs)
        except backends.BackendUnavailableError as err:
            chosen[op] = f"none ({err})"
    return chosen


def _backends_line(chosen: Dict[str, str]) -> str:
    return ", ".join(f"{op} {name}" for op, name in chosen.items())


class EpochBench:
    """The rows of one ``empssl bench epoch`` run, in their order (each written the moment it is measured)."""

    def __init__(self, args, results: common.Results, device: torch.device):
        self.args, self.results, self.device = args, results, device
        self.on_gpu = device.type == "cuda"
        self.size = SIZES["tiny" if args.tiny else "quick" if args.quick or not self.on_gpu else "gpu"]
        self.config = dataclasses.replace(TrainConfig(), **self.size["model"], device=str(device), progress=False)
        self.steps = args.steps or self.size["steps"]
        self.dtype = "bf16" if self.on_gpu else "float32"
        self.matmul_dtype = torch.bfloat16 if self.on_gpu else torch.float32
        self.peak = common.matmul_rate(device, self.matmul_dtype, size=256 if args.tiny else None)
        self.limit = f"{str(self.matmul_dtype)[6:]} matmul"
        self.case = f"b={self.config.batch_size} n={self.config.num_patches} {self.config.arch} w{self.config.width}"
        self.images = synthetic_images(device, torch.Generator(device=device).manual_seed(0), NUM_IMAGES)
        self.fastest: Optional[float] = None  # seconds per step of the fastest variant timed
        self.flops: Optional[int] = None  # per step

    def variant_row(self, variant: str) -> None:
        """The variant's row as soon as it is timed, then its profile rows."""
        config, results, device = self.config, self.results, self.device
        timed = False
        with results.row(self.case, variant, self.dtype):
            with cudnn_benchmark(self.on_gpu):  # as train() runs the step
                prepared = prepare_variant(device, config, variant, self.steps, self.images)

                def run_steps():
                    for index in range(prepared.steps):
                        prepared.one_step(index)

                seconds = common.time_call(run_steps, device, repeats=self.size["repeats"], warmup=0) / self.steps
            self.flops = self.flops or step_flops(prepared.state, self.images, config)
            self.fastest = min(seconds, self.fastest or seconds)
            results.add(
                self.case,
                variant,
                seconds,
                1.0 / seconds,
                "steps/s",
                self.dtype,
                self.flops / seconds / self.peak,
                self.limit,
                f"CIFAR-10 epoch ({EPOCH_STEPS} steps) {common.readable_seconds(EPOCH_STEPS * seconds)}; "
                f"{self.flops / seconds / 1e12:.3g} TFLOP/s",
            )
            timed = True
        if not timed:  # the row failed (capture, compile, out of memory): its error is written, nothing to profile
            return
        if not self.on_gpu and variant != "eager":  # a dispatch-mode op counter cannot run inside a compiled graph
            results.note(f"{variant}: no kernels row off CUDA (its kernels are Inductor's: empssl bench predict)")
            return
        with results.row(self.case, f"{variant}: kernels per step", self.dtype), cudnn_benchmark(self.on_gpu):
            kernels = count_kernels(prepared.one_step, device)
            syncs = count_host_syncs(prepared.one_step, device)
            results.add(
                self.case,
                f"{variant}: kernels per step",
                seconds,
                kernels,
                "kernels/step" if self.on_gpu else "aten ops/step",
                self.dtype,
                note=f"host syncs/step {'n/a off CUDA' if syncs is None else f'{syncs:g}'}; the step's time again",
            )
            phases = phase_seconds(prepared.one_step, device) if variant == "eager" else {}
            profiled = sum(phases.values())
            for phase, phase_time in phases.items():
                results.add(
                    self.case,
                    f"share {phase} (eager, profiled)",
                    phase_time,
                    phase_time / profiled if profiled else 0.0,
                    "of step",
                    self.dtype,
                    note="one profiled step; device time" if self.on_gpu else "one profiled step",
                )

    def published_rows(self) -> None:
        """The authors' path under torch's TF32 defaults (the speed-up's baseline), and on CUDA with TF32 off."""
        workers = self.args.workers or self.size["workers"] or min(8, os.cpu_count() or 1)
        images = self.images.cpu().numpy()
        for tf32 in (TORCH_DEFAULT_TF32, TF32_OFF) if self.on_gpu else (TORCH_DEFAULT_TF32,):
            method = f"published ({tf32_label(tf32)})"
            with self.results.row(self.case, method, "float32"):
                try:
                    published = time_published(
                        self.device, self.config, self.size["published_steps"], workers, images, tf32
                    )
                except ImportError as err:
                    self.results.note(f"no published-path row: it needs PIL and torchvision ({err})")
                    return
                if self.fastest is None:
                    speed_up = "no step row above to compare with"
                elif tf32 == TORCH_DEFAULT_TF32:
                    speed_up = f"the speed-up: the fastest step above is {published / self.fastest:.3g}x faster"
                else:
                    ratio = published / self.fastest
                    speed_up = f"not the speed-up's baseline (the authors ran TF32 convolutions): {ratio:.3g}x"
                self.results.add(
                    self.case,
                    method,
                    published,
                    1.0 / published,
                    "steps/s",
                    "float32",
                    self.flops / published / self.peak if self.flops else None,
                    self.limit,
                    f"CIFAR-10 epoch ({EPOCH_STEPS} steps) {common.readable_seconds(EPOCH_STEPS * published)}; "
                    f"PIL in {workers} DataLoader workers, float32 NCHW, d x d logdet loop; {speed_up}",
                )


def _variant_list(text: str) -> List[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    if text.strip() == "all":
        return list(STEP_VARIANTS)
    unknown = [name for name in names if name not in STEP_VARIANTS]
    if unknown or not names:
        raise ValueError(
            f"--variants takes a comma-separated list of {', '.join(STEP_VARIANTS)} (or all), got {text!r}"
        )
    return names


def main(argv=None) -> int:
    parser = common.make_parser("epoch", __doc__)
    parser.add_argument("--steps", type=int, default=None, help="free-running steps per timed run")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the published path")
    parser.add_argument(
        "--variants",
        default=None,
        help=f"step variants to time, comma-separated ({', '.join(STEP_VARIANTS)}, or all; default: eager,captured "
        "on CUDA, eager elsewhere); the captured ones need CUDA",
    )
    parser.add_argument(
        "--parts",
        default=",".join(PARTS),
        help=f"which rows, comma-separated: {', '.join(PARTS)} (default all; bench/gpu_check.sh times the compiled "
        "variants in its second call with --parts steps)",
    )
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    try:
        variants = _variant_list(args.variants or ("eager,captured" if device.type == "cuda" else "eager"))
        parts = [part.strip() for part in args.parts.split(",") if part.strip()]
        if not parts or set(parts) - set(PARTS):
            raise ValueError(f"--parts takes a comma-separated list of {', '.join(PARTS)}, got {args.parts!r}")
    except ValueError as err:
        parser.error(str(err))
    results = common.open_results("epoch", args)
    bench = EpochBench(args, results, device)
    results.note(f"backends the step will run on {device.type}: {_backends_line(step_backends(bench.config, device))}")
    results.note(f"dense {bench.limit} rate {bench.peak / 1e12:.3g} TFLOP/s")
    skipped = [v for v in variants if v in CUDA_ONLY_VARIANTS and not bench.on_gpu]
    if skipped:
        results.note(f"{', '.join(skipped)}: the captured variants need a CUDA GPU; not timed here")
    with float32_precision(bench.config.tf32):  # as train() runs the step
        if "steps" in parts:
            for variant in variants:
                if variant not in skipped:
                    bench.variant_row(variant)
            ran = backends.resolved_on(device.type)
            results.note("backends the steps ran: " + ", ".join(f"{op} {'/'.join(n)}" for op, n in sorted(ran.items())))
        if "published" in parts:
            bench.published_rows()
        if "evaluation" in parts:
            case = f"eval {bench.config.arch} w{bench.config.width} d={bench.config.hidden_dim}"
            with results.row(case, "evaluation"):
                time_evaluation(device, bench.config, bench.size, results, bench.peak, bench.matmul_dtype)
    return common.finish(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
