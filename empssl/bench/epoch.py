"""One EMP-SSL epoch and its evaluation: free-running steps (eager, captured, captured + compiled) against the published
path.

Times ``empssl.training.step.train_step`` as ``empssl train`` runs it, steps back to back with no
synchronisation between them (the device queue stays full; CUDA events around >= 100 steps on a
GPU), and extrapolates a CIFAR-10 epoch (50,000 images at batch 100: 500 steps). Methods:
  eager                  ``--no-cuda-graph``
  captured               (CUDA) the default of ``empssl train``: recorded once as a CUDA graph, replayed
  captured + compiled    (CUDA) ``--compile``, then captured; run last (its compile is the slowest part),
                         or alone (``--compiled only``) or not at all (``--compiled skip``)
  published              the authors' path on the same synthetic CIFAR-shaped data and model: PIL
                         augmentation in DataLoader workers, float32 NCHW, the d x d logdet loop
Each step row's note: the extrapolated epoch, TFLOP/s, kernels per step (CUDA: profiled device
kernels; CPU: aten ops dispatched) and host syncs per step (CUDA: torch.cuda.set_sync_debug_mode
warnings). "share" rows: augmentation / forward / loss / backward / optimiser of one profiled eager
step (their ``record_function`` markers; device time on CUDA). "eval" rows: features per second of
the BatchNorm-folded extractor, the linear probe and the kNN at CIFAR-10 size (GPU; scaled down and
extrapolated on a CPU), and the extrapolated 128-patch CIFAR-10 evaluation. The limit is the dense
bf16 (GPU) or float32 (CPU) matmul rate measured in the same run, against 3x the forward's FLOPs.
Each row stands on its own: an error in one (a failed capture or compile, out of memory) is written
as that row's error and the next row runs.

  empssl bench epoch            # GPU: b=100, n=20, ResNet-18 (the 1-epoch recipe), bf16 channels_last
  empssl bench epoch --quick    # CPU-sized: width 0.25, b=16, n=4 (under a minute on 2 cores)
  empssl bench epoch --tiny     # seconds: checks the script, not the speed
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F

from ..config import TrainConfig
from ..device import autocast_context, cudnn_benchmark, float32_precision
from ..evaluation.features import MAX_PATCHES_PER_FORWARD, extract_features
from ..evaluation.probe import LabelledFeatures, knn_classify, linear_probe
from ..models.encoder import build_encoder
from ..optim import build_optimizer
from ..reference import tcr as reference_tcr
from ..training.step import CAPTURE_WARMUP_STEPS, build_train_state, captured_train_step, train_step
from . import common
from .step import forward_flops

EPOCH_STEPS = 500  # CIFAR-10: 50,000 train images at batch 100
NUM_IMAGES = 1000  # synthetic uint8 images the batches are drawn from
PHASES = ("augment", "forward", "loss", "backward", "optimizer")  # train_step's record_function markers
# the evaluation extrapolated to: CIFAR-10's 50,000 train and 10,000 test images, 128 patches, 100 probe epochs
EVAL_TRAIN, EVAL_TEST, EVAL_PATCHES, EVAL_EPOCHS = 50000, 10000, 128, 100
EVAL_CLASSES = 10

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
        feature_patches=EVAL_PATCHES,
        probe=(EVAL_TRAIN, EVAL_TEST, EVAL_EPOCHS),
        knn=(EVAL_TRAIN, EVAL_TEST),
    ),
}


def _synthetic_images(device: torch.device, generator: torch.Generator, count: int = NUM_IMAGES) -> torch.Tensor:
    return torch.randint(0, 256, (count, 32, 32, 3), dtype=torch.uint8, device=device, generator=generator)


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
class StepTiming:
    seconds: float  # median per free-running step
    forward_flops: int
    kernels: int
    host_syncs: Optional[float]
    phases: Optional[Dict[str, float]] = None


def time_steps(device: torch.device, config: TrainConfig, method: str, steps: int, repeats: int) -> StepTiming:
    """Median seconds per free-running step (``repeats`` runs of ``steps`` steps), FLOPs, kernels and syncs per step."""
    generator = torch.Generator(device=device).manual_seed(0)
    images = _synthetic_images(device, generator)
    state = build_train_state(dataclasses.replace(config, compile=method.endswith("compiled")), device, NUM_IMAGES, 32)
    state.encoder.train()
    run = (
        captured_train_step(state)
        if method.startswith("captured")
        else (lambda batch, image_ids: train_step(state, batch, image_ids))
    )
    batches = [
        torch.randperm(NUM_IMAGES, device=device, generator=generator)[: config.batch_size] for _ in range(steps)
    ]

    def one_step(index=0):
        image_ids = batches[index % steps]
        run(images[image_ids], image_ids)

    def run_steps():
        for index in range(steps):
            one_step(index)

    with cudnn_benchmark(device.type == "cuda"):  # as train() runs the step
        # warm-up: the captured runner's eager steps and its capture; cuDNN's algorithm search; compilation
        for index in range(CAPTURE_WARMUP_STEPS + 2 if device.type == "cuda" else 1):
            one_step(index)
        seconds = common.time_call(run_steps, device, repeats=repeats, warmup=0) / steps
        kernels = count_kernels(one_step, device)
        syncs = count_host_syncs(one_step, device)
        phases = phase_seconds(one_step, device) if method == "eager" else None
    patches = state.augment(images[batches[0]], config.num_patches, seed=0, image_ids=batches[0])
    with autocast_context(device, state.bf16):
        flops = forward_flops(state.encoder, patches)
    return StepTiming(seconds, flops, kernels, syncs, phases)


class _PublishedViews(torch.utils.data.Dataset):
    """The authors' data path: per image, ``num_patches`` views of the torchvision/PIL pipeline (patch-major after
    collate)."""

    def __init__(self, images, num_patches: int, length: int):
        self.images, self.num_patches, self.length = images, num_patches, length
        self.pipeline = None

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        from PIL import Image

        from .augment import pil_pipeline

        if self.pipeline is None:  # made in the worker
            self.pipeline = pil_pipeline(32)
        image = Image.fromarray(self.images[index % len(self.images)])
        return torch.stack([self.pipeline(image) for _ in range(self.num_patches)])


def published_loss(z: torch.Tensor, eps: float = 0.2, inv_coef: float = 200.0) -> torch.Tensor:
    """The authors' objective on patch-major z (n, b, d): a Python loop of d x d logdets and F.cosine_similarity."""
    tcr = -reference_tcr.coding_rate_published(z, eps).mean()
    inv = -F.cosine_similarity(z, z.mean(0, keepdim=True), dim=-1).mean()
    return tcr + inv_coef * inv


