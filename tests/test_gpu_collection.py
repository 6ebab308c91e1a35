"""The GPU run collects every `gpu` test: no module that holds one hides it behind a module-level skip.

Collection runs in a subprocess as bench/gpu_check.sh runs the tests (``-m gpu``, TRITON_INTERPRET=0), with
torch reporting one sm_90 device (tests/fake_sm90_cuda.py, loaded as a plugin before any test module)."""

import os
import re
import subprocess
import sys

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
GPU_MARK = re.compile(r"pytest\.mark\.gpu\b")


def _modules_with_gpu_tests():
    return sorted(
        name
        for name in os.listdir(TESTS)
        if name.startswith("test_") and name.endswith(".py") and GPU_MARK.search(open(os.path.join(TESTS, name)).read())
    )


def _collect_gpu_tests(*plugin):
    env = {
        **os.environ,
        "TRITON_INTERPRET": "0",
        "PYTHONPATH": os.pathsep.join([TESTS] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]),
    }
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("EMPSSL_REQUIRE_BACKENDS", None)  # CI's check of what this machine built, not of a GPU run's collection
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *plugin, TESTS],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=os.path.dirname(TESTS),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected = {}
    for line in done.stdout.splitlines():
        match = re.match(r"(?:tests/)?(test_\w+\.py)::", line)
        if match:
            collected[match.group(1)] = collected.get(match.group(1), 0) + 1
    return collected


@pytest.mark.slow
def test_every_module_with_gpu_tests_contributes_them_on_an_sm90_device_without_the_interpreter():
    modules = _modules_with_gpu_tests()
    assert "test_augment_triton.py" in modules and "test_train.py" in modules  # the scan finds the marks
    collected = _collect_gpu_tests("-p", "fake_sm90_cuda")
    hidden = [name for name in modules if not collected.get(name)]
    assert not hidden, f"modules whose gpu tests are not collected on an sm_90 device: {hidden}"
    assert set(collected) <= set(modules)
