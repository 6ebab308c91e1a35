"""A run's folder (``--out-dir``) and its owner, ``RunFolder``: the lock, the checkpoint, the metrics log and the
curves, the rule of which run owns the folder, and the checks made before a run writes in it.

A run owns its ``out_dir``: a folder that holds another run's checkpoint or metrics is refused
unless ``overwrite`` (then the old files are replaced once the new run writes its first
checkpoint). On resume ``metrics.jsonl`` is cut back to the checkpoint's step and gets one resume
marker, so each step appears at most once, in order. A kill can leave temporary files of an atomic
write behind: the next run in the folder removes them.

One run at a time: ``RunLock`` (``training.run_lock``) holds an exclusive ``flock`` on ``.lock`` in the folder for
the whole run, taken before the folder's files are judged, so a second run into the folder is refused with the
holder's pid, host and run id. A folder holding only ``metrics.jsonl`` (its run stopped
before its first checkpoint: a full disk, a crash, a non-finite loss) holds nothing to resume: a new run replaces
it, with a note, once it writes its first checkpoint (no ``--overwrite`` needed).

Nothing in the folder is written through a link (empssl/files.py): a run's lock, checkpoint, metrics log or curves
that is a symbolic link is refused, and the lock and the log are opened without following one. A folder that holds
far more than a run (``/``, the home folder, a repository's root) is refused unless ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import warnings
from typing import Any, Dict, Iterator, List, Optional

from .. import checkpoint as ckpt
from ..files import (
    StagedWrite,
    append_text,
    check_output_folder,
    open_input,
    refuse_link,
    remove_stale_temporaries,
    same_file,
    write_atomically,
)
from ..options import config_toml
from .curves import write_training_curves
from .run_lock import RunLock
from .trackers import Trackers

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "curves.png"
CONFIG_NAME = "config.toml"  # the run's effective configuration: `empssl train --config DIR/config.toml` takes it
RUN_FILES = (CHECKPOINT_NAME, METRICS_NAME)  # the files that make a folder a run's
# fields that change the training trajectory: a resume with other values is not a continuation
_TRAJECTORY_FIELDS = (
    "dataset",
    "num_patches",
    "batch_size",
    "lr",
    "schedule_epochs",
    "eps",
    "inv_coef",
    "tcr_coef",
    "seed",
    "data_seed",
    "image_size",
    "max_aspect",
    "patch_size",
    "train_size",
    "sync_bn",
)
# settings that decide which images a run trains on
_DATA_FIELDS = ("dataset", "root", "train_size", "image_size", "max_aspect", "data_seed")


class RunFolder:
    """The folder of one training run, held by the process that writes the run's files (rank 0).

    ``open`` checks the folder (writable; under ``RunLock`` for the whole run, taken before its files are judged),
    loads and checks the checkpoint to resume, and decides whether the folder holds another run. Nothing is written
    until ``start``, called once every input of the run is checked: it removes a killed write's temporaries and
    opens the metrics log. The take-over rule (``--overwrite``, or a folder holding only metrics): the old run's
    files stay until this run writes its first checkpoint (``write_checkpoint``), or until ``finish`` when it writes
    none.
    """

    def __init__(self, path: str):
        self.path = path
        self.checkpoint_path = os.path.join(path, CHECKPOINT_NAME)
        self.metrics_path = os.path.join(path, METRICS_NAME)
        self.curves_path = os.path.join(path, CURVES_NAME)
        self.config_path = os.path.join(path, CONFIG_NAME)
        self.lock = RunLock(path)
        self.resumed: Optional[Dict[str, Any]] = None  # the checkpoint a resume continues
        self.same_run = False  # the resumed checkpoint is this folder's own: the run continues the folder's run
        self.holds_other_run = False  # the folder holds another run's files, replaced on take-over
        self.metrics: Optional[MetricsLog] = None
        self.trackers: Optional[Trackers] = None
        self.run_id: Optional[str] = None
        self.config_text = ""
        self.history: List[Dict[str, Any]] = []  # the resumed run's lines, up to its checkpoint
        self.files_started = False  # the configuration file is written and the trackers have started

    def open(self, config) -> "RunFolder":
        """Check ``config.out_dir`` and ``config.resume`` (``config``: a TrainConfig) before anything is written;
        ValueError/CheckpointError naming what is wrong (also a tracker whose package is missing). Takes the lock:
        ``close`` releases it."""
        check_output_folder(self.path, "--out-dir", config.overwrite)
        for name in (CHECKPOINT_NAME, METRICS_NAME, CURVES_NAME, CONFIG_NAME):  # never written through: empssl/files.py
            refuse_link(os.path.join(self.path, name), "--out-dir's")
        trackers = Trackers(self.path, config.tensorboard, config.wandb, dataclasses.asdict(config))
        self.config_text = config_toml(
            config,
            header=(
                "The effective configuration of the run in this folder, written by empssl train. It runs again with",
                f"`empssl train --config {os.path.join(self.path, CONFIG_NAME)} --out-dir NEW_FOLDER`: an option given",
                "beside --config wins over the file's (docs/training.md section 10).",
            ),
            leave_out={name: "how this run was started, not what it is" for name in ("resume", "overwrite")},
        )
        self.lock.acquire()
        try:
            if config.resume:
                self.resumed = ckpt.load_checkpoint(config.resume)
                ckpt.check_train_state(config.resume, self.resumed)
                ckpt.check_finite(
                    config.resume,
                    {"model": self.resumed["model"], "optimizer": self.resumed["optimizer"]},
                    what="state",
                )
                check_resume_config(config.resume, self.resumed["model_config"], self.resumed.get("config", {}), config)
                self.same_run = same_file(config.resume, self.checkpoint_path)  # through links, hard ones too
            self.holds_other_run = self._check_other_run(config.overwrite)
        except BaseException:
            self.lock.release()
            raise
        self.trackers = trackers
        return self

    def _check_other_run(self, overwrite: bool) -> bool:
        """Refuse a folder that holds another run's files (unless ``overwrite``); True when it holds such files."""
        present = [name for name in RUN_FILES if os.path.exists(os.path.join(self.path, name))]
        if present == [METRICS_NAME] and not self.same_run:
            print(
                f"empssl: note: --out-dir {self.path} holds only the {METRICS_NAME} of a run that wrote no "
                f"checkpoint (nothing to resume); this run replaces it once it writes its first checkpoint",
                file=sys.stderr,
                flush=True,
            )
            return True
        if present and not self.same_run and not overwrite:
            raise ValueError(
                f"--out-dir {self.path} already holds another run ({', '.join(present)}); continue it "
                f"with --resume {self.checkpoint_path}, replace it with --overwrite (its files go once "
                f"this run writes its first checkpoint), or pass another --out-dir"
            )
        return bool(present)

    def start(self, run_id: Optional[str], resume_path: Optional[str], step: int, elapsed_s: float) -> None:
        """Every input is checked: from here on the folder is this run's. The metrics log starts from the resumed
        run's lines up to ``step`` (then one resume marker), or empty. The configuration file and the trackers
        start with the run's first line or checkpoint in a folder it owns (under take-over: its first checkpoint)."""
        self.run_id = run_id
        self.lock.record(run_id)
        remove_stale_temporaries(self.path)
        history: List[Dict[str, Any]] = []
        if resume_path is not None:  # the log beside the checkpoint itself (a link to it may lie elsewhere)
            folder = self.path if self.same_run else os.path.dirname(os.path.realpath(resume_path))
            history = read_metrics(os.path.join(folder, METRICS_NAME), run_id=run_id, until_step=step)
            history.append({"event": "resume", "step": step, "elapsed_s": elapsed_s, "run_id": run_id})
        self.history = history
        self.metrics = MetricsLog(self.metrics_path, history, owned=not self.holds_other_run or self.same_run)

    def _own(self, records: List[Dict[str, Any]]) -> None:
        """Once the run has something to keep (its first line or checkpoint) in a folder it owns: the configuration
        file is written and the trackers start from ``records`` (the run's lines so far)."""
        if self.files_started:
            return
        self.files_started = True
        write_atomically(self.config_path, lambda f: f.write(self.config_text.encode()))
        self.trackers.start(records, self.run_id)

    def log(self, record: Dict[str, Any]) -> None:
        """One line of the metrics log, and the same record to every tracker."""
        if self.metrics.owned:
            self._own(self.history)
        self.metrics.write(record)
        self.trackers.log(record)

    def write_checkpoint(self, payload: Dict[str, Any]) -> None:
        """The checkpoint, atomically. Under take-over the new metrics log and the checkpoint are both written in
        full before either replaces the old run's (so a failed write, a full disk, leaves the old run whole), and the
        old run's curves go with them; then this run's configuration file and trackers replace the old run's."""
        if self.metrics.owned:
            ckpt.save_checkpoint(self.checkpoint_path, payload)
            self._own(self.history)
            return
        records = list(self.metrics.pending)
        metrics = self.metrics.stage()
        try:
            checkpoint = ckpt.stage_checkpoint(self.checkpoint_path, payload)
        except BaseException:
            metrics.discard()
            raise
        metrics.commit()
        self.metrics.taken_over()
        checkpoint.commit()  # the checkpoint last: its presence makes the folder this run's
        self._remove_old_curves()
        self._own(records)

    def _remove_old_curves(self) -> None:
        with contextlib.suppress(OSError):
            os.remove(self.curves_path)  # the old run's (drawn again at the end); a link goes, not what it names

    def finish(self) -> None:
        """After the last step, whose checkpoint made the folder this run's (a run resumed at its end writes one too):
        curves.png is drawn from the metrics log (where matplotlib is installed). Curves that cannot be drawn or
        written (a full disk) are a warning: the run's checkpoint and metrics are complete."""
        self._own(self.history)
        self.trackers.close()
        try:
            write_training_curves(read_step_metrics(self.metrics_path), self.curves_path)
        except Exception as err:  # an optional output: never the run's failure
            reason = err.strerror if isinstance(err, OSError) and err.strerror else f"{type(err).__name__}: {err}"
            warnings.warn(
                f"{self.curves_path} was not written ({reason}); the run's checkpoint and metrics are complete: draw "
                f"it later with `empssl plot {self.path}`"
            )

    def close(self, failed: bool = False) -> None:
        if self.trackers is not None:
            self.trackers.close(failed)
        self.lock.release()


