"""The installed benchmarks: dispatch, the shared results schema, and a real (toy-sized) run."""

import csv
import os
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


def test_a_row_that_raises_is_written_with_its_error_and_the_next_row_runs(tmp_path, capsys):
    path = tmp_path / "r.csv"
    results = common.Results("epoch", torch.device("cpu"), str(path))
    with results.row("case A", "captured", "bf16"):
        raise RuntimeError("capture failed\nmore detail")
    with results.row("case A", "eager", "bf16"):
        results.add("case A", "eager", 0.5, 2.0, "steps/s", "bf16")
    with pytest.raises(ImportError):  # a missing optional contender is the caller's note, not a failed row
        with results.row("case A", "kornia"):
            raise ImportError("no kornia")
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["method"], r["error"], r["ms"]) for r in rows] == [
        ("captured", "RuntimeError: capture failed", ""),
        ("eager", "", "500"),
    ]
    assert results.failures == 1 and "FAILED: RuntimeError: capture failed" in capsys.readouterr().out


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
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "empssl",
            "bench",
            "tcr",
            "--tiny",
            "--device",
            "cpu",
            "--dtypes",
            "float32",
            "--csv",
            str(path),
            "--no-plot",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    methods = [r["method"] for r in rows]
    assert methods[:3] == ["naive", "batched_logdet", "composite"] and "cpu" in methods
    assert all(r["bench"] == "tcr" and float(r["ms"]) > 0 and float(r["rate"]) > 0 for r in rows)
    assert all("torch " + torch.__version__ in r["versions"] for r in rows)
    assert not list(tmp_path.glob("*.png"))  # --no-plot


@pytest.mark.slow
def test_tcr_benchmark_has_one_row_per_shape_for_its_float32_only_methods(tmp_path):
    """naive, batched_logdet and the whole-loss rows compute in float32: no second row for bf16 inputs."""
    path = tmp_path / "results.csv"
    done = subprocess.run(
        [sys.executable, "-m", "empssl", "bench", "tcr", "--tiny", "--device", "cpu", "--csv", str(path), "--no-plot"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    keys = [(r["case"], r["method"]) for r in rows]
    float32_only = [k for k in keys if k[1] in ("naive", "batched_logdet")]
    assert float32_only and len(float32_only) == len(set(float32_only))
    assert all(r["dtype"] == "float32" for r in rows if r["method"] in ("naive", "batched_logdet"))
    # the kernels that take bf16 do get their bf16 rows
    assert {(r["method"], r["dtype"]) for r in rows} >= {
        ("cpu", "float32"),
        ("cpu", "bfloat16"),
        ("composite", "bfloat16"),
    }


def test_data_benchmark_times_building_and_reading_a_store_against_the_need(tmp_path, monkeypatch):
    import tempfile

    from empssl.bench import data

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where the benchmark makes its trees
    path = tmp_path / "data.csv"
    assert data.main(["--tiny", "--device", "cpu", "--csv", str(path), "--no-plot"]) == 0
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    by_method = {(row["case"], row["method"].split(" (")[0]): row for row in rows}
    assert set(by_method) == {
        ("32x32 (CIFAR size)", "build"),
        ("32x32 (CIFAR size)", "read, in page cache"),
        ("32x32 (CIFAR size)", "read, evicted from cache"),
        ("500x375 -> 448, 4:3", "build"),  # 40 photos: fewer than a batch, no read rows
    }
    read = by_method[("32x32 (CIFAR size)", "read, in page cache")]
    assert read["rate_unit"] == "images/s" and read["limit"] == "need 6,250 images/s"
    assert float(read["limit_fraction"]) == pytest.approx(float(read["rate"]) / 6250, rel=1e-2)
    assert "597x597 canvas" in by_method[("500x375 -> 448, 4:3", "build")]["note"]  # 448 whole up to 4:3
    assert not list(tmp_path.glob("empssl-bench-data-*"))  # the made trees and stores are removed


def test_the_data_benchmark_counts_the_bytes_read_and_stops_its_reader_on_failure(tmp_path, monkeypatch):
    from PIL import Image

    from empssl.bench import data
    from empssl.data.batches import StoreBatches
    from empssl.data.load import load_dataset

    for name in ("train/c", "val/c"):
        os.makedirs(tmp_path / name)
        Image.new("RGB", (40, 30)).save(tmp_path / name / "0.png")  # 4:3, stored 12x16 on a 16x16 canvas
    store = load_dataset(f"folder:{tmp_path}", image_size=12, max_aspect=4 / 3, stream="on").train_images
    assert store.slot_bytes == 16 * 16 * 3 and data.image_bytes(store) == 12 * 16 * 3
    closed, close = [], StoreBatches.close
    monkeypatch.setattr(StoreBatches, "close", lambda self: closed.append(self) or close(self))
    monkeypatch.setattr(StoreBatches, "images", lambda self, *args: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        data._read_epoch(store, torch.device("cpu"), 1, 1)
    assert len(closed) == 2 and closed[1].thread is None  # set_order's own close, then the epoch's: reader stopped
