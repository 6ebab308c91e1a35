"""Training curves: the loss, its two parts and the learning rate against step (a run folder's curves.png).

matplotlib is optional: without it ``write_training_curves`` prints a one-line note and writes
nothing. The figure is drawn with matplotlib's object API and the Agg canvas, so it neither needs
a display nor changes the caller's pyplot backend; the PNG is written atomically.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any, Dict, List, Optional

from ..files import write_atomically

# (metrics key, panel title) in the order of the panels
CURVE_PANELS = (("loss", "loss"), ("tcr", "L_tcr = -mean R"), ("inv", "L_inv"), ("lr", "learning rate"))


def curves_figure(records: List[Dict[str, Any]]):
    """A matplotlib Figure with one panel per entry of CURVE_PANELS, each against step."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2, sharex=True).ravel()
    for ax, (key, title) in zip(axes, CURVE_PANELS):
        points = [
            (record["step"], record[key])
            for record in records
            if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
        ]
        ax.plot([step for step, _ in points], [value for _, value in points], marker="." if len(points) < 50 else None)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    for ax in axes[2:]:
        ax.set_xlabel("step")
    return figure


def write_training_curves(records: List[Dict[str, Any]], out_path: str) -> Optional[str]:
    """Plot ``records`` (one per step, ``run_folder.read_step_metrics``) to ``out_path``; returns the path written.

    None, having written nothing, when matplotlib is not installed (with a one-line note on stderr)
    or when there is no record to plot.
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print(
            f"empssl: matplotlib is not installed, so no {os.path.basename(out_path)} (pip install matplotlib)",
            file=sys.stderr,
        )
        return None
    if not records:
        return None
    figure = curves_figure(records)
    write_atomically(out_path, lambda f: figure.savefig(f, format="png", dpi=100))
    return out_path