def read_metrics(
    path: str,
    run_id: Optional[str] = None,
    until_step: Optional[int] = None,
) -> List[Dict[str, Any]]:
    """The records of a metrics.jsonl in file order, resume markers included; with ``run_id`` only that run's, with
    ``until_step`` only those up to that step. A line a kill cut short is skipped; other unreadable lines with a
    warning naming the file (``_records``)."""
    return [
        record
        for record in _records(path)
        if (run_id is None or record.get("run_id") == run_id)
        and (until_step is None or record.get("step", 0) <= until_step)
    ]


def read_step_metrics(path: str) -> List[Dict[str, Any]]:
    """One record per step in step order, resume markers left out; the last record of a step wins (a resumed run logs
    again the steps after its checkpoint)."""
    by_step = {record["step"]: record for record in _records(path) if "step" in record and "event" not in record}
    return [by_step[step] for step in sorted(by_step)]


# what a record's fields must be where present (a hand-edited or damaged line is skipped, not used)
_NUMBER_FIELDS = ("epoch", "loss", "tcr", "inv", "lr", "patches_per_s", "elapsed_s")


def _record_problem(record: Any) -> Optional[str]:
    """Why a parsed line is not a usable record, or None."""
    if not isinstance(record, dict):
        return "not a JSON object"
    step = record.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step < 2**62:
        return f"its step {step!r} is not an integer >= 0"
    if not isinstance(record.get("run_id", ""), str):
        return f"its run_id {record['run_id']!r} is not a string"
    for field in _NUMBER_FIELDS:
        value = record.get(field, 0.0)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return f"its {field} {value!r} is not a number"
    return None


