"""The machinery every op's backends share: the registry, first-fit dispatch, its cache, and the checks
that say whether the extension and Triton can run here.

Every op takes ``backend="auto" | "cuda" | "composite" | "triton" | "cpu" | "reference"``. Each op's
interface module (``empssl.ops.augment``, ``empssl.ops.tcr``) registers its table of ``Backend``: what
each supports, in words, a check that returns ``None`` when the backend can run the given inputs or
a sentence saying why not (no GPU, extension not built, shape outside the kernel's limits), and the
function that runs it. ``select_backend`` is the one dispatch point, first fit in ``AUTO_ORDER``;
``resolve`` is the same choice made once per (op, request, device, facts) and remembered, so that a
call in a ``torch.compile`` trace reads a constant; ``availability_table`` is what ``empssl info`` prints.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import operator
import os
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

BACKENDS = ("cuda", "composite", "triton", "cpu", "reference")
# auto picks the first backend in this order that can run the inputs. On CUDA the composite (torch ops of
# the extension) takes the shapes the cuda kernel refuses; triton runs where the extension has no CUDA part.
# The CPU's composite is LAPACK's Cholesky, as in the reference, so auto does not pick it there
# (backend="composite" asks for it).
AUTO_ORDER = {"cuda": ("cuda", "composite", "triton", "reference"), "cpu": ("cpu", "reference")}

Reason = Optional[str]


@dataclasses.dataclass
class Backend:
    """One implementation of an op. ``check(device, *inputs)`` reads only the inputs' metadata (devices,
    dtypes, sizes, strides, configuration), never their values; ``run`` has the op's signature."""

    supports: str  # devices, dtypes and sizes, in words, for `empssl info`
    check: Callable[..., Reason]
    run: Callable[..., Any]


@dataclasses.dataclass
class _Op:
    backends: Dict[str, Backend]
    stand_ins: Callable[..., tuple]  # (device, *facts) -> inputs for the checks, built from the facts alone
    example: Callable[[], tuple]  # typical inputs (CPU tensors standing in for shape and dtype), for `empssl info`


_OPS: Dict[str, _Op] = {}
# (op, requested, device, facts) -> backend name: what resolve chose
_RESOLVED: Dict[tuple, str] = {}


class BackendUnavailableError(RuntimeError):
    """A backend was asked for that cannot run here; the message says why."""


def build_info() -> Dict[str, str]:
    """What setup.py built into this install for this Python (empssl/_build_info.py), or {} where it recorded
    nothing (an install older than that record, or a build for another Python)."""
    import sysconfig

    try:
        from . import _build_info
    except ImportError:
        return {}
    builds = getattr(_build_info, "BUILDS", {})
    mine = builds.get(sysconfig.get_config_var("EXT_SUFFIX") or "")
    if mine is None and len(builds) == 1:
        (only,) = builds.values()
        mine = only if only["extension"] == "none" else None  # a pure-Python wheel serves any Python
    return dict(mine) if mine else {}


def build_summary() -> str:
    """One line for `empssl info`: which parts of the extension this install was built with, and why not the rest."""
    info = build_info()
    if not info:
        return "no build record (installed before setup.py wrote one)"
    parts = {
        "cpu+cuda": f"CPU and CUDA kernels (TORCH_CUDA_ARCH_LIST {info['cuda_archs']})",
        "cpu": "CPU kernels only",
        "none": "no compiled extension (pure Python)",
    }[info["extension"]]
    against = f", against torch {info['torch']}" if info["torch"] and info["extension"] != "none" else ""
    why = f"; left out: {info['reason']}" if info["reason"] else ""
    return parts + against + why


_REBUILD = "reinstall with `pip install --no-build-isolation .` (`-e .` in a checkout) against the torch in use"


@functools.lru_cache(maxsize=None)
def _load_extension():
    if os.environ.get("EMPSSL_DISABLE_EXT", "0") == "1":
        return None, "disabled by EMPSSL_DISABLE_EXT=1"
    info = build_info()
    if info.get("extension") == "none":
        return None, f"not built ({info['reason']}): a pure-Python install, Triton and reference backends only"
    try:
        module = importlib.import_module("empssl._C")
    except ImportError as err:  # not built, or built against another torch (an ABI mismatch: undefined symbols)
        built = info.get("torch")
        if built and built != torch.__version__:
            return (
                None,
                f"compiled extension built against torch {built}, running torch {torch.__version__}; {_REBUILD}",
            )
        return None, f"compiled extension empssl._C not importable ({err}); {_REBUILD}"
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
        return (
            f"upstream bug: the Triton {triton.__version__} interpreter calls int() on one-element numpy arrays, "
            f"which numpy {numpy.__version__} rejects (runtime/interpreter.py tensor.__index__; fixed in triton 3.8)"
        )
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