def time_published(device: torch.device, config: TrainConfig, steps: int, workers: int) -> float:
    """Seconds per step of the published path: DataLoader workers with PIL, float32 NCHW encoder, naive loss, LARS."""
    import PIL  # noqa: F401  (here, not in a worker: a missing one is an ImportError the caller reports)
    import torchvision  # noqa: F401

    torch.manual_seed(0)
    images = _synthetic_images(torch.device("cpu"), torch.Generator().manual_seed(0)).numpy()
    encoder = build_encoder(config.arch, config.width, config.hidden_dim, config.z_dim).to(device).train()
    optimizer = build_optimizer(encoder, lr=config.lr)
    warmup = 1
    views = _PublishedViews(images, config.num_patches, (warmup + steps) * config.batch_size)
    loader = torch.utils.data.DataLoader(
        views,
        batch_size=config.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=True,
        pin_memory=device.type == "cuda",
    )
    start = None
    for index, batch in enumerate(loader):  # the workers' start-up and the first step are not timed
        if index == warmup:
            common.synchronize(device)
            start = time.perf_counter()
        patches = batch.transpose(0, 1).reshape(-1, *batch.shape[2:]).to(device, non_blocking=True)
        z = encoder(patches).reshape(config.num_patches, config.batch_size, -1)
        loss = published_loss(z, config.eps, config.inv_coef)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    common.synchronize(device)
    return (time.perf_counter() - start) / steps


