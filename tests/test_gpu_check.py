"""The device check's own logic, on the CPU: both calls' plans fit their budgets, the gpu tests run in the planned
order and each call takes its groups (tests/gpu_order.py), and the summary counts tests from the test lines
themselves, so a run killed mid-test is summarised right (bench/gpu_summary.py)."""

import csv
import importlib.util
import os
import re
import subprocess
import sys

import gpu_order
import pytest

from empssl.bench.common import FIELDS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("gpu_summary", os.path.join(ROOT, "bench", "gpu_summary.py"))
gpu_summary = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_summary)

# what a killed call-1 run leaves: pytest's header counts every selected test, the tally never comes
KILLED = """============================= test session starts ==============================
collected 1100 items / 760 deselected / 340 selected
gpu test groups in order (call1): training 6, tcr-cuda-recipe 10
tests/test_train_step.py::test_step_variant_gives_the_eager_parameters_after_ten_steps[captured] PASSED [  0%]
tests/test_train.py::test_cuda_bf16_training_resumes_and_evaluates FAILED [  1%]
tests/test_evaluate.py::test_cuda_probe_replaying_its_captured_epoch_equals_the_reference PASSED [  1%]
tests/test_evaluate.py::test_cuda_bf16_folded_features_match_the_autocast_encoder SKIPPED (needs x) [  2%]
tests/test_tcr_backends.py::test_gpu_backends_against_float64[20-100-1024-random-dtype0-cuda] PASSED [  2%]
tests/test_tcr_backends.py::test_gpu_backends_against_float64[20-100-1024-random-dtype1-cuda] ERROR [  3%]
tests/test_tcr_backends.py::test_gpu_backends_against_float64[20-100-1024-random-dtype2-cuda] """

XDIST = """[gw0] [ 10%] PASSED tests/test_augment_triton.py::test_gpu_full_batch_matches_reference[out_dtype0-cifar]
[gw1] [ 20%] FAILED tests/test_tcr_backends.py::test_gpu_backends_against_float64[3-1-16-near-dtype1-triton]
[gw0] [ 30%] SKIPPED tests/test_tcr_triton.py::test_z_on_a_second_gpu_runs_there
[gw2] [ 40%] PASSED tests/test_augment_triton.py::test_gpu_full_batch_matches_reference[out_dtype0-tiny]
"""


def test_a_killed_run_is_counted_from_its_test_lines_not_pytests_header():
    lines = gpu_summary.tests_summary(KILLED)
    assert lines[0].startswith("gpu tests: 3 passed, 1 failed, 1 error, 1 skipped (counted from the test lines;")
    assert "no pytest tally: stopped early or still running" in lines[0] and "340" not in lines[0]
    assert "  gpu test groups in order (call1): training 6, tcr-cuda-recipe 10" in lines
    assert "  FAILED tests/test_train.py::test_cuda_bf16_training_resumes_and_evaluates" in lines
    assert any(line.endswith("[20-100-1024-random-dtype1-cuda]") and "FAILED" in line for line in lines)
    assert lines[-1] == (
        "  stopped in (or still running): "
        "tests/test_tcr_backends.py::test_gpu_backends_against_float64[20-100-1024-random-dtype2-cuda]"
    )


def test_a_finished_run_shows_pytests_tally_beside_the_counted_lines():
    text = KILLED + "PASSED [  3%]\n\n=== 1 failed, 4 passed, 1 skipped, 1 error in 12.34s ===\n"
    lines = gpu_summary.tests_summary(text)
    assert lines[0].startswith("gpu tests: 4 passed, 1 failed, 1 error, 1 skipped")
    assert "pytest's tally: 1 failed, 4 passed, 1 skipped, 1 error in 12.34s" in lines[0]
    assert not any("stopped in" in line for line in lines)


def test_a_rehearsal_collection_is_said_to_be_one():
    text = "tests/test_train.py::test_cuda_bf16_training_resumes\n\n122/1151 tests collected (1029 deselected) in 5s\n"
    assert gpu_summary.tests_summary(text) == ["gpu tests collected, none run: 122"]


def test_pytest_xdist_lines_are_counted_too():
    outcomes = gpu_summary.test_outcomes(XDIST)
    assert [o for _, o in outcomes] == ["PASSED", "FAILED", "SKIPPED", "PASSED"]
    assert outcomes[1][0] == "tests/test_tcr_backends.py::test_gpu_backends_against_float64[3-1-16-near-dtype1-triton]"
    assert gpu_summary.tests_summary(XDIST)[0].startswith("gpu tests: 2 passed, 1 failed, 1 skipped")


