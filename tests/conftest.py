import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
# bench/gpu_check.sh sets TRITON_INTERPRET=0 for the `gpu` tests, which run the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_torch_thread():
    """Tiny convolutions gain nothing from a second thread, and OpenMP spin-waits make them crawl on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
