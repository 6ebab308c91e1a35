import os

# Triton kernels run on CPU tensors through the interpreter; it must be set before triton is imported.
# bench/gpu_check.sh sets TRITON_INTERPRET=0 for the `gpu` tests, which run the compiled kernels.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

# CI sets EMPSSL_REQUIRE_BACKENDS (for example "cpu,triton,cuda-ext"): each named backend must be
# available, and a test may skip only for a reason no build on this machine can fix, one that starts
# with one of these (or quotes one after a colon). Anything else (a backend that failed to build, a
# missing test dependency) fails.
ALLOWED_SKIP_PREFIXES = ("needs a CUDA GPU", "upstream bug:", "optional dependency not installed:")
REQUIRED_BACKENDS = [name for name in os.environ.get("EMPSSL_REQUIRE_BACKENDS", "").split(",") if name]


def _backend_missing(name):
    """Why a backend CI requires is not there, or None."""
    from empssl import backends

    if name == "cpu":
        return backends.cpu_extension_reason(torch.device("cpu"))
    if name == "triton":
        return backends.triton_reason(torch.device("cpu"))
    if name == "cuda-ext":  # the extension's CUDA part: it builds wherever nvcc is, GPU or not
        return backends.extension_reason() or (
            None if backends.extension().with_cuda else "the extension was built without its CUDA part"
        )
    return f"unknown backend name {name!r} in EMPSSL_REQUIRE_BACKENDS (cpu, triton, cuda-ext)"


def pytest_configure(config):
    missing = {name: _backend_missing(name) for name in REQUIRED_BACKENDS}
    missing = {name: why for name, why in missing.items() if why}
    if missing:
        raise pytest.UsageError(
            "EMPSSL_REQUIRE_BACKENDS: required backends are missing: "
            + "; ".join(f"{name}: {why}" for name, why in missing.items())
        )


def _skip_reason(report):
    longrepr = report.longrepr
    text = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
    return text[len("Skipped: ") :] if text.startswith("Skipped: ") else text


def _fail_disallowed_skip(report):
    if REQUIRED_BACKENDS and report.skipped and not hasattr(report, "wasxfail"):
        reason = _skip_reason(report)
        # the reason itself, or a backend's reason quoted after a colon
        # ("triton backend unavailable: upstream bug: ...")
        if not any(reason.startswith(allowed) or f": {allowed}" in reason for allowed in ALLOWED_SKIP_PREFIXES):
            report.outcome = "failed"
            report.longrepr = (
                f"skipped for a reason CI does not accept (EMPSSL_REQUIRE_BACKENDS is set; allowed: "
                f"{', '.join(ALLOWED_SKIP_PREFIXES)}): {reason}"
            )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    outcome = yield
    _fail_disallowed_skip(outcome.get_result())  # module-level skips


@pytest.fixture(autouse=True)
def restore_global_switches():
    """Each test leaves torch's process-wide switches as it found them (threads, TF32, cuDNN), whatever it sets."""
    cudnn, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    saved = (
        torch.get_num_threads(),
        matmul.allow_tf32,
        cudnn.allow_tf32,
        cudnn.benchmark,
        cudnn.deterministic,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.set_num_threads(saved[0])
    matmul.allow_tf32, cudnn.allow_tf32, cudnn.benchmark, cudnn.deterministic = saved[1:5]
    torch.set_float32_matmul_precision(saved[5])


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