def test_a_cut_off_xdist_run_names_every_test_its_workers_were_running():
    """pytest-xdist -v prints each test's id when a worker starts it and its outcome line when it ends: the tests
    started and not ended are the ones running when the output stopped, whichever started last."""
    started = [
        "tests/test_tcr_triton.py::test_a[1]",
        "tests/test_tcr_triton.py::test_a[2]",
        "tests/test_tcr_triton.py::test_a[3]",
    ]
    text = (
        "gpu test groups in order (sweeps): triton-tcr 3\n"
        + "".join(f"{nodeid} \n" for nodeid in started[:2])
        + f"[gw1] [ 33%] PASSED {started[1]} \n"
        + f"{started[2]} \n"
        + f"[gw1] [ 66%] PASSED {started[2]} \n"
    )
    lines = gpu_summary.tests_summary(text)
    assert lines[0].startswith("gpu tests: 2 passed") and lines[-1] == f"  stopped in (or still running): {started[0]}"


def test_the_summary_file_is_written_whole_from_a_cut_off_run(tmp_path):
    row = dict.fromkeys(FIELDS, "")  # the bench's own columns, so the summary reads what the bench writes
    row.update(
        bench="epoch",
        case="b=100 n=20",
        method="captured",
        dtype="bf16",
        ms="36",
        rate="27.8",
        rate_unit="steps/s",
        limit_fraction="0.4",
        limit="bf16 matmul",
        note="CIFAR-10 epoch (500 steps) 18.00 s",
        device="NVIDIA H100",
        versions="torch 2.11.0",
    )
    with open(tmp_path / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerow(row)
        handle.write("epoch,b=100 n=20,published (torch")  # the row being written when the run was killed
    (tmp_path / "tests.txt").write_text(KILLED)
    (tmp_path / "steps.csv").write_text("step,exit,seconds,limit\nenv,0,2,10\ntests,124,165,165\n")
    text = gpu_summary.summarise(str(tmp_path))
    assert (tmp_path / "summary.txt").read_text() == text
    assert "device: NVIDIA H100 | torch 2.11.0" in text and re.search(r"captured\s+bf16\s+36 ms\s+27.8", text)
    assert "captured: CIFAR-10 epoch (500 steps) 18.00 s" in text
    assert "gpu tests: 3 passed, 1 failed, 1 error, 1 skipped" in text
    assert "steps: env ok 2s/10s, tests EXIT 124 165s/165s" in text
    assert sorted(os.listdir(tmp_path)) == ["results.csv", "steps.csv", "summary.txt", "tests.txt"]


# the GPU machine's lease (docs/benchmarks.md section 5): device time counts from the start to the give-back
LEASE_S, START_S, WARM_AFTER_CALL_S = 15 * 60, 90, 30
TRANSFER_S = 15  # the tree out and OUT's files back, per call (a small tree)


def _plan(*steps):
    done = subprocess.run(["bash", "bench/gpu_check.sh", "--plan", *steps], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    plans = {}
    for line in done.stdout.splitlines():
        match = re.match(r"(call \d|this run) \(GPU limits, in order\): (.*) = (\d+) s of (\d+)$", line)
        if not match:
            continue
        steps = [(name, int(limit)) for name, limit in re.findall(r"(\w+) (\d+) s", match.group(2))]
        assert sum(limit for _, limit in steps) == int(match.group(3)) <= int(match.group(4))
        plans[match.group(1)] = (steps, int(match.group(4)))
    return plans, done.stdout


def test_both_calls_plans_fit_their_budgets_in_the_order_of_their_value():
    plans, text = _plan()
    call1, budget1 = plans["call 1"]
    assert budget1 <= 7 * 60 and [n for n, _ in call1] == [
        "env",
        "install",
        "imports",
        "bench_epoch",
        "tests",
        "bench_tcr",
        "bench_augment",
        "summary",
    ]
    call2, budget2 = plans["call 2"]
    assert [n for n, _ in call2] == [
        "env",
        "reuse",  # call 1's warm build, never an install: a fresh machine is refused
        "imports",
        "bench_compiled",
        "tests_compiled",  # a cold Inductor compile, in a step of its own
        "sweeps",
        "summary",
    ]
    # each test step's per-test limit fires inside its step's; the compiled step's test has its 2 minutes
    per_test = dict(re.findall(r"(\w+) (\d+) s[,)]", text.split("per-test limits:")[1]))
    limits = dict(call1 + call2)
    assert set(per_test) == {"tests", "tests_compiled", "sweeps"} and limits["tests_compiled"] >= 120
    assert all(int(seconds) < limits[name] for name, seconds in per_test.items())
    # device time: one start, call 1 to its timeout_s, the wait while the machine stays warm, call 2 to its
    # timeout_s, give_back right after it; each call's budget inside its timeout_s
    timeouts = [int(t) for t in re.findall(r"call \d with timeout_s=(\d+)", text)]
    assert budget1 < timeouts[0] and budget2 < timeouts[1]
    assert START_S + timeouts[0] + WARM_AFTER_CALL_S + timeouts[1] + 2 * TRANSFER_S <= LEASE_S
    assert "give_back right after call 2" in text
    # the kill grace of each step's timeout inside its limit, so the limits bound each call
    script = open(os.path.join(ROOT, "bench", "gpu_check.sh")).read()
    assert 'timeout -k "$GRACE" $(( limit - GRACE ))' in script
    bad = subprocess.run(
        ["bash", "bench/gpu_check.sh", "/nonexistent-out", "nope"], cwd=ROOT, capture_output=True, text=True
    )
    assert bad.returncode == 2 and "unknown step 'nope'" in bad.stdout


def test_a_run_of_chosen_steps_installs_first():
    """On a bare machine chosen steps need the package: the install always runs (it skips itself when warm)."""
    plans, _ = _plan("tests", "bench_tcr")
    assert [n for n, _ in plans["this run"][0]] == ["env", "install", "imports", "tests", "bench_tcr", "summary"]


NODE_IDS = [
    "tests/test_augment_backends.py::test_each_op_alone[flip-triton-cuda]",
    "tests/test_augment_backends.py::test_each_op_alone[crop-cuda]",
    "tests/test_evaluate.py::test_cuda_probe_replaying_its_captured_epoch_equals_the_reference",
    "tests/test_opcheck.py::test_tcr_op[grad-float32-b<d-tcr_forward_backward_triton-cuda]",
    "tests/test_opcheck.py::test_tcr_op[grad-float32-b<d-tcr_forward_backward-cuda]",
    "tests/test_tcr_backends.py::test_gpu_backends_against_float64[3-1-16-random-dtype0-cuda]",
    "tests/test_tcr_backends.py::test_gpu_backends_against_float64[20-100-1024-random-dtype0-triton]",
    "tests/test_tcr_backends.py::test_gpu_backends_against_float64[20-100-1024-random-dtype0-cuda]",
    "tests/test_train_step.py::test_step_variant_gives_the_eager_parameters_after_ten_steps[compiled-captured]",
    "tests/test_train_step.py::test_step_variant_gives_the_eager_parameters_after_ten_steps[captured]",
    "tests/test_new_feature.py::test_something_on_cuda",
]


@pytest.mark.parametrize("call", ["", "call1", "call2", "tests_compiled", "sweeps"])
def test_the_gpu_tests_run_by_value_and_each_call_takes_its_groups(monkeypatch, call):
    monkeypatch.setenv(gpu_order.CALL_ENV, call)
    ordered, counts = gpu_order.plan(NODE_IDS)
    expected = {
        "call1": [
            "tests/test_train_step.py::test_step_variant_gives_the_eager_parameters_after_ten_steps[captured]",
            "tests/test_evaluate.py::test_cuda_probe_replaying_its_captured_epoch_equals_the_reference",
            "tests/test_tcr_backends.py::test_gpu_backends_against_float64[20-100-1024-random-dtype0-cuda]",
            "tests/test_augment_backends.py::test_each_op_alone[crop-cuda]",
            "tests/test_tcr_backends.py::test_gpu_backends_against_float64[3-1-16-random-dtype0-cuda]",
            "tests/test_opcheck.py::test_tcr_op[grad-float32-b<d-tcr_forward_backward-cuda]",
            "tests/test_new_feature.py::test_something_on_cuda",  # no rule names it: "other", never left out
        ],
        "call2": [
            "tests/test_train_step.py::test_step_variant_gives_the_eager_parameters_after_ten_steps[compiled-captured]",
            "tests/test_augment_backends.py::test_each_op_alone[flip-triton-cuda]",
            "tests/test_opcheck.py::test_tcr_op[grad-float32-b<d-tcr_forward_backward_triton-cuda]",
            "tests/test_tcr_backends.py::test_gpu_backends_against_float64[20-100-1024-random-dtype0-triton]",
        ],
    }
    expected["tests_compiled"], expected["sweeps"] = expected["call2"][:1], expected["call2"][1:]
    assert ordered == (expected[call] if call else expected["call1"] + expected["call2"])
    assert sum(counts.values()) == len(ordered)
    monkeypatch.setenv(gpu_order.CALL_ENV, "call3")
    with pytest.raises(ValueError, match="call1 or call2"):
        gpu_order.plan(NODE_IDS)


def test_every_test_has_a_time_limit_and_the_device_checks_own_limit_overrides_it(pytestconfig, tmp_path):
    assert pytestconfig.getini("timeout") == "600"  # pyproject.toml's: the limit CI runs every test under
    (tmp_path / "test_hangs.py").write_text("import time\n\n\ndef test_hangs():\n    time.sleep(30)\n")
    done = subprocess.run(  # the project's pytest settings, the device check's --timeout option on the command line
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-c", os.path.join(ROOT, "pyproject.toml")]
        + ["--rootdir", str(tmp_path), "--timeout=1", str(tmp_path / "test_hangs.py")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1 and "Timeout (>1.0s) from pytest-timeout" in done.stdout, (
        done.stdout[-2000:] + done.stderr[-2000:]
    )
