"""empssl bench epoch: a toy-sized run writes the eager step, its profile and phase shares, the published path and the
evaluation, each row consistent with its extrapolation and written before anything after it runs; the counters it
uses count what they say; the published path runs under torch's TF32 defaults, as the authors ran it."""

import csv
import dataclasses
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from empssl.bench import BENCHMARKS, common, evaluation
from empssl.bench import epoch as bench_epoch
from empssl.bench import published as bench_published
from empssl.config import STEP_VARIANTS, TrainConfig
from empssl.device import float32_precision


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
    torch.testing.assert_close(bench_published.published_loss(z), expected, rtol=1e-12, atol=1e-12)


def test_the_published_baseline_runs_under_torchs_own_tf32_defaults():
    """What a fresh torch process sets (the authors' code never changes it) is what the published rows run under."""
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; print(torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.stdout.split() == [str(v) for v in bench_published.TORCH_DEFAULT_TF32]
    assert bench_published.tf32_label(bench_published.TORCH_DEFAULT_TF32) == "torch defaults: TF32 convolutions"
    assert "convolutions off" in bench_published.tf32_label(bench_published.TF32_OFF)


def test_the_step_backends_are_named_before_anything_runs():
    config = TrainConfig(batch_size=4, num_patches=2, z_dim=32)
    assert bench_epoch.step_backends(config, torch.device("cpu")) == {"augment": "cpu", "tcr": "cpu"}
    reference = dataclasses.replace(config, augment_backend="reference", loss_backend="reference")
    assert bench_epoch.step_backends(reference, torch.device("cpu")) == {"augment": "reference", "tcr": "reference"}


class _SlowImages:
    """Images whose every read takes ``seconds``: a PIL pipeline slower than the step, as on a GPU."""

    def __init__(self, images, seconds):
        self.images, self.seconds = images, seconds

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        time.sleep(self.seconds)
        return self.images[index]


def test_the_published_path_is_timed_at_the_rate_its_workers_deliver_batches():
    """Data-bound (each worker takes 0.32 s a batch, so 2 workers give one every 0.16 s), the timed steps must
    not include batches the workers prepared before the clock started, nor a partial round of them."""
    config = TrainConfig(width=0.125, hidden_dim=64, z_dim=32, batch_size=4, num_patches=2)
    images = _SlowImages(np.zeros((8, 32, 32, 3), dtype=np.uint8), 0.08)
    seconds = bench_published.time_published(torch.device("cpu"), config, 3, 2, images)
    assert seconds >= 0.9 * 0.16, seconds
    assert bench_published.published_schedule(10, 8) == (16, 16)  # the GPU run's: 2 rounds ahead, 2 timed
    assert bench_published.published_schedule(3, 0) == (1, 3)  # no workers: nothing prepared ahead


def test_each_row_states_the_tf32_setting_it_ran_under(tmp_path):
    """The published rows run under torch's TF32 defaults inside a run that set its own: each row says its own."""
    results = common.Results("epoch", torch.device("cpu"), str(tmp_path / "results.csv"))
    with float32_precision(False, cudnn=True):
        defaults = results.add("case", "published (torch defaults)", 1.0, 1.0, "steps/s")
    with float32_precision(True, cudnn=False):
        swapped = results.add("case", "published (TF32 swapped)", 1.0, 1.0, "steps/s")
    assert "TF32 matmul off, cuDNN on" in defaults["versions"]
    assert "TF32 matmul on, cuDNN off" in swapped["versions"]


def test_the_float32_knn_is_set_against_the_float32_matmul_rate(monkeypatch, tmp_path):
    """On a GPU the step's limit is the bf16 matmul rate; the kNN's products are float32 and take that rate."""
    rates = {torch.float32: 1e9}
    seconds = 0.0123  # every timing fixed, so the row's rounded fraction is known exactly
    monkeypatch.setattr(common, "matmul_rate", lambda device, dtype, size=None: rates[dtype])
    monkeypatch.setattr(common, "time_call", lambda fn, device, repeats, warmup=1: seconds)
    size = bench_epoch.SIZES["tiny"]
    config = dataclasses.replace(TrainConfig(), **size["model"], device="cpu", progress=False)
    results = common.Results("epoch", torch.device("cpu"), str(tmp_path / "results.csv"))
    evaluation.time_evaluation(torch.device("cpu"), config, size, results, 1e30, torch.bfloat16)
    knn = next(row for row in results.rows if row["method"].startswith("kNN"))
    knn_train, knn_test = size["knn"]
    flops_per_second = 2 * knn_train * knn_test * config.hidden_dim / seconds
    assert knn["limit"] == "float32 matmul"
    assert knn["limit_fraction"] == f"{flops_per_second / 1e9:.3g}"


@pytest.mark.parametrize("text", ["", "eager,warp", "compiled;captured"])
def test_bad_variant_lists_are_refused(text):
    with pytest.raises(ValueError, match="--variants takes"):
        bench_epoch._variant_list(text)
    assert bench_epoch._variant_list("all") == list(STEP_VARIANTS)


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
    assert "captured" not in rows and "backends the step will run on cpu: augment cpu, tcr cpu" in done.stdout
    published = next(m for m in rows if m.startswith("published"))
    assert published == "published (torch defaults: TF32 convolutions)"  # the authors' settings: the baseline
    assert "the speed-up: the fastest step above is" in rows[published]["note"]
    for method in ("eager", published):
        row = rows[method]
        assert row["bench"] == "epoch" and float(row["ms"]) > 0
        assert float(row["rate"]) == pytest.approx(1e3 / float(row["ms"]), rel=1e-3)  # steps/s is 1 / step time
        epoch_seconds = _seconds(r"\(500 steps\) ([0-9.]+) (ms|s|min|h);", row["note"])
        assert epoch_seconds == pytest.approx(500 * float(row["ms"]) / 1e3, rel=5e-2)  # 3-4 digits printed
    profile = rows["eager: kernels per step"]
    assert profile["rate_unit"] == "aten ops/step" and float(profile["rate"]) > 50
    assert "host syncs/step n/a off CUDA" in profile["note"]
    methods = list(rows)
    assert methods.index("eager") < methods.index("eager: kernels per step")  # the timed row first, then its profile
    shares = [float(rows[f"share {phase} (eager, profiled)"]["rate"]) for phase in bench_epoch.PHASES]
    assert all(share > 0 for share in shares) and sum(shares) == pytest.approx(1.0, abs=1e-3)
    evaluation = next(r for m, r in rows.items() if m.startswith("CIFAR-10 evaluation"))
    parts = [_number(rf"{name} ([0-9.e+]+) s", evaluation["note"]) for name in ("features", "probe", "kNN")]
    assert float(evaluation["ms"]) / 1e3 == pytest.approx(sum(parts), rel=1e-2)
    probe = next(r for m, r in rows.items() if m.startswith("linear probe"))
    # 500 train + 100 test features, 1 epoch -> 50,000 + 10,000 features, 100 epochs: x 10,000
    assert parts[1] == pytest.approx(float(probe["ms"]) / 1e3 * 1e4, rel=1e-2)
    features = next(r for m, r in rows.items() if m.startswith("features folded"))
    patch_rate = _number(r"([0-9.e+]+) patch forwards/s", features["note"])
    assert parts[0] == pytest.approx(60000 * 128 / patch_rate, rel=1e-2)


@pytest.fixture
def tf32_restored():
    """bench main() sets the TF32 switches as training does: restore the process's afterwards."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.slow
@pytest.mark.parametrize("failing", ["eager", "published", "profile"])
def test_a_failing_row_is_written_with_its_error_and_the_next_rows_run(tmp_path, monkeypatch, tf32_restored, failing):
    """A deliberately failing row (the eager step raising as a failed capture would, the published path out of
    memory, or the profile after a timed step) becomes a row with its error; every row before it is written and
    every row after it still measured and written; the exit code is 1."""
    if failing == "eager":
        error = RuntimeError("CUDA graph capture failed (deliberate, for this test)\nsecond line")
        prepare = bench_epoch.prepare_variant

        def failing_prepare(device, config, variant, *args):
            if variant == "eager":
                raise error
            return prepare(device, config, variant, *args)

        monkeypatch.setattr(bench_epoch, "prepare_variant", failing_prepare)
    elif failing == "published":
        error = torch.OutOfMemoryError("CUDA out of memory (deliberate, for this test)")

        def failing_published(*args):
            raise error

        monkeypatch.setattr(bench_epoch, "time_published", failing_published)
    else:
        error = RuntimeError("the profiler failed (deliberate, for this test)")

        def failing_count(*args):
            raise error

        monkeypatch.setattr(bench_epoch, "count_kernels", failing_count)
    path = tmp_path / "results.csv"
    code = bench_epoch.main(["--tiny", "--device", "cpu", "--csv", str(path), "--no-plot"])
    with open(path) as handle:
        rows = list(csv.DictReader(handle))
    methods = [r["method"] for r in rows]
    failed = [r for r in rows if r["error"]]
    failing_method = {
        "eager": "eager",
        "published": "published (torch defaults: TF32 convolutions)",
        "profile": "eager: kernels per step",
    }[failing]
    assert code == 1 and [r["method"] for r in failed] == [failing_method]
    assert failed[0]["error"] == f"{type(error).__name__}: {str(error).splitlines()[0]}"
    assert failed[0]["ms"] == failed[0]["rate"] == ""
    after = methods[methods.index(failing_method) + 1 :]
    assert any(m.startswith("published") for m in after) if failing != "published" else True
    assert any(m.startswith("CIFAR-10 evaluation") for m in after)  # the last rows of the run
    if failing == "profile":  # the step was timed and written before its profile ran
        assert methods[: methods.index(failing_method)] == ["eager"] and float(rows[0]["ms"]) > 0
    assert all(float(r["ms"]) > 0 for r in rows if not r["error"])
