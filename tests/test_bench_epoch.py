"""empssl bench epoch: a toy-sized run writes the eager step, its phase shares, the published path and the
evaluation, each row consistent with its extrapolation; the counters it uses count what they say."""

import csv
import re
import subprocess
import sys

import pytest
import torch

from empssl.bench import BENCHMARKS, common
from empssl.bench import epoch as bench_epoch


def test_epoch_is_a_registered_benchmark():
    assert "epoch" in BENCHMARKS


def test_counters_count_ops_and_skip_syncs_off_cuda():
    x = torch.randn(8, 8)
    assert bench_epoch.count_kernels(lambda: (x @ x).relu_().sum(), torch.device("cpu")) == 3
    assert bench_epoch.count_host_syncs(lambda: x.sum().item(), torch.device("cpu")) is None


def test_published_loss_is_the_authors_formula():
    generator = torch.Generator().manual_seed(torch.seed())
    z = torch.nn.functional.normalize(torch.randn(3, 6, 5, generator=generator, dtype=torch.float64), dim=-1)
    tcr = 0.0
    for i in range(3):  # R(Z_i) = 1/2 logdet(I + d / (b eps) Z_i^T Z_i)
        tcr += torch.logdet(torch.eye(5, dtype=torch.float64) + 5 / (6 * 0.2) * z[i].T @ z[i]) / 2
    zbar = z.mean(0)
    cos = torch.stack(
        [torch.stack([z[i, j] @ zbar[j] / (z[i, j].norm() * zbar[j].norm()) for j in range(6)]) for i in range(3)]
    )
    expected = -tcr / 3 - 200 * cos.mean()
    torch.testing.assert_close(bench_epoch.published_loss(z), expected, rtol=1e-12, atol=1e-12)


def _number(pattern, text):
    return float(re.search(pattern, text).group(1))


UNIT_SECONDS = {"ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}


def _seconds(pattern, text):
    """A duration written by common.readable_seconds ("850.000 ms", "12.34 s", "3.2 min", "4.0 h"), in seconds."""
    value, unit = re.search(pattern, text).groups()
    return float(value) * UNIT_SECONDS[unit]


@pytest.mark.parametrize(
    "seconds, text", [(0.0125, "12.500 ms"), (14.38, "14.38 s"), (14380.0, "4.0 h"), (300.0, "5.0 min")]
)
def test_durations_are_printed_in_a_readable_unit(seconds, text):
    assert common.readable_seconds(seconds) == text


@pytest.mark.slow
def test_epoch_benchmark_tiny_run_writes_every_row(tmp_path):
    path = tmp_path / "results.csv"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "empssl",
            "bench",
            "epoch",
            "--tiny",
            "--device",
            "cpu",
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
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert "captured" not in rows and "need a CUDA GPU" in done.stdout  # the captured steps need CUDA
    for method in ("eager", "published"):
        row = rows[method]
        assert row["bench"] == "epoch" and float(row["ms"]) > 0
        assert float(row["rate"]) == pytest.approx(1e3 / float(row["ms"]), rel=1e-3)  # steps/s is 1 / step time
        epoch_seconds = _seconds(r"\(500 steps\) ([0-9.]+) (ms|s|min|h);", row["note"])
        assert epoch_seconds == pytest.approx(500 * float(row["ms"]) / 1e3, rel=5e-2)  # 3-4 digits printed
    assert _number(r"; (\d+) aten ops/step", rows["eager"]["note"]) > 50
    shares = [float(rows[f"share {phase} (eager, profiled)"]["rate"]) for phase in bench_epoch.PHASES]
    assert all(share > 0 for share in shares) and sum(shares) == pytest.approx(1.0, abs=1e-3)
    evaluation = next(r for m, r in rows.items() if m.startswith("CIFAR-10 evaluation"))
    parts = [_number(rf"{name} ([0-9.e+]+) s", evaluation["note"]) for name in ("features", "probe", "kNN")]
    assert float(evaluation["ms"]) / 1e3 == pytest.approx(sum(parts), rel=1e-2)
    probe = next(r for m, r in rows.items() if m.startswith("linear probe"))
    # 500 train + 100 test features, 1 epoch -> 50,000 + 10,000 features, 100 epochs: x 10,000
    assert parts[1] == pytest.approx(float(probe["ms"]) / 1e3 * 1e4, rel=1e-2)
    features = next(r for m, r in rows.items() if m.startswith("features"))
    patch_rate = _number(r"([0-9.e+]+) patch forwards/s", features["note"])
    assert parts[0] == pytest.approx(60000 * 128 / patch_rate, rel=1e-2)


@pytest.fixture
def tf32_restored():
    """bench main() sets the TF32 switches as training does: restore the process's afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["eager", "published"])
def test_a_failing_row_is_written_with_its_error_and_the_next_rows_run(tmp_path, monkeypatch, tf32_restored, failing):
    """A deliberately failing row (the eager step raising as a failed capture would, or the published path out of
    memory) becomes a row with its error; every row after it is still measured and written; the exit code is 1."""
    time_steps = bench_epoch.time_steps
    if failing == "eager":
        error = RuntimeError("CUDA graph capture failed (deliberate, for this test)\nsecond line")

        def failing_steps(device, config, method, *args):
            if method == "eager":
                raise error
            return time_steps(device, config, method, *args)

        monkeypatch.setattr(bench_epoch, "time_steps", failing_steps)
    else:
        error = torch.OutOfMemoryError("CUDA out of memory (deliberate, for this test)")

        def failing_published(*args):
            raise error

        monkeypatch.setattr(bench_epoch, "time_published", failing_published)
    path = tmp_path / "results.csv"
    code = bench_epoch.main(["--tiny", "--device", "cpu", "--csv", str(path), "--no-plot"])
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    methods = [r["method"] for r in rows]
    failed = [r for r in rows if r["error"]]
    assert code == 1 and [r["method"] for r in failed] == [failing]
    assert failed[0]["error"] == f"{type(error).__name__}: {str(error).splitlines()[0]}"
    assert failed[0]["ms"] == failed[0]["rate"] == ""
    after = methods[methods.index(failing) + 1 :]
    assert "published" in after if failing == "eager" else "published" not in after
    assert any(m.startswith("CIFAR-10 evaluation") for m in after)  # the last rows of the run
    assert all(float(r["ms"]) > 0 for r in rows if not r["error"])