def time_evaluation(
    device: torch.device, config: TrainConfig, size: Dict, results: common.Results, matmul_peak: float
) -> None:
    """Rows: features/s, probe, kNN, and the 128-patch CIFAR-10 evaluation extrapolated from them."""
    generator = torch.Generator(device=device).manual_seed(0)
    torch.manual_seed(0)
    encoder = build_encoder(config.arch, config.width, config.hidden_dim, config.z_dim).to(device)
    num_images, num_patches = size["feature_images"], size["feature_patches"]
    images = _synthetic_images(device, generator, num_images)
    feature_seconds = common.time_call(
        lambda: extract_features(encoder, images, num_patches), device, repeats=1, warmup=int(device.type == "cuda")
    )  # cuDNN's algorithm search
    patch_rate = num_images * num_patches / feature_seconds
    case = f"eval {config.arch} w{config.width} d={config.hidden_dim}"
    results.add(
        case,
        f"features ({num_images} images x {num_patches} patches)",
        feature_seconds,
        num_images / feature_seconds,
        "images/s",
        "bf16" if device.type == "cuda" else "float32",
        note=f"{patch_rate:.4g} patch forwards/s; BatchNorm folded; chunks of "
        f"{MAX_PATCHES_PER_FORWARD.get(device.type, 8192)} patches",
    )
    num_train, num_test, epochs = size["probe"]
    train_x = torch.randn(num_train, config.hidden_dim, device=device, generator=generator).relu_()
    train_y = torch.randint(EVAL_CLASSES, (num_train,), device=device, generator=generator)
    test_x = torch.randn(num_test, config.hidden_dim, device=device, generator=generator).relu_()
    test_y = torch.randint(EVAL_CLASSES, (num_test,), device=device, generator=generator)
    labelled = LabelledFeatures(train_x, train_y, test_x, test_y, EVAL_CLASSES)
    probe_seconds = common.time_call(lambda: linear_probe(labelled, epochs=epochs), device, repeats=1, warmup=0)
    # an epoch's time grows with the train set (its mini-batches) and the test set (its top-1)
    probe_full = probe_seconds * (EVAL_EPOCHS / epochs) * (EVAL_TRAIN + EVAL_TEST) / (num_train + num_test)
    results.add(
        case,
        f"linear probe ({num_train} x {epochs} epochs)",
        probe_seconds,
        num_train * epochs / probe_seconds,
        "samples/s",
        "float32",
        note=f"CIFAR-10 probe ({EVAL_TRAIN} x {EVAL_EPOCHS} epochs) {probe_full:.3g} s"
        + ("; epochs 1.. replay one CUDA graph" if device.type == "cuda" else ""),
    )
    knn_train, knn_test = size["knn"]
    knn_subset = LabelledFeatures(
        train_x[:knn_train], train_y[:knn_train], test_x[:knn_test], test_y[:knn_test], EVAL_CLASSES
    )
    knn_seconds = common.time_call(lambda: knn_classify(knn_subset), device, repeats=1)
    knn_full = knn_seconds * (EVAL_TRAIN * EVAL_TEST) / (knn_train * knn_test)
    knn_flops = 2 * knn_train * knn_test * config.hidden_dim
    results.add(
        case,
        f"kNN ({knn_test} x {knn_train})",
        knn_seconds,
        knn_test / knn_seconds,
        "queries/s",
        "float32",
        knn_flops / knn_seconds / matmul_peak,
        "matmul",
        note=f"CIFAR-10 kNN ({EVAL_TEST} x {EVAL_TRAIN}) {knn_full:.3g} s",
    )
    features_full = (EVAL_TRAIN + EVAL_TEST) * EVAL_PATCHES / patch_rate
    total = features_full + probe_full + knn_full
    results.add(
        case,
        f"CIFAR-10 evaluation ({EVAL_PATCHES} patches, extrapolated)",
        total,
        1.0 / total,
        "evals/s",
        "bf16" if device.type == "cuda" else "float32",
        note=f"features {features_full:.3g} s + probe {probe_full:.3g} s + kNN {knn_full:.3g} s",
    )


def _step_note(timing: StepTiming, step_flops: int, device: torch.device) -> str:
    kernels = "kernels" if device.type == "cuda" else "aten ops"
    syncs = "n/a off CUDA" if timing.host_syncs is None else f"{timing.host_syncs:g}"
    return (
        f"CIFAR-10 epoch ({EPOCH_STEPS} steps) {common.readable_seconds(EPOCH_STEPS * timing.seconds)}; "
        f"{step_flops / timing.seconds / 1e12:.3g} TFLOP/s; {timing.kernels} {kernels}/step; host syncs/step {syncs}"
    )


