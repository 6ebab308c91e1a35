"""SIGINT and SIGTERM in the training loop: the first signal asks the loop to stop after the current step, with a
checkpoint (``StopRequest``); ``TrainingInterrupted`` carries where it stopped to the command's exit code."""

from __future__ import annotations

import signal
import sys
import threading
from typing import Any, Dict, Optional


class TrainingInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; ``checkpoint_path`` holds ``step`` (None: stopped at once by a second
    signal)."""

    def __init__(self, signum: int, step: Optional[int], checkpoint_path: Optional[str]):
        self.signum, self.step, self.checkpoint_path = signum, step, checkpoint_path
        name = signal.Signals(signum).name
        if checkpoint_path is None:
            message = f"stopped at once by a second {name}; no checkpoint of the current step was written"
        else:
            message = (
                f"interrupted by {name} after step {step}: checkpoint written to {checkpoint_path}; continue with "
                f"--resume {checkpoint_path}"
            )
        super().__init__(message)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


class StopRequest:
    """SIGINT/SIGTERM handlers for the training loop: the first signal asks the loop to stop after the current step
    (with a checkpoint); a second one raises at once. Outside the main thread (where handlers cannot be set) a no-op."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: Optional[int] = None
        self._previous: Dict[int, Any] = {}

    def _handle(self, signum, frame):
        if self.signum is not None:
            raise TrainingInterrupted(signum, None, None)
        self.signum = signum
        print(
            f"\nempssl: {signal.Signals(signum).name} received: finishing this step and writing a checkpoint "
            f"(send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
