"""What every benchmark shares: one timer, one results schema written row by row, the device's limits.

Every benchmark row has the same columns (``FIELDS``) and is appended to its CSV the moment it is
measured (flushed), so a benchmark that is killed keeps every row it finished. Each row names the
device and the versions it ran under. Rates are set against a limit measured in the same run on the
same device: the memory bandwidth of a device-to-device copy, or the dense matmul rate.

Each row stands on its own: a row whose measurement raises (a failed capture or compile, out of
memory) is written with its ``error`` and empty figures, and the benchmark goes on to the next row;
it exits 1 at the end if any row failed.
"""

from __future__ import annotations

import contextlib
import csv
import os
import platform
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch

from ..device import set_tf32, tf32_settings

FIELDS = (
    "bench",
    "case",
    "method",
    "dtype",
    "ms",
    "rate",
    "rate_unit",
    "limit_fraction",
    "limit",
    "note",
    "device",
    "versions",
    "error",
)


def readable_seconds(seconds: float) -> str:
    """A duration in the unit a reader takes in at a glance: ms below 1 s, then s, min, h."""
    if seconds < 1:
        return f"{seconds * 1e3:.3f} ms"
    if seconds < 120:
        return f"{seconds:.2f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def versions() -> str:
    import empssl

    parts = [f"empssl {empssl.__version__}", f"torch {torch.__version__}"]
    if torch.version.cuda:
        parts.append(f"CUDA {torch.version.cuda}")
    try:
        import triton

        parts.append(f"triton {triton.__version__}")
    except ImportError:
        parts.append("triton not installed")
    parts.append(f"python {platform.python_version()}")
    matmul_tf32, cudnn_tf32 = tf32_settings()
    parts.append(f"TF32 matmul {'on' if matmul_tf32 else 'off'}, cuDNN {'on' if cudnn_tf32 else 'off'}")
    return ", ".join(parts)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after ``warmup`` calls.

    The result of each call is dropped before the next (as a training step drops its patches),
    so the allocator reuses the memory; CUDA work is timed with events on the current stream.
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(device: torch.device, megabytes: int = 256) -> float:
    """Bytes per second (read + written) of a device-to-device copy: the memory-bound limit."""
    numel = megabytes * 2**20 // 4
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, repeats=10 if device.type == "cuda" else 3)
    return 2 * src.numel() * src.element_size() / seconds


def matmul_rate(device: torch.device, dtype: torch.dtype, size: Optional[int] = None) -> float:
    """FLOP per second of one dense (size x size) @ (size x size) product: the compute limit."""
    size = size or (8192 if device.type == "cuda" else 1024)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    seconds = time_call(lambda: a @ b, device, repeats=10 if device.type == "cuda" else 3, warmup=2)
    return 2 * size**3 / seconds


class Results:
    """Rows of one benchmark run: printed, appended to ``csv_path`` as they come, kept for a plot."""

    def __init__(self, bench: str, device: torch.device, csv_path: Optional[str]):
        self.bench = bench
        self.torch_device = device
        self.failures = 0  # rows whose measurement raised
        self.device = device_name(device)
        self.versions = versions()  # as the run starts; each row states its own (a row may run under other TF32)
        self.rows: List[Dict[str, object]] = []
        self.csv_path = csv_path
        if csv_path:
            folder = os.path.dirname(os.path.abspath(csv_path))
            os.makedirs(folder, exist_ok=True)
            if not os.path.exists(csv_path) or os.path.getsize(csv_path) == 0:
                with open(csv_path, "w", newline="") as handle:
                    csv.DictWriter(handle, fieldnames=FIELDS).writeheader()
        print(f"{bench}: {self.device} | {self.versions}", flush=True)

    def add(
        self,
        case: str,
        method: str,
        seconds: float,
        rate: float,
        rate_unit: str,
        dtype: str = "",
        limit_fraction: Optional[float] = None,
        limit: str = "",
        note: str = "",
    ) -> Dict[str, object]:
        row = dict(
            bench=self.bench,
            case=case,
            method=method,
            dtype=dtype,
            ms=f"{seconds * 1e3:.4g}",
            rate=f"{rate:.4g}",
            rate_unit=rate_unit,
            limit_fraction="" if limit_fraction is None else f"{limit_fraction:.3g}",
            limit=limit,
            note=note,
            device=self.device,
            versions=versions(),
            error="",
        )
        self._write(row)
        fraction = f"  {float(row['limit_fraction']):6.1%} of {limit}" if row["limit_fraction"] else ""
        print(
            f"  {case:28s} {method:24s} {dtype:9s} {readable_seconds(seconds):>12s} {rate:12.4g} {rate_unit}{fraction}"
            + (f"  ({note})" if note else ""),
            flush=True,
        )
        return row

    def failed(self, case: str, method: str, error: BaseException, dtype: str = "") -> Dict[str, object]:
        """The row of a measurement that raised: no figures, the error's type and first line."""
        message = (str(error).strip().splitlines() or [""])[0][:300]
        row = dict(
            bench=self.bench,
            case=case,
            method=method,
            dtype=dtype,
            ms="",
            rate="",
            rate_unit="",
            limit_fraction="",
            limit="",
            note="",
            device=self.device,
            versions=versions(),
            error=f"{type(error).__name__}: {message}",
        )
        self._write(row)
        self.failures += 1
        print(f"  {case:28s} {method:24s} {dtype:9s} FAILED: {row['error']}", flush=True)
        return row

    @contextlib.contextmanager
    def row(self, case: str, method: str, dtype: str = ""):
        """Run one row's measurement: an exception in it becomes that row's ``failed`` row, and the caller goes
        on to its next row (KeyboardInterrupt and SystemExit still stop the benchmark; an ImportError passes
        through too: a missing optional contender is its caller's note, not a failed measurement)."""
        try:
            yield
        except ImportError:
            raise
        except Exception as err:  # noqa: BLE001  a capture, compile or out-of-memory error must not end the run
            self.failed(case, method, err, dtype)
            if self.torch_device.type == "cuda":
                torch.cuda.empty_cache()  # an out-of-memory row leaves its cached blocks to the next one

    def _write(self, row: Dict[str, object]) -> None:
        self.rows.append(row)
        if self.csv_path:
            with open(self.csv_path, "a", newline="") as handle:
                csv.DictWriter(handle, fieldnames=FIELDS).writerow(row)
                handle.flush()
                os.fsync(handle.fileno())

    def note(self, text: str) -> None:
        print(f"  note: {text}", flush=True)

    def plot(self, path: str) -> Optional[str]:
        """A horizontal bar chart of the rates (log scale), where matplotlib is installed."""
        return plot_rows(self.rows, path, f"{self.bench} on {self.device}")


