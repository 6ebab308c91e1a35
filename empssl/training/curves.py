"""Training curves: the loss, its two parts and the learning rate against step, and the online monitoring's kNN
accuracy and effective rank where the run has them (a run folder's curves.png).

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

# (metrics key, panel title) in the order of the panels; the monitoring's panels are drawn when a record has them
CURVE_PANELS = (("loss", "loss"), ("tcr", "L_tcr = -mean R"), ("inv", "L_inv"), ("lr", "learning rate"))
MONITOR_PANELS = (("knn_top1", "online kNN top-1 (held-out subset)"), ("effective_rank", "effective rank of z"))


def curves_figure(records: List[Dict[str, Any]]):
    """A matplotlib Figure with one panel per entry of CURVE_PANELS (and of MONITOR_PANELS where the run was
    monitored), each against step; the L_tcr panel marks the collapsed value where the records carry it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    monitored = [panel for panel in MONITOR_PANELS if any(isinstance(r.get(panel[0]), (int, float)) for r in records)]
    panels = CURVE_PANELS + tuple(monitored)
    columns = 2 if len(panels) <= 4 else 3
    figure = Figure(figsize=(5 * columns, 6.5), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, columns, sharex=True).ravel()
    for ax, (key, title) in zip(axes, panels):
        points = [
            (record["step"], record[key])
            for record in records
            if isinstance(record.get(key), (int, float)) and math.isfinite(record[key])
        ]
        ax.plot([step for step, _ in points], [value for _, value in points], marker="." if len(points) < 50 else None)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
    collapsed = [r["collapsed_coding_rate"] for r in records if isinstance(r.get("collapsed_coding_rate"), float)]
    if collapsed:  # L_tcr = -mean R: collapse is -R at its collapsed value
        axes[1].axhline(
            -collapsed[-1], color="tab:red", linestyle="--", linewidth=1, label="collapsed (-1/2 log(1+d/eps))"
        )
        axes[1].legend(loc="best", fontsize="small")
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax in axes[columns:]:
        ax.set_xlabel("step")
        ax.xaxis.set_tick_params(labelbottom=True)
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
