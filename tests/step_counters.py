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


class PeakTensorMemory(TorchDispatchMode):
    """The peak of the bytes held by live CPU tensors while it is active: ``baseline`` (the storages of
    ``existing`` tensors, held throughout) plus the storages the dispatched ops allocate, each counted until
    the storage is freed (autograd's saved tensors included: a storage's Python object lives as long as it).
    CPU tensors only; what CUDA's ``max_memory_allocated`` reports, without the caching allocator's rounding."""

    def __init__(self, existing=()):
        super().__init__()
        self.seen = {}
        for tensor in existing:
            storage = tensor.untyped_storage()
            self.seen[storage.data_ptr()] = storage.nbytes()
        self.baseline = sum(self.seen.values())
        self.live = self.peak = self.baseline

    def _freed(self, key, nbytes):
        self.live -= nbytes
        self.seen.pop(key, None)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        import weakref

        from torch.utils._pytree import tree_flatten

        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if not isinstance(tensor, torch.Tensor) or tensor.device.type != "cpu":
                continue
            storage = tensor.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in self.seen:
                continue
            self.seen[key] = nbytes
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._freed, key, nbytes)
        return out
