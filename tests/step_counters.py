"""Counters for the properties a training step must have on the GPU, measured on the CPU:
no host synchronisation, and a bounded number of dispatched ops."""

import collections
import contextlib

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# Each of these blocks the host on a CUDA tensor (a device-to-host read, or a pageable
# host-to-device copy of Python data, which synchronises the stream and breaks graph capture).
_TENSOR_METHODS = ("item", "tolist", "__bool__", "cpu", "numpy")
_FACTORIES = ("tensor", "as_tensor")


@contextlib.contextmanager
def count_host_syncs():
    """Counts, by name, calls of Tensor.item / tolist / __bool__ / cpu / numpy and of
    torch.tensor / torch.as_tensor / Tensor.new_tensor on Python data (not on a tensor)."""
    calls = collections.Counter()
    originals = {}

    def counting(owner, name, python_data_only):
        original = getattr(owner, name)
        originals[(owner, name)] = original

        def wrapper(*args, **kwargs):
            data = args[1] if owner is torch.Tensor and name == "new_tensor" else (args[0] if args else None)
            if not python_data_only or not isinstance(data, torch.Tensor):
                calls[name] += 1
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)

    try:
        for name in _TENSOR_METHODS:
            counting(torch.Tensor, name, python_data_only=False)
        counting(torch.Tensor, "new_tensor", python_data_only=True)
        for name in _FACTORIES:
            counting(torch, name, python_data_only=True)
        yield calls
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched, by name: ``ops`` those that compute (about one kernel
    launch each on the GPU), ``views`` those that only make a view (no kernel); the profiler's
    record_function markers are not counted."""

    def __init__(self, inspect=None):
        super().__init__()
        self.ops, self.views = collections.Counter(), collections.Counter()
        self.sequence = []  # the names of the computing ops, in dispatch order
        self._inspect = inspect  # called as inspect(func, args, kwargs) on every op

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func.overloadpacket.__name__)
        if name.startswith("_record_function"):  # the profiler's markers around Optimizer.step: no kernel
            pass
        elif func.is_view:
            self.views[name] += 1
        else:
            self.ops[name] += 1
            self.sequence.append(name)
        if self._inspect is not None:
            self._inspect(func, args, kwargs)
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())
