"""Stopping a run cleanly on SIGTERM or SIGINT (Ctrl-C).

Within StopRequests the first such signal is only noted; the driver asks after every block, and once
one was noted (on any rank), every rank saves the resume state and raises Interrupted: running the
same command again continues from the next block (resume.py). The unit is the block, because that is
what the resume state holds.

A second signal more than REPEAT_S after the first is handled as if this module were not there
(SIGINT: KeyboardInterrupt at once; SIGTERM: the process ends), and a rerun resumes from the last
saved state. Repeats within REPEAT_S are the same request: torchrun's agent forwards a Ctrl-C that its
workers already got from the terminal, and `kill` of a process group reaches a process twice.
"""
from __future__ import annotations

import logging
import os
import signal
import time

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGTERM, signal.SIGINT)
REPEAT_S = 2.0


class Interrupted(KeyboardInterrupt):
    """The run stopped at a block boundary on request, its resume state saved. signum: the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class StopRequests:
    """Within: SIGTERM and SIGINT are noted (`requested`) instead of ending the process, unless the
    process ignores them (then they stay ignored) or this is not the main thread (only it may handle
    signals: they then act as usual, which is logged)."""

    def __init__(self):
        self.signum: int | None = None
        self._first = 0.0
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> str | None:
        """The name of the first signal received, e.g. "SIGTERM", or None."""
        return None if self.signum is None else signal.Signals(self.signum).name

    def __enter__(self) -> "StopRequests":
        try:
            for sig in SIGNALS:
                previous = signal.signal(sig, self._on_signal)
                if previous is signal.SIG_IGN:  # e.g. SIGINT of a background job: leave it ignored
                    signal.signal(sig, previous)
                else:
                    self._previous[sig] = previous
        except ValueError:  # signal.signal outside the main thread
            log.info("not in the main thread: SIGTERM and SIGINT end the run at once (it resumes from the last "
                     "saved block)")
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    def _on_signal(self, signum: int, frame) -> None:
        now = time.monotonic()
        if self.signum is None:
            self.signum, self._first = signum, now
            log.warning("%s received: stopping once the current block is quantized and the resume state saved "
                        "(send it again to stop at once)", signal.Signals(signum).name)
        elif now - self._first > REPEAT_S:
            previous = self._previous.pop(signum, signal.SIG_DFL)
            signal.signal(signum, previous)
            if callable(previous):
                previous(signum, frame)  # Python's SIGINT handler: KeyboardInterrupt
            else:
                os.kill(os.getpid(), signum)  # the default action: the process ends
