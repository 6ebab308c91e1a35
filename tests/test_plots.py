"""Training curves: metrics.jsonl read back, the figure's data, curves.png from train(), and the
behaviour without matplotlib (nothing written, a one-line note)."""
import json
import os
import sys

import pytest

from empssl import plots
from empssl import train as T
from empssl.data import make_synthetic

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = dict(dataset="synthetic", width=0.125, hidden_dim=32, z_dim=16, device="cpu", progress=False,
            num_patches=2, batch_size=16, epochs=1, log_every=1)


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
    return [{"step": s, "epoch": s / 10, "loss": 5.0 - s, "tcr": -2.0 * s, "inv": -0.5 - s / 100, "lr": 0.3 / s}
            for s in steps]


def _write_metrics(path, lines):
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def test_read_metrics_orders_steps_keeps_the_last_record_of_a_step_and_skips_cut_lines(tmp_path):
    first, resumed = _records([1, 2, 3]), _records([3, 4])
    resumed[0]["loss"] = 42.0  # a resumed run logs step 3 again: that record wins
    lines = [json.dumps(r) for r in first] + ['{"step": 4, "lo'] + [json.dumps(r) for r in resumed]
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, lines)
    records = plots.read_metrics(str(path))
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[2]["loss"] == 42.0 and records[3] == resumed[1]


def test_without_matplotlib_nothing_is_written_and_one_line_says_why(tmp_path, capsys, no_matplotlib):
    path = tmp_path / "metrics.jsonl"
    _write_metrics(path, [json.dumps(r) for r in _records([1, 2])])
    assert plots.write_training_curves(str(path)) is None
    assert sorted(os.listdir(tmp_path)) == ["metrics.jsonl"]
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and "matplotlib is not installed, so no curves.png" in note[0]


def test_train_without_matplotlib_writes_its_files_and_no_curves(tmp_path, capsys, no_matplotlib):
    config = T.TrainConfig(**TINY, max_steps=2, out_dir=str(tmp_path / "run"))
    T.train(config, make_synthetic(32, 16, 8, seed=0))
    assert sorted(os.listdir(config.out_dir)) == [T.CHECKPOINT_NAME, T.METRICS_NAME]
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

    config = T.TrainConfig(**TINY, max_steps=3, out_dir=str(tmp_path / "run"))
    T.train(config, make_synthetic(64, 16, 8, seed=0))
    assert sorted(os.listdir(config.out_dir)) == [T.CHECKPOINT_NAME, plots.CURVES_NAME, T.METRICS_NAME]  # no temp file
    with Image.open(os.path.join(config.out_dir, plots.CURVES_NAME)) as image:
        assert image.format == "PNG" and image.size == (1000, 650)
        # drawn, not blank: the lines and text make many colours
        assert len(image.convert("RGB").getcolors(maxcolors=1 << 20)) > 20