def register_op(
    op: str, table: Dict[str, Backend], stand_ins: Callable[..., tuple], example: Callable[[], tuple]
) -> None:
    """Declare an op's backends (those missing from ``table`` are unsupported), how ``resolve`` rebuilds
    inputs for their checks from the facts, and typical inputs for ``empssl info``."""
    unknown = set(table) - set(BACKENDS)
    if unknown:
        raise ValueError(f"{op}: unknown backends {sorted(unknown)}; the names are {BACKENDS}")
    _OPS[op] = _Op(dict(table), stand_ins, example)
    clear_resolved()


def choices(table: Dict[str, Backend]) -> Tuple[str, ...]:
    """What an op with this backend table accepts as ``backend``: "auto" and the table's names."""
    return ("auto", *table)


def get_backend(op: str, backend: str) -> Backend:
    """The registered ``backend`` of ``op`` (a name ``select_backend`` or ``resolve`` returned)."""
    return _OPS[op].backends[backend]


def supports(op: str, backend: str) -> str:
    """What ``backend`` of ``op`` takes, in words ("-" when the op has no such backend)."""
    entry = _OPS[op].backends.get(backend)
    return entry.supports if entry else "-"


def reasons(op: str, device: torch.device, *inputs) -> Dict[str, Reason]:
    """For each backend, None if it can run ``op`` on these inputs on ``device``, else why not."""
    table = _OPS[op].backends
    if device.type == "cuda" and not torch.cuda.is_available():
        return {name: "no CUDA GPU on this machine" for name in BACKENDS}
    return {
        name: (table[name].check(device, *inputs) if name in table else f"{op} has no {name} backend")
        for name in BACKENDS
    }


def _check_requested(requested: str) -> None:
    if requested != "auto" and requested not in BACKENDS:
        raise ValueError(
            f"unknown backend {requested!r}; choose one of 'auto', " + ", ".join(repr(b) for b in BACKENDS)
        )


def select_backend(op: str, requested: str, device: torch.device, *inputs) -> str:
    """Resolve ``requested`` (a backend name or "auto") for ``op`` on these inputs: first fit in AUTO_ORDER."""
    _check_requested(requested)
    why_not = reasons(op, device, *inputs)
    if requested != "auto":
        if why_not[requested] is not None:
            raise BackendUnavailableError(f"{op}: backend {requested!r} is not available: {why_not[requested]}")
        return requested
    order: Sequence[str] = AUTO_ORDER.get(device.type, ("reference",))
    for name in order:
        if why_not[name] is None:
            return name
    raise BackendUnavailableError(
        f"{op}: no backend can run these inputs: " + "; ".join(f"{k}: {v}" for k, v in why_not.items())
    )


def static_sizes(sizes: Iterable) -> Tuple[int, ...]:
    """Sizes as Python ints. In a torch.compile trace with dynamic shapes ``operator.index`` specialises
    each (a guard per size, so another size recompiles), which lets ``resolve`` take them as constants."""
    return tuple(operator.index(size) for size in sizes)


@torch.compiler.assume_constant_result
def resolve(op: str, requested: str, device: torch.device, *facts) -> str:
    """``select_backend`` once per (op, requested, device, facts), then the remembered answer.

    ``facts`` are Python constants, everything the op's checks read (dtypes, sizes, strides, the
    configuration fields the kernels take); the checks see stand-in tensors built from them. Under
    torch.compile this runs at trace time and the name is a constant of the graph: dispatch adds no
    Python work to the trace. Refusals are not remembered (each call says why again). Whatever
    changes what the checks see beyond the facts (a test that swaps a check) calls ``clear_resolved``.
    """
    key = (op, requested, device, facts)
    name = _RESOLVED.get(key)
    if name is None:
        name = select_backend(op, requested, device, *_OPS[op].stand_ins(device, *facts))
        _RESOLVED[key] = name
    return name


def resolved_on(device_type: str) -> Dict[str, list]:
    """{op: the backends ``resolve`` chose for it on devices of this type so far}: what a run actually used."""
    chosen: Dict[str, list] = {}
    for (op, _, device, _), name in _RESOLVED.items():
        if device.type == device_type and name not in chosen.setdefault(op, []):
            chosen[op].append(name)
    return chosen


def clear_resolved() -> None:
    """Forget every choice ``resolve`` made (the next call runs the checks again)."""
    _RESOLVED.clear()


def availability_table() -> list:
    """Rows (op, device type, backend, reason or None) for ``empssl info``.

    Each op's typical inputs are judged for the CPU and for CUDA, so the table also says
    why the CUDA backends are absent on a machine without a GPU.
    """
    rows = []
    for op, entry in _OPS.items():
        inputs = entry.example()
        for device in (torch.device("cpu"), torch.device("cuda")):
            for name, why in reasons(op, device, *inputs).items():
                rows.append((op, device.type, name, why))
    return rows
