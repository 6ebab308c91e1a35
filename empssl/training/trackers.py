"""The tracking tools a run logs to beside its metrics.jsonl: TensorBoard (``--tensorboard``) and Weights & Biases
(``--wandb PROJECT``), both optional packages (docs/training.md section 9).

A tracker sees exactly the records of the run's metrics.jsonl, from the process that writes it (rank 0, through
``RunFolder``): ``start(history)`` once the run owns its folder, with the records the run already has (a resumed
run's lines up to its checkpoint), then ``log(record)`` for each new line, ``close()`` at the end. A resumed run so
continues the same curves and never logs a step twice:

- TensorBoard: the events mirror metrics.jsonl. ``start`` removes the folder's earlier event files (a resumed
  run's history is cut back to its checkpoint, and a replaced run's is gone) and writes the history again into a
  new file that opens with a purge marker, so that a TensorBoard already showing the old events drops them too.
- Weights & Biases: the run's id is the run's ``run_id`` (resumed with ``resume="allow"``), and a record whose step
  is below the step W&B expects next (it holds that step already) is not sent again. Offline mode
  (``WANDB_MODE=offline``) writes each process's part of the run under OUT_DIR/wandb for ``wandb sync``: a resumed
  process whose earlier parts are there logs only its new steps.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import Any, Dict, List, Optional

TENSORBOARD_FOLDER = "tensorboard"  # in the run folder: `tensorboard --logdir OUT_DIR/tensorboard`
WANDB_FOLDER = "wandb"  # wandb makes it under the run folder
_EVENT_FILE = re.compile(r"^events\.out\.tfevents\.")  # the names TensorBoard's writers give their files
# metrics.jsonl key -> the scalar's name in the tracking tools
SCALARS = {
    "loss": "train/loss",
    "tcr": "train/tcr",
    "inv": "train/inv",
    "lr": "train/lr",
    "patches_per_s": "train/patches_per_s",
    "epoch": "train/epoch",
    "elapsed_s": "train/elapsed_s",
    "knn_top1": "monitor/knn_top1",
    "effective_rank": "monitor/effective_rank",
    "coding_rate": "monitor/coding_rate",
    "collapsed_coding_rate": "monitor/collapsed_coding_rate",
    "monitor_s": "monitor/seconds",
}


def scalars_of(record: Dict[str, Any]) -> Dict[str, float]:
    """The tracked scalars of a metrics record, by their tracker names (a resume marker has none)."""
    if "event" in record:
        return {}
    return {
        name: float(record[key])
        for key, name in SCALARS.items()
        if isinstance(record.get(key), (int, float)) and not isinstance(record.get(key), bool)
    }


def optional_package(module: str, option: str, package: str):
    """The imported module, or ValueError in one line saying what to install."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ValueError(
            f"{option} needs the {package} package, which is not installed: pip install {package}"
        ) from err


class TensorBoardTracker:
    """Scalar events in ``folder``/tensorboard, written with torch.utils.tensorboard's SummaryWriter."""

    def __init__(self, folder: str):
        self.path = os.path.join(folder, TENSORBOARD_FOLDER)
        self.writer = None
        optional_package("tensorboard", "--tensorboard", "tensorboard")
        self.summary = optional_package("torch.utils.tensorboard", "--tensorboard", "tensorboard")

    def start(self, history: List[Dict[str, Any]]) -> None:
        if os.path.isdir(self.path):
            for name in os.listdir(self.path):
                if _EVENT_FILE.match(name):
                    os.remove(os.path.join(self.path, name))
        # the purge marker: a TensorBoard that read the removed files drops their events at or after step 0
        self.writer = self.summary.SummaryWriter(self.path, purge_step=0, flush_secs=30)
        for record in history:
            self._write(record)
        self.writer.flush()

    def _write(self, record: Dict[str, Any]) -> None:
        for name, value in scalars_of(record).items():
            self.writer.add_scalar(name, value, global_step=int(record["step"]))

    def log(self, record: Dict[str, Any]) -> None:
        self._write(record)
        self.writer.flush()  # one window's line: a TensorBoard watching the run sees it now

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbTracker:
    """A Weights & Biases run with the run's id, its files under ``folder``/wandb."""

    def __init__(self, folder: str, project: str, config: Dict[str, Any]):
        self.folder, self.project, self.config = folder, project, config
        self.wandb = optional_package("wandb", "--wandb", "wandb")
        self.run = None
        self.next_step = 0  # W&B holds every step below it

    def start(self, history: List[Dict[str, Any]], run_id: Optional[str] = None) -> None:
        self.run = self.wandb.init(
            project=self.project,
            id=run_id,
            resume="allow",
            dir=self.folder,
            name=os.path.basename(os.path.abspath(self.folder)),
            config=self.config,
            settings=self.wandb.Settings(console="off"),  # the run's own output stays the terminal's
        )
        self.next_step = int(self.run.step)
        if self.run.offline and history and self._earlier_offline_runs(run_id):
            # offline, W&B knows nothing of the earlier process's run: its own files here hold the history
            self.next_step = max(int(record["step"]) for record in history) + 1
        for record in history:
            self.log(record)

    def _earlier_offline_runs(self, run_id: Optional[str]) -> List[str]:
        """The offline runs of ``run_id`` that earlier processes left under the run folder (for ``wandb sync``)."""
        import glob

        own = os.path.realpath(os.path.dirname(self.run.dir))
        pattern = os.path.join(self.folder, WANDB_FOLDER, f"offline-run-*-{run_id}")
        return [path for path in glob.glob(pattern) if os.path.realpath(path) != own]

    def log(self, record: Dict[str, Any]) -> None:
        scalars = scalars_of(record)
        if scalars and int(record["step"]) >= self.next_step:
            self.run.log(scalars, step=int(record["step"]))

    def close(self, failed: bool = False) -> None:
        if self.run is not None:
            with contextlib.suppress(Exception):  # a tracker that cannot finish must not hide the run's own outcome
                self.run.finish(exit_code=1 if failed else 0)
            self.run = None


class Trackers:
    """The run's trackers (none, TensorBoard, W&B or both), each given every record the metrics log gets once the
    run owns its folder. Built before anything is written, so a missing package stops the run at once."""

    def __init__(self, folder: str, tensorboard: bool, wandb_project: Optional[str], config: Dict[str, Any]):
        self.tensorboard = TensorBoardTracker(folder) if tensorboard else None
        self.wandb = WandbTracker(folder, wandb_project, config) if wandb_project else None
        self.started = False

    def start(self, history: List[Dict[str, Any]], run_id: Optional[str]) -> None:
        if self.tensorboard is not None:
            self.tensorboard.start(history)
        if self.wandb is not None:
            self.wandb.start(history, run_id)
        self.started = True

    def log(self, record: Dict[str, Any]) -> None:
        if not self.started:
            return
        for tracker in (self.tensorboard, self.wandb):
            if tracker is not None:
                tracker.log(record)

    def close(self, failed: bool = False) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.close(failed)
        self.started = False