PLOT_DPI = 110
PLOT_FONT = 6  # points, the row labels'


def _row_label(row: Dict[str, object]) -> str:
    return f"{row['bench']} {row['case']} {row['dtype']} {row['method']}".replace("  ", " ")


def rows_figure(rows: List[Dict[str, object]], title: str):
    """A matplotlib Figure of horizontal bars of the rates (log scale), one panel per rate unit (rates of
    different units share no axis), rows in their order; failed rows (no rate) left out. The figure is wide
    enough for its longest label, and its constrained layout keeps every label inside it. None without rows."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = [r for r in rows if r.get("rate") not in ("", None)]
    if not rows:
        return None
    units = list(dict.fromkeys(str(r["rate_unit"]) for r in rows))  # first-seen order
    panels = [[r for r in rows if r["rate_unit"] == unit] for unit in units]
    longest = max(len(_row_label(r)) for r in rows)
    label_inches = longest * PLOT_FONT * 0.62 / 72  # an upper bound of a character's width in the default font
    height = 0.5 * len(panels) + 0.2 * len(rows) + 0.4
    figure = Figure(figsize=(4.5 + label_inches, height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=[len(p) + 1.5 for p in panels])[:, 0]
    for ax, unit, panel in zip(axes, units, panels):
        ax.barh(range(len(panel)), [float(r["rate"]) for r in panel])
        ax.set_yticks(range(len(panel)), [_row_label(r) for r in panel], fontsize=PLOT_FONT)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlabel(f"{unit} (log)", fontsize=7)
        ax.tick_params(axis="x", labelsize=6)
    figure.suptitle(title, fontsize=8)
    return figure


def plot_rows(rows: List[Dict[str, object]], path: str, title: str) -> Optional[str]:
    """``rows_figure`` written to ``path`` as a PNG, where matplotlib is installed; the path, or None."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("  note: matplotlib not installed: no plot", flush=True)
        return None
    figure = rows_figure(rows, title)
    if figure is None:
        return None
    figure.savefig(path, dpi=PLOT_DPI)
    print(f"  wrote {path}", flush=True)
    return path


def make_parser(bench: str, doc: str):
    """The benchmark's parser with the options every benchmark shares: --out / --csv / --no-plot /
    --device, --quick and --tiny; ``doc`` is the module docstring (first line, then the usage)."""
    import argparse

    parser = argparse.ArgumentParser(
        prog=f"empssl bench {bench}",
        description=doc.splitlines()[0],
        epilog=doc.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_output_arguments(parser)
    parser.add_argument("--quick", action="store_true", help="CPU-sized: small sizes, few repeats")
    parser.add_argument(
        "--tiny", action="store_true", help="seconds-long run at toy sizes (checks the script, not speed)"
    )
    return parser


def add_output_arguments(parser) -> None:
    """--out / --csv / --no-plot / --device, the same for every benchmark."""
    parser.add_argument("--out", default="results", help="folder for <bench>.csv and <bench>.png (default: results)")
    parser.add_argument("--csv", default=None, help="append the rows to this CSV instead of OUT/<bench>.csv")
    parser.add_argument("--no-plot", action="store_true", help="no PNG")
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu or cuda[:N] (default: cuda when a GPU is present)",
    )


def open_results(bench: str, args) -> Results:
    """The benchmark's results; first sets float32 precision as training does (TrainConfig.tf32), so every row
    states a chosen TF32 setting (in its versions), not torch's defaults."""
    from ..config import TrainConfig

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"{bench}: --device {args.device} asked for, but no CUDA GPU is available here")
    set_tf32(TrainConfig.tf32, TrainConfig.tf32)
    return Results(bench, device, args.csv or os.path.join(args.out, f"{bench}.csv"))


def finish(results: Results, args) -> int:
    if not args.no_plot:
        folder = os.path.dirname(os.path.abspath(results.csv_path)) if args.csv else args.out
        results.plot(os.path.join(folder, f"{results.bench}.png"))
    print(f"  wrote {results.csv_path}", flush=True)
    if results.failures:
        print(f"  {results.failures} row(s) FAILED (their error column says why); the other rows ran", flush=True)
        return 1
    return 0
