"""The GPU run collects every `gpu` test: no module that holds one hides it behind a module-level skip; and it runs
them in the planned order (tests/gpu_order.py): the training step first, then the CUDA kernels the epoch times.

Collection runs in a subprocess as bench/gpu_check.sh runs the tests (``-m gpu``, TRITON_INTERPRET=0, ``-p
gpu_order``), with torch reporting one sm_90 device (tests/fake_sm90_cuda.py, loaded as a plugin before any test
module)."""

import os
import re
import subprocess
import sys

import gpu_order
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
    env.pop(gpu_order.CALL_ENV, None)  # every call's tests (the device check sets one call's while it runs this)
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *plugin, TESTS],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=os.path.dirname(TESTS),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    collected, order = {}, []
    for line in done.stdout.splitlines():
        match = re.match(r"(?:tests/)?(test_\w+\.py)::", line)
        if match:
            collected[match.group(1)] = collected.get(match.group(1), 0) + 1
            order.append(line.strip())
    return collected, order


@pytest.mark.slow
def test_every_module_with_gpu_tests_contributes_them_on_an_sm90_device_without_the_interpreter():
    modules = _modules_with_gpu_tests()
    assert "test_augment_triton.py" in modules and "test_train.py" in modules  # the scan finds the marks
    collected, order = _collect_gpu_tests("-p", "fake_sm90_cuda", "-p", "gpu_order")
    hidden = [name for name in modules if not collected.get(name)]
    assert not hidden, f"modules whose gpu tests are not collected on an sm_90 device: {hidden}"
    assert set(collected) <= set(modules)
    # the planned order: groups by value, the training step's own test first, every test in a group of its own rule
    groups = [gpu_order.group_of(nodeid) for nodeid in order]
    ranks = [gpu_order.RANK[group] for group in groups]
    assert ranks == sorted(ranks) and "other" not in groups, sorted(
        set(o for o, g in zip(order, groups) if g == "other")
    )
    assert (
        order[0] == "tests/test_train_step.py::test_step_variant_gives_the_eager_parameters_after_ten_steps[captured]"
    )
    # every rule takes a test: a rule that matches none is stale (its tests renamed away into another group)
    assert set(groups) == set(gpu_order.RANK) - {"other"}, set(gpu_order.RANK) - {"other"} - set(groups)
