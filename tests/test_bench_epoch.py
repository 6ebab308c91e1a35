"""empssl bench epoch: a toy-sized run writes a timed eager row with its epoch extrapolation."""
import csv
import subprocess
import sys

import pytest

from empssl.bench import BENCHMARKS


def test_epoch_is_a_registered_benchmark():
    assert "epoch" in BENCHMARKS


@pytest.mark.slow
def test_epoch_benchmark_tiny_run_writes_the_eager_row(tmp_path):
    path = tmp_path / "results.csv"
    done = subprocess.run([sys.executable, "-m", "empssl", "bench", "epoch", "--tiny", "--device", "cpu",
                           "--csv", str(path), "--no-plot"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert [r["method"] for r in rows] == ["eager"]  # the captured step needs CUDA
    row = rows[0]
    assert row["bench"] == "epoch" and float(row["ms"]) > 0
    assert float(row["rate"]) == pytest.approx(1e3 / float(row["ms"]), rel=1e-3)  # steps/s is 1 / step time
    epoch_seconds = float(row["note"].split("(500 steps) ")[1].split(" s;")[0])
    assert epoch_seconds == pytest.approx(500 * float(row["ms"]) / 1e3, rel=1e-2)
    assert "needs a CUDA GPU" in done.stdout
