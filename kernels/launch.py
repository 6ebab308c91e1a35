"""What every Triton launcher of empssl wraps its launch in: the device of its tensors.

A Triton launch runs on the *current* CUDA device and its current stream. Without a guard, a
tensor on ``cuda:1`` while the current device is 0 makes the kernel run on GPU 0 with GPU 1's
pointers (an illegal address, or no ordering with the stream that produced the tensor). Under
``torch.cuda.device(tensor.device)`` Triton's launcher picks that device and that device's
current stream, as the extension ops do with ``c10::cuda::CUDAGuard``.
"""

from __future__ import annotations

import contextlib

import torch


def on_device(device: torch.device):
    """Context manager making ``device`` current for a launch (a no-op for CPU tensors under the interpreter)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()
