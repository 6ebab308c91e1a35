"""Where and how the device runs the work: device resolution, autocast, the cuDNN benchmark switch, the one
CUDA-graph capture helper (the training step, the linear probe's epoch and the benchmarks replay through it), and
the memory a device can still give (checked before a large allocation, so that an absurd size is one line, not an
allocator's traceback)."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional

import torch


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch.device; ValueError for anything else or a missing GPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    expected = "expected cpu, cuda, cuda:N or auto"
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"unknown device {device!r}; {expected}") from err
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r} is not supported; {expected}")
    if resolved.type == "cpu" and resolved.index not in (None, 0):
        raise ValueError(f"device {device!r} does not exist: the CPU is one device, cpu (or cpu:0)")
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} asked for, but no CUDA GPU is available here")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)"
            )
    return resolved


def available_memory(device: torch.device) -> Optional[int]:
    """Bytes the step may use on ``device``: free GPU memory, or the memory the OS can still give; None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.1f} GiB"


def check_fits(need: int, device: torch.device, what: str, advice: str) -> None:
    """ValueError, before anything is allocated, when ``need`` bytes for ``what`` exceed the memory ``device`` can
    still give (nothing is checked where that is unknown)."""
    available = available_memory(device)
    if available is not None and need > available:
        raise ValueError(
            f"{what} needs about {gib(need)} on {device}, but only {gib(available)} is available; {advice}"
        )


def autocast_context(device: torch.device, bf16: bool):
    """bf16 autocast on ``device`` when asked, else nothing. Callers ask on CUDA only (``TrainState.bf16`` is
    False off CUDA); a CPU test asks on the CPU to trace this same region under torch.compile."""
    if bf16 and device.type in ("cuda", "cpu"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    """cudnn.benchmark on while the work runs (when ``enabled``: its shapes never change), restored after; left off
    when cudnn.deterministic is set: timing picks the algorithms anew in each process, cuDNN's heuristics pick the
    same ones in every process, so two runs compute the same numbers."""
    previous = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = previous or (enabled and not torch.backends.cudnn.deterministic)
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous


@contextlib.contextmanager
def float32_precision(tf32: bool, cudnn: Optional[bool] = None):
    """TF32 on or off for float32 matmuls and cuDNN convolutions (``cudnn``: the convolutions' own setting, else
    ``tf32``), as chosen (``TrainConfig.tf32``), not as inherited from torch's defaults (matmul off, cuDNN on) or a
    caller's settings; restored after."""
    previous = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32 if cudnn is None else cudnn
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous


class CudaGraphCall:
    """``function(*inputs)`` on CUDA, recorded once as a CUDA graph and replayed with the inputs copied into static
    buffers.

    The first ``warmup`` calls run eagerly on a side stream (cuDNN/cuBLAS/Triton autotuning and lazily made state,
    such as momentum buffers or the cuBLAS handle, must exist before capture); the next call records ``function``
    and every call from then on replays it, returning the same output tensors (overwritten by each replay).
    ``before_capture`` runs just before the recording (e.g. to drop tensors the graph's own memory pool replaces).
    ``function`` must be a fixed sequence of device work on tensors that outlive the call: no host reads.
    """

    def __init__(
        self, function: Callable, device: torch.device, warmup: int, before_capture: Optional[Callable[[], None]] = None
    ):
        self.function, self.device, self.warmup_left, self.before_capture = function, device, warmup, before_capture
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.side_stream = torch.cuda.Stream(device)

    def __call__(self, *inputs: torch.Tensor):
        if self.warmup_left > 0:
            self.warmup_left -= 1
            self.side_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.side_stream):
                outputs = self.function(*inputs)
            torch.cuda.current_stream(self.device).wait_stream(self.side_stream)
            return outputs
        if self.graph is None:
            self.inputs = tuple(value.clone() for value in inputs)
            if self.before_capture is not None:
                self.before_capture()
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):  # records, runs nothing: the replay below runs this call
                self.outputs = self.function(*self.inputs)
        else:
            for static, value in zip(self.inputs, inputs):
                static.copy_(value)
        self.graph.replay()
        return self.outputs