def _records(path: str) -> Iterator[Dict[str, Any]]:
    """The records of ``path``, one JSON object per line (none when it does not exist). A last line without its
    newline (a kill cut it short) is skipped quietly; any other line that is not UTF-8 JSON of a record's types is
    skipped with one warning naming the file and the lines."""
    try:
        f = open_input(path, "metrics log")
    except FileNotFoundError:
        return
    skipped: List[str] = []
    with f:
        for number, line in enumerate(f, start=1):
            try:
                record = json.loads(line.decode("utf-8"))
                problem = _record_problem(record)
            except ValueError as err:  # UnicodeDecodeError too
                if not line.endswith(b"\n"):
                    continue  # a line a kill cut short
                problem = "not UTF-8 JSON" if isinstance(err, UnicodeDecodeError) else "not JSON"
            if problem is not None:
                skipped.append(f"line {number}: {problem}")
                continue
            yield record
    if skipped:
        shown = "; ".join(skipped[:3]) + (f"; and {len(skipped) - 3} more" if len(skipped) > 3 else "")
        warnings.warn(f"metrics log {path}: {len(skipped)} unreadable line(s) skipped ({shown})")


def check_resume_config(path: str, model_config: Dict[str, Any], stored: Dict[str, Any], config) -> None:
    """CheckpointError unless ``config`` (a TrainConfig) builds the checkpoint's model (``model_config``); a warning
    for changed trajectory settings (``stored``: the checkpoint's training config)."""
    ckpt.check_same_model(path, model_config, config.model_config())
    changed = [
        f"{f}: {stored.get(f)!r} -> {getattr(config, f)!r}"
        for f in _TRAJECTORY_FIELDS
        if f in stored and stored[f] != getattr(config, f)
    ]
    if changed:
        warnings.warn(
            f"resuming {path} with changed settings ({'; '.join(changed)}): the run will not match an uninterrupted one"
        )


