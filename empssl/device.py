"""Where and how the device runs the work: device resolution, autocast, the cuDNN benchmark switch, the one
CUDA-graph capture helper (the training step, the linear probe's epoch and the benchmarks replay through it), and
the memory a device can still give (checked before a large allocation, so that an absurd size is one line, not an
allocator's traceback), and the host memory this process may use (``host_memory_available``: a cgroup's limit
included)."""

from __future__ import annotations

import contextlib
import os
from typing import Callable, Optional, Tuple

import torch


def resolve_device(device: str) -> torch.device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` as a torch.device; ValueError for anything else or a missing GPU.
    In a process group (torchrun), ``cuda`` and ``auto`` are this rank's GPU, the current one (the group's set-up
    made it ``cuda:LOCAL_RANK``): a run keeps the user's ``--device``, which every rank resolves to its own."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and torch.cuda.is_available() and torch.distributed.is_available():
        if torch.distributed.is_initialized():
            return torch.device("cuda", torch.cuda.current_device())
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
    """Bytes the step may use on ``device``: free GPU memory, or the host memory this process may still use (a
    cgroup's limit included: ``host_memory_available``); None if unknown."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    available, _ = host_memory_available()
    if available is not None:
        return available
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


def _resolved_precision(switch) -> str:
    """A switch's fp32_precision as torch's kernels read it: one left at "none" follows cuDNN's (torch's "cuda"
    backend), then the global one."""
    for precision in (switch.fp32_precision, torch.backends.cudnn.fp32_precision, torch.backends.fp32_precision):
        if precision != "none":
            return precision
    return "none"


def tf32_settings() -> Tuple[bool, bool]:
    """(matmul, cuDNN convolutions): whether float32 work on CUDA may use TF32 now, whichever of torch's two APIs set
    it (reading the legacy ``allow_tf32`` raises once a caller's ``fp32_precision`` disagrees with it)."""
    return (
        _resolved_precision(torch.backends.cuda.matmul) == "tf32",
        _resolved_precision(torch.backends.cudnn.conv) == "tf32",
    )


def set_tf32(matmul: bool, cudnn: bool) -> None:
    """TF32 on or off for float32 matmuls and cuDNN (convolutions and RNNs) on CUDA, set through both of torch's
    APIs, each switch explicitly (not "none", which would follow a caller's global ``fp32_precision``), so readers of
    either (torch.compile reads the legacy flags) see the same choice."""
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
    torch.backends.cuda.matmul.fp32_precision = "tf32" if matmul else "ieee"
    torch.backends.cudnn.conv.fp32_precision = torch.backends.cudnn.rnn.fp32_precision = "tf32" if cudnn else "ieee"


def _legacy_setting(read: Callable):
    try:
        return read()
    except RuntimeError:  # a caller's fp32_precision disagrees with it: the caller uses the new API only
        return None


@contextlib.contextmanager
def float32_precision(tf32: bool, cudnn: Optional[bool] = None):
    """TF32 on or off for float32 matmuls and cuDNN convolutions (``cudnn``: the convolutions' own setting, else
    ``tf32``), as chosen (``TrainConfig.tf32``), not as inherited from torch's defaults (matmul off, cuDNN on) or a
    caller's settings (either of torch's APIs); restored after (a legacy flag a caller's switches made unreadable is
    left agreeing with them)."""
    switches = (
        torch.backends.cuda.matmul,
        torch.backends.mkldnn.matmul,  # set_float32_matmul_precision below also sets it
        torch.backends.cudnn.conv,
        torch.backends.cudnn.rnn,
    )
    saved = [(switch, switch.fp32_precision) for switch in switches]
    matmul_precision = _legacy_setting(torch.get_float32_matmul_precision)
    cudnn_allow = _legacy_setting(lambda: torch.backends.cudnn.allow_tf32)
    set_tf32(tf32, tf32 if cudnn is None else cudnn)
    try:
        yield
    finally:
        for switch, precision in saved:
            switch.fp32_precision = precision
        # a legacy flag that could not be read is left agreeing with the caller's switches
        matmul_now, cudnn_now = tf32_settings()
        torch.set_float32_matmul_precision(matmul_precision or ("high" if matmul_now else "highest"))
        torch.backends.cudnn.allow_tf32 = cudnn_now if cudnn_allow is None else cudnn_allow
        for switch, precision in saved:  # the legacy setters above set them too
            switch.fp32_precision = precision


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


# ---------------------------------------------------------------------------------------------------------------------
# The host memory this process may use: the machine's, bounded by a container's or cgroup's limit

_NO_V1_LIMIT = 2**62  # cgroup v1 writes "no limit" as a page-rounded 2^63 - 1


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read()
    except (OSError, UnicodeDecodeError):
        return None


def _read_int(path: str) -> Optional[int]:
    text = _read_text(path)
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None  # "max": no limit


def _reclaimable_cache(folder: str, key: str) -> int:
    """The inactive file cache of a cgroup (counted in its usage, but the kernel drops it before failing)."""
    for line in (_read_text(os.path.join(folder, "memory.stat")) or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _cgroup_folders(root: str):
    """(version, folder) of this process's memory cgroup and each of its parents up to the mount, leaf first, for each
    cgroup mount (a hybrid system has both versions; a folder without memory files is skipped by the caller)."""
    membership = _read_text(os.path.join(root, "proc/self/cgroup")) or ""
    mounts = _read_text(os.path.join(root, "proc/self/mountinfo")) or ""
    for line in mounts.splitlines():
        fields = line.split()
        if " - " not in line or len(fields) < 5:
            continue
        mount_root, mount_point = fields[3], fields[4]
        fstype, _, options = line.split(" - ", 1)[1].partition(" ")
        if fstype == "cgroup2":
            version, wanted = 2, lambda controllers: controllers == ""
        elif fstype == "cgroup" and "memory" in options.split()[-1].split(","):
            version, wanted = 1, lambda controllers: "memory" in controllers.split(",")
        else:
            continue
        for entry in membership.splitlines():
            _, _, rest = entry.partition(":")
            controllers, _, path = rest.partition(":")
            if not wanted(controllers):
                continue
            # a container sees its own cgroup as the mount's root: the path is taken relative to it
            relative = os.path.relpath(path, mount_root) if path.startswith(mount_root) else "."
            folder = os.path.normpath(os.path.join(root, mount_point.lstrip("/"), relative))
            top = os.path.normpath(os.path.join(root, mount_point.lstrip("/")))
            while True:
                yield version, folder
                if folder == top or not folder.startswith(top):
                    break
                folder = os.path.dirname(folder)


def host_memory_available(root: str = "/") -> Tuple[Optional[int], str]:
    """(bytes this process may still allocate on the host, what bounds it): the least of the machine's available
    memory (MemAvailable) and, for this process's memory cgroup and each parent (v2 ``memory.max`` /
    ``memory.current``, v1 ``memory.limit_in_bytes`` / ``memory.usage_in_bytes``), its limit less its use (the
    inactive file cache counted as free). (None, reason) where nothing can be read. ``root``: where /proc and /sys
    are (tests point it at a fake tree)."""
    best: Optional[int] = None
    what = "nothing readable (no /proc/meminfo)"
    for line in (_read_text(os.path.join(root, "proc/meminfo")) or "").splitlines():
        if line.startswith("MemAvailable:"):
            best, what = int(line.split()[1]) * 1024, "the machine's available memory (MemAvailable)"
    for version, folder in _cgroup_folders(root):
        if version == 2:
            limit, used = (
                _read_int(os.path.join(folder, "memory.max")),
                _read_int(os.path.join(folder, "memory.current")),
            )
            cache = _reclaimable_cache(folder, "inactive_file")
        else:
            limit = _read_int(os.path.join(folder, "memory.limit_in_bytes"))
            used = _read_int(os.path.join(folder, "memory.usage_in_bytes"))
            cache = _reclaimable_cache(folder, "total_inactive_file")
            limit = None if limit is not None and limit >= _NO_V1_LIMIT else limit
        if limit is None:
            continue
        free = max(0, limit - max(0, (used or 0) - cache))
        if best is None or free < best:
            best = free
            what = f"the cgroup v{version} limit of {limit / 2**30:.1f} GiB ({folder})"
    return best, what
