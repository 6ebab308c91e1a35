"""empssl bench epoch: a toy-sized run writes the eager step, its phase shares, the published path and the
evaluation, each row consistent with its extrapolation; the counters it uses count what they say."""
import csv
import re
import subprocess
import sys

import pytest
import torch

from empssl.bench import BENCHMARKS
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
    cos = torch.stack([torch.stack([z[i, j] @ zbar[j] / (z[i, j].norm() * zbar[j].norm()) for j in range(6)])
                       for i in range(3)])
    expected = -tcr / 3 - 200 * cos.mean()
    torch.testing.assert_close(bench_epoch.published_loss(z), expected, rtol=1e-12, atol=1e-12)


def _number(pattern, text):
    return float(re.search(pattern, text).group(1))


@pytest.mark.slow
def test_epoch_benchmark_tiny_run_writes_every_row(tmp_path):
    path = tmp_path / "results.csv"
    done = subprocess.run([sys.executable, "-m", "empssl", "bench", "epoch", "--tiny", "--device", "cpu",
                           "--csv", str(path), "--no-plot"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    with open(path) as handle:
        rows = {r["method"]: r for r in csv.DictReader(handle)}
    assert "captured" not in rows and "need a CUDA GPU" in done.stdout  # the captured steps need CUDA
    for method in ("eager", "published"):
        row = rows[method]
        assert row["bench"] == "epoch" and float(row["ms"]) > 0
        assert float(row["rate"]) == pytest.approx(1e3 / float(row["ms"]), rel=1e-3)  # steps/s is 1 / step time
        epoch_seconds = _number(r"\(500 steps\) ([0-9.]+) s;", row["note"])
        assert epoch_seconds == pytest.approx(500 * float(row["ms"]) / 1e3, rel=1e-2, abs=0.06)
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
