"""The installed benchmarks: dispatch, the shared results schema, and a real (toy-sized) run."""
import csv
import subprocess
import sys

import pytest
import torch

from empssl.bench import common


def test_results_rows_reach_the_csv_as_they_are_measured(tmp_path):
    path = tmp_path / "r.csv"
    results = common.Results("tcr", torch.device("cpu"), str(path))
    results.add("case A", "method 1", 0.002, 500.0, "groups/s", "float32", 0.25, "copy GB/s", "first")
    with open(path) as handle:  # before any finish(): a killed benchmark keeps this row
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["method 1"] and list(rows[0]) == list(common.FIELDS)
    assert float(rows[0]["ms"]) == 2.0 and float(rows[0]["limit_fraction"]) == 0.25
    again = common.Results("augment", torch.device("cpu"), str(path))  # a second benchmark appends, one header
    again.add("case B", "method 2", 0.5, 2.0, "patches/s")
    with open(path) as handle:
        lines = handle.read().splitlines()
    assert len(lines) == 3 and lines[0].split(",")[0] == "bench"
    assert [line.split(",")[0] for line in lines[1:]] == ["tcr", "augment"]


def test_time_call_is_the_median_after_warmup(monkeypatch):
    clock = [0.0]
    durations = iter([5.0, 0.03, 0.01, 0.02])  # the first call is the warm-up: not timed
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def fn():
        clock[0] += next(durations)

    assert common.time_call(fn, torch.device("cpu"), repeats=3, warmup=1) == pytest.approx(0.02)


@pytest.mark.slow  # a subprocess that imports every benchmark: ~8 s
def test_unknown_benchmark_is_a_usage_error():
    done = subprocess.run([sys.executable, "-m", "empssl", "bench", "nope"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown benchmark 'nope'" in done.stderr


@pytest.mark.slow
def test_tcr_benchmark_tiny_run_writes_every_method(tmp_path):
    path = tmp_path / "results.csv"
    done = subprocess.run([sys.executable, "-m", "empssl", "bench", "tcr", "--tiny", "--device", "cpu",
                           "--dtypes", "float32", "--csv", str(path), "--no-plot"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["naive", "batched_logdet", "composite"] and "cpu" in methods
    assert all(r["bench"] == "tcr" and float(r["ms"]) > 0 and float(r["rate"]) > 0 for r in rows)
    assert all("torch " + torch.__version__ in r["versions"] for r in rows)
    assert not list(tmp_path.glob("*.png"))  # --no-plot
