"""A pytest plugin (``-p fake_sm90_cuda``) that makes torch report one CUDA device, sm_90 (an H100/H200),
before any test module is imported, so that collection sees what the GPU run (bench/gpu_check.sh) sees.
For collection only: nothing may run on the pretended device."""

import torch

torch.cuda.is_available = lambda: True
torch.cuda.device_count = lambda: 1
torch.cuda.get_device_capability = lambda device=None: (9, 0)
torch.cuda.get_device_name = lambda device=None: "NVIDIA H200 (pretended for collection)"
