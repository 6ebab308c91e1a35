"""Which backends exist on this machine for each op, and why the others do not.

Every op takes ``backend="auto" | "cuda" | "triton" | "cpu" | "reference"``. Each op module
registers, per backend, a function that returns ``None`` when the backend can run on the
given inputs, or a sentence saying why not (no GPU, extension not built, shape outside the
kernel's limits). ``select_backend`` is the one dispatch point; ``availability_table`` is
what ``empssl info`` prints.
"""
from __future__ import annotations

import functools
import importlib
import os
from typing import Callable, Dict, Optional, Sequence

import torch

BACKENDS = ("cuda", "triton", "cpu", "reference")
# auto picks the first backend in this order that can run the inputs
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}

Reason = Optional[str]
# op name -> backend -> check(device, *op inputs) -> reason or None
_OP_CHECKS: Dict[str, Dict[str, Callable[..., Reason]]] = {}
# op name -> () -> typical inputs (CPU tensors standing in for shape and dtype), for `empssl info`
_OP_EXAMPLES: Dict[str, Callable[[], tuple]] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


@functools.lru_cache(maxsize=None)
def _load_extension():
    if os.environ.get("EMPSSL_DISABLE_EXT", "0") == "1":
        return None, "disabled by EMPSSL_DISABLE_EXT=1"
    try:
        module = importlib.import_module("empssl._C")
    except ImportError as err:  # not built (EMPSSL_BUILD_EXT=0) or built against another torch
        return None, f"compiled extension empssl._C not importable ({err}); rebuild with `pip install --no-build-isolation -e .`"
    return module, None


def extension():
    """The compiled extension module, or raise BackendUnavailableError saying why not."""
    module, reason = _load_extension()
    if module is None:
        raise BackendUnavailableError(reason)
    return module


def extension_reason() -> Reason:
    return _load_extension()[1]


def extension_op_reason(op_name: str) -> Reason:
    """None once the extension defining ``torch.ops.empssl.<op_name>`` is loaded, else why not."""
    reason = extension_reason()
    if reason:
        return reason
    extension()  # loading the library registers its ops
    if not hasattr(torch.ops.empssl, op_name):
        return f"the compiled extension has no {op_name} op (rebuild it)"
    return None


def cpu_extension_reason(device: torch.device) -> Reason:
    if device.type != "cpu":
        return f"the cpu backend runs on CPU tensors, not {device.type}"
    return extension_reason()


def cuda_extension_reason(device: torch.device) -> Reason:
    if device.type != "cuda":
        return f"the cuda backend runs on CUDA tensors, not {device.type}"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine"
    reason = extension_reason()
    if reason:
        return reason
    if not extension().with_cuda:
        return "the extension was built without its CUDA part (no nvcc, or EMPSSL_BUILD_CUDA=0)"
    return None


@functools.lru_cache(maxsize=None)
def _triton_import_reason() -> Reason:
    try:
        import triton  # noqa: F401
    except ImportError as err:
        return f"triton is not installed ({err})"
    return None


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def triton_interpreter_bug() -> Reason:
    """A known upstream bug that breaks the Triton interpreter with the installed versions, or None.

    Triton < 3.8's interpreter turns a one-element block into a Python int with ``int(array)``
    (``tensor.__index__`` in runtime/interpreter.py); numpy >= 2.4 raises TypeError for arrays
    that are not 0-d. Triton 3.8 squeezes the array first.
    """
    import numpy
    import triton

    major_minor = tuple(int(part) for part in triton.__version__.split(".")[:2])
    if major_minor >= (3, 8):
        return None
    try:
        int(numpy.zeros(1))
    except TypeError:
        return (f"upstream bug: the Triton {triton.__version__} interpreter calls int() on one-element numpy arrays, "
                f"which numpy {numpy.__version__} rejects (runtime/interpreter.py tensor.__index__; fixed in triton 3.8)")
    return None


@functools.lru_cache(maxsize=None)
def triton_kernel_module(name: str, what: str, entry_points: Sequence[str]):
    """(empssl.kernels.<name>, None), or (None, why it cannot be used: triton missing, an entry point missing).

    Imported lazily: importing a kernel module imports triton. ``what`` names the kernel in the reason."""
    try:
        module = importlib.import_module(f"empssl.kernels.{name}")
    except ImportError as err:
        return None, f"the Triton {what} kernel is not importable ({err})"
    missing = [entry for entry in entry_points if not hasattr(module, entry)]
    if missing:
        return None, f"kernels/{name}.py lacks {' / '.join(missing)}"
    return module, None


def triton_reason(device: torch.device) -> Reason:
    reason = _triton_import_reason()
    if reason:
        return reason
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA GPU on this machine"
    if device.type == "cpu" and triton_interpreted():
        return triton_interpreter_bug()
    return f"triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"


def register_op(op: str, checks: Dict[str, Callable[..., Reason]], example: Callable[[], tuple]) -> None:
    """Declare, for one op, the check of each backend (missing backends are unsupported) and typical inputs."""
    _OP_CHECKS[op] = checks
    _OP_EXAMPLES[op] = example


def register_backend(op: str, backend: str, check: Callable[..., Reason]) -> None:
    """Add or replace one backend's check of an op already registered (fast paths register themselves)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}")
    _OP_CHECKS[op][backend] = check


def reasons(op: str, device: torch.device, *inputs) -> Dict[str, Reason]:
    """For each backend, None if it can run ``op`` on these inputs on ``device``, else why not."""
    checks = _OP_CHECKS[op]
    if device.type == "cuda" and not torch.cuda.is_available():
        return {name: "no CUDA GPU on this machine" for name in BACKENDS}
    return {
        name: (checks[name](device, *inputs) if name in checks else f"{op} has no {name} backend")
        for name in BACKENDS
    }


def select_backend(op: str, requested: str, device: torch.device, *inputs) -> str:
    """Resolve ``requested`` (a backend name or "auto") for ``op`` on these inputs."""
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS))
    why_not = reasons(op, device, *inputs)
    if requested != "auto":
        if why_not[requested] is not None:
            raise BackendUnavailableError(f"{op}: backend {requested!r} is not available: {why_not[requested]}")
        return requested
    order: Sequence[str] = AUTO_ORDER.get(device.type, ("reference",))
    for name in order:
        if why_not[name] is None:
            return name
    raise BackendUnavailableError(f"{op}: no backend can run these inputs: " + "; ".join(f"{k}: {v}" for k, v in why_not.items()))


def availability_table() -> list:
    """Rows (op, device type, backend, reason or None) for ``empssl info``.

    Each op's typical inputs are judged for the CPU and for CUDA, so the table also says
    why the CUDA backends are absent on a machine without a GPU.
    """
    rows = []
    for op, make_inputs in _OP_EXAMPLES.items():
        inputs = make_inputs()
        for device in (torch.device("cpu"), torch.device("cuda")):
            for name, why in reasons(op, device, *inputs).items():
                rows.append((op, device.type, name, why))
    return rows