def main(argv=None) -> int:
    parser = common.make_parser("epoch", __doc__)
    parser.add_argument("--steps", type=int, default=None, help="free-running steps per timed run")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers of the published path")
    parser.add_argument(
        "--compiled",
        choices=("last", "skip", "only"),
        default="last",
        help="the captured + compiled row (CUDA): after the others (default), not at all, or alone "
        "(bench/gpu_check.sh runs it as its own last step: its cold compile is the slowest part)",
    )
    args = parser.parse_args(argv)
    results = common.open_results("epoch", args)
    device = torch.device(args.device)
    on_gpu = device.type == "cuda"
    size = SIZES["tiny" if args.tiny else "quick" if args.quick or not on_gpu else "gpu"]
    config = dataclasses.replace(TrainConfig(), **size["model"], device=str(device), progress=False)
    steps = args.steps or size["steps"]
    matmul_dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = common.matmul_rate(device, matmul_dtype, size=256 if args.tiny else None)
    limit = f"{str(matmul_dtype)[6:]} matmul"
    results.note(f"dense {limit} rate {peak / 1e12:.3g} TFLOP/s")
    case = f"b={config.batch_size} n={config.num_patches} {config.arch} w{config.width}"
    dtype = "bf16" if on_gpu else "float32"
    timings: Dict[str, StepTiming] = {}

    def step_row(method):  # one row, on its own: an error in it (capture, compile, out of memory) is that row's
        with results.row(case, method, dtype):
            timing = timings[method] = time_steps(device, config, method, steps, size["repeats"])
            step_flops = 3 * timing.forward_flops  # forward + backward (input and weight gradients)
            results.add(
                case,
                method,
                timing.seconds,
                1.0 / timing.seconds,
                "steps/s",
                dtype,
                step_flops / timing.seconds / peak,
                limit,
                _step_note(timing, step_flops, device),
            )
        phases = timings[method].phases if method in timings else None
        for phase, seconds in (phases or {}).items():
            profiled = sum(phases.values())
            results.add(
                case,
                f"share {phase} (eager, profiled)",
                seconds,
                seconds / profiled if profiled else 0.0,
                "of step",
                dtype,
                note="one profiled step; device time" if on_gpu else "one profiled step",
            )

    with float32_precision(config.tf32):  # as train() runs the step
        if args.compiled != "only":
            for method in ("eager", "captured") if on_gpu else ("eager",):
                step_row(method)
            workers = args.workers or size["workers"] or min(8, os.cpu_count() or 1)
            with results.row(case, "published", "float32"):
                try:
                    published = time_published(device, config, size["published_steps"], workers)
                except ImportError as err:
                    results.note(f"no published-path row: it needs PIL and torchvision ({err})")
                else:
                    fastest = min(timings.values(), key=lambda t: t.seconds, default=None)
                    # the fraction of the limit needs a step row's FLOPs; without one (it failed) the row has none
                    fraction = 3 * fastest.forward_flops / published / peak if fastest else None
                    speed_up = (
                        f"the fastest step above is {published / fastest.seconds:.3g}x faster"
                        if fastest
                        else "no step row above to compare with"
                    )
                    results.add(
                        case,
                        "published",
                        published,
                        1.0 / published,
                        "steps/s",
                        "float32",
                        fraction,
                        limit,
                        f"CIFAR-10 epoch ({EPOCH_STEPS} steps) {common.readable_seconds(EPOCH_STEPS * published)}; "
                        f"PIL in {workers} DataLoader workers, float32 NCHW, d x d logdet loop; {speed_up}",
                    )
            with results.row(f"eval {config.arch} w{config.width} d={config.hidden_dim}", "evaluation"):
                time_evaluation(device, config, size, results, peak)
        if not on_gpu:
            results.note("the captured steps need a CUDA GPU: only the eager step is timed here")
        elif args.compiled != "skip":  # last: a compile that outruns the step's time limit loses no other row
            step_row("captured + compiled")
    return common.finish(results, args)


if __name__ == "__main__":
    raise SystemExit(main())
