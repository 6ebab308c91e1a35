"""Training curves: the loss, its two parts and the learning rate against step, from metrics.jsonl.

matplotlib is optional: without it ``write_training_curves`` prints a one-line note and writes
nothing. The figure is drawn with matplotlib's object API and the Agg canvas, so it neither needs
a display nor changes the caller's pyplot backend; the PNG is written atomically.
"""
from __future__ import annotations

import json
import os
import sys
from typing import Any, Dict, List, Optional

from .checkpoint import write_atomically

CURVES_NAME = "curves.png"
# (metrics key, panel title) in the order of the panels
CURVE_PANELS = (("loss", "loss"), ("tcr", "L_tcr = -mean R"), ("inv", "L_inv"), ("lr", "learning rate"))


def read_metrics(path: str) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl, one per step in step order; the last record of a step wins
    (a resumed run logs again the steps after its checkpoint). Unreadable lines (a line cut by a kill) are skipped."""
    by_step: Dict[int, Dict[str, Any]] = {}
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and isinstance(record.get("step"), int) and "event" not in record:  # not a resume mark
                by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def curves_figure(records: List[Dict[str, Any]]):
    """A matplotlib Figure with one panel per entry of CURVE_PANELS, each against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (key, title) in zip(axes, CURVE_PANELS):
        points = [(record["step"], record[key]) for record in records if isinstance(record.get(key), (int, float))]
        ax.plot([step for step, _ in points], [value for _, value in points], marker="." if len(points) < 50 else None)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    return figure


def write_training_curves(metrics_path: str, out_path: Optional[str] = None) -> Optional[str]:
    """Plot ``metrics_path`` to ``out_path`` (default: curves.png beside it); returns the path written.

    None, having written nothing, when matplotlib is not installed (with a one-line note on stderr)
    or when there is no record to plot.
    """
    out_path = out_path or os.path.join(os.path.dirname(os.path.abspath(metrics_path)), CURVES_NAME)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(f"empssl: matplotlib is not installed, so no {os.path.basename(out_path)} (pip install matplotlib)",
              file=sys.stderr)
        return None
    records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    if not records:
        return None
    figure = curves_figure(records)
    write_atomically(out_path, lambda f: figure.savefig(f, format="png", dpi=100))
    return out_path


__all__ = ["CURVES_NAME", "CURVE_PANELS", "read_metrics", "curves_figure", "write_training_curves"]
