"""Training curves: metrics.jsonl read back, the figure's data, curves.png from train(), and the
behaviour without matplotlib (nothing written, a one-line note)."""

import json
import os
import sys

import pytest

from empssl.bench import common
from empssl.config import TrainConfig
from empssl.data.synthetic import make_synthetic
from empssl.training import curves as plots
from empssl.training import loop as T
from empssl.training.run_folder import CHECKPOINT_NAME, CONFIG_NAME, CURVES_NAME, METRICS_NAME, read_step_metrics

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(
    dataset="synthetic",
    width=0.125,
    hidden_dim=32,
    z_dim=16,
    device="cpu",
    progress=False,
    num_patches=2,
    batch_size=16,
    epochs=1,
    log_every=1,
)


def _require_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError as err:
        pytest.skip(f"optional dependency not installed: matplotlib ({err})")


@pytest.fixture
def no_matplotlib(monkeypatch):
    """``import matplotlib`` fails, as where it is not installed (None in sys.modules halts the import)."""
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def _records(steps):
    return [
        {"step": s, "epoch": s / 10, "loss": 5.0 - s, "tcr": -2.0 * s, "inv": -0.5 - s / 100, "lr": 0.3 / s}
        for s in steps
    ]


def _write_metrics(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_read_metrics_orders_steps_keeps_the_last_record_of_a_step_and_skips_cut_lines(tmp_path):
    first, resumed = _records([1, 2, 3]), _records([3, 4])
    resumed[0]["loss"] = 42.0  # a resumed run logs step 3 again: that record wins
    lines = [json.dumps(r) for r in first] + ['{"step": 4, "lo'] + [json.dumps(r) for r in resumed]
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, lines)
    records = read_step_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["loss"] == 42.0 and records[3] == resumed[1]


def test_without_matplotlib_nothing_is_written_and_one_line_says_why(tmp_path, capsys, no_matplotlib):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, [json.dumps(r) for r in _records([1, 2])])
    assert plots.write_training_curves(read_step_metrics(str(path)), str(tmp_path / CURVES_NAME)) is None
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "matplotlib is not installed, so no curves.png" in note[0]


def test_train_without_matplotlib_writes_its_files_and_no_curves(tmp_path, capsys, no_matplotlib):
    config = TrainConfig(**TINY, max_steps=2, out_dir=str(tmp_path / "run"))
    T.train(config, make_synthetic(32, 16, 8, seed=0))
    assert sorted(os.listdir(config.out_dir)) == [CHECKPOINT_NAME, CONFIG_NAME, METRICS_NAME]
    assert "matplotlib is not installed" in capsys.readouterr().err


def test_curves_figure_plots_each_part_against_step():
    _require_matplotlib()
    records = _records([1, 2, 5, 9])
    del records[1]["tcr"]  # a missing value leaves a gap in that panel only
    figure = plots.curves_figure(records)
    axes = figure.get_axes()
    assert [ax.get_title() for ax in axes] == [title for _, title in plots.CURVE_PANELS]
    for ax, (key, _) in zip(axes, plots.CURVE_PANELS):
        (line,) = ax.get_lines()
        expected = [(r["step"], r[key]) for r in records if key in r]
        assert list(zip(line.get_xdata(), line.get_ydata())) == expected


def test_train_writes_curves_png_beside_the_metrics(tmp_path):
    _require_matplotlib()
    from PIL import Image

    config = TrainConfig(**TINY, max_steps=3, out_dir=str(tmp_path / "run"))
    T.train(config, make_synthetic(64, 16, 8, seed=0))
    assert sorted(os.listdir(config.out_dir)) == [CHECKPOINT_NAME, CONFIG_NAME, CURVES_NAME, METRICS_NAME]  # no temp
    with Image.open(os.path.join(config.out_dir, CURVES_NAME)) as image:
        assert image.format == "PNG" and image.size == (1000, 650)
        # drawn, not blank: the lines and text make many colours
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20


# ---- benchmark plots (empssl.bench.common): one panel per unit, every label inside the image

EPOCH_UNITS = ["steps/s", "of step", "images/s", "samples/s", "queries/s", "evals/s"]  # bench epoch's six


def _bench_rows(units, per_unit=2, label="method"):
    return [
        dict(
            bench="epoch",
            case="b=100 n=20 resnet18-cifar w1.0",
            method=f"{label} {unit} {i}",
            dtype="bf16",
            rate=str(10.0 ** (i + 1)),
            rate_unit=unit,
        )
        for unit in units
        for i in range(per_unit)
    ]


def _assert_every_text_inside(figure):
    figure.canvas.draw()
    renderer = figure.canvas.get_renderer()
    width, height = figure.bbox.width, figure.bbox.height
    texts = [figure._suptitle]
    for ax in figure.get_axes():
        low, high = ax.get_xlim()  # tick labels outside the view are not drawn
        shown = [t for t, x in zip(ax.get_xticklabels(), ax.get_xticks()) if low <= x <= high]
        texts += [*ax.get_yticklabels(), *shown, ax.xaxis.label]
    for text in texts:
        if not text.get_visible() or not text.get_text():
            continue
        box = text.get_window_extent(renderer)
        assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= width and box.y1 <= height, f"clipped: {text.get_text()!r}"


def test_bench_plot_puts_each_unit_on_its_own_panel_and_every_label_inside(tmp_path):
    _require_matplotlib()
    from PIL import Image

    rows = _bench_rows(EPOCH_UNITS)
    rows.insert(3, dict(rows[0], method="captured + compiled", rate="", ms="", rate_unit="", error="RuntimeError: x"))
    figure = common.rows_figure(rows, "epoch on a test device")
    axes = figure.get_axes()
    assert len(axes) == len(EPOCH_UNITS)
    assert [ax.get_xlabel() for ax in axes] == [f"{unit} (log)" for unit in EPOCH_UNITS]
    for ax, unit in zip(axes, EPOCH_UNITS):  # each panel holds the rows of its unit, in order; the failed row none
        assert [t.get_text() for t in ax.get_yticklabels()] == [
            common._row_label(r) for r in rows if r["rate_unit"] == unit and r["rate"]
        ]
    _assert_every_text_inside(figure)
    path = common.plot_rows(rows, str(tmp_path / "epoch.png"), "epoch on a test device")
    with Image.open(path) as image:  # the PNG is the whole figure: nothing cut off by the save either
        assert image.size == tuple(round(v * common.PLOT_DPI) for v in figure.get_size_inches())


def test_bench_plot_is_wide_enough_for_its_longest_label(tmp_path):
    _require_matplotlib()
    from PIL import Image

    long = "lightly EMPSSLLoss with a long note that once ran past the left edge of tcr.png"
    rows = _bench_rows(["groups/s"], per_unit=3) + _bench_rows(["groups/s"], per_unit=1, label=long)
    figure = common.rows_figure(rows, "tcr")
    assert len(figure.get_axes()) == 1
    _assert_every_text_inside(figure)
    short = common.rows_figure(_bench_rows(["groups/s"], per_unit=3), "tcr")
    assert figure.get_size_inches()[0] > short.get_size_inches()[0]  # the figure grows with its labels
    path = common.plot_rows(rows, str(tmp_path / "tcr.png"), "tcr")
    with Image.open(path) as image:
        assert image.size == tuple(round(v * common.PLOT_DPI) for v in figure.get_size_inches())