def check_resume_data(path: str, resumed: Dict[str, Any], config, data, fingerprint: Optional[str] = None) -> None:
    """ValueError unless ``data`` (the ImageDataset loaded for ``config``) holds the images the checkpoint was trained
    on: their number and size (its stored permutation indexes them), and, where the checkpoint stores one, their
    ``fingerprint`` (``empssl.data.dataset.fingerprint``)."""
    stored = resumed.get("dataset", {})
    num_train, image_size = int(data.train_images.shape[0]), data.image_size[0]
    same_size = stored.get("num_train", num_train) == num_train and stored.get("image_size", image_size) == image_size
    if same_size and stored.get("fingerprint", fingerprint) == fingerprint:
        return
    stored_config = resumed.get("config", {})
    changed = [
        f"--{f.replace('_', '-')} {stored_config.get(f)!r} -> {getattr(config, f)!r}"
        for f in _DATA_FIELDS
        if f in stored_config and stored_config[f] != getattr(config, f)
    ]
    if same_size:
        why = "changed settings: " + "; ".join(changed) if changed else f"the content of {data.name} changed"
        raise ValueError(
            f"cannot resume {path}: this run's {num_train} training images of {image_size}x{image_size} are not the "
            f"ones it was trained on (their fingerprint differs); {why}. Resume with the data it was trained on, or "
            f"start a new run in another --out-dir"
        )
    why = "changed settings: " + "; ".join(changed) if changed else "the data set itself changed"
    raise ValueError(
        f"cannot resume {path}: it was trained on {stored.get('num_train')} images of "
        f"{stored.get('image_size')}x{stored.get('image_size')} ({stored.get('name')}), this run has "
        f"{num_train} of {image_size}x{image_size} ({data.name}); {why}. Resume with the checkpoint's data "
        f"settings, or start a new run in another --out-dir"
    )


class MetricsLog:
    """metrics.jsonl of one run. Until the run owns its folder (``owned``), lines wait in memory: under --overwrite the
    old run's file stays until this run's first checkpoint, then ``take_over`` replaces it atomically."""

    def __init__(self, path: str, records: List[Dict[str, Any]], owned: bool):
        self.path, self.pending, self.owned = path, list(records), owned and not records
        if owned and records:
            self.take_over()

    def write(self, record: Dict[str, Any]) -> None:
        if not self.owned:
            self.pending.append(record)
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        append_text(self.path, json.dumps(record) + "\n", "the metrics log")

    def stage(self) -> StagedWrite:
        """The pending lines written in full beside the file, not yet in place (``StagedWrite``)."""
        text = "".join(json.dumps(r) + "\n" for r in self.pending).encode()
        return StagedWrite(self.path, lambda f: f.write(text))

    def taken_over(self) -> None:
        self.pending, self.owned = [], True

    def take_over(self) -> None:
        """Replace the file with the pending lines (atomically: a kill leaves the old file or the new one)."""
        self.stage().commit()
        self.taken_over()
