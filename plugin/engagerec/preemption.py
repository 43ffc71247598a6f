"""SIGTERM as a request to stop at the next safe point: clusters preempt jobs by sending it,
then kill them after a grace period. Training checks the request between steps, writes a
checkpoint and returns, so the same command resumes the run later."""

from __future__ import annotations

import signal
import threading
from typing import Any, Optional

from engagerec.distributed import any_rank

# the exit status of a command that SIGTERM stopped after writing a checkpoint (EX_TEMPFAIL): not
# 0, since a job that exits 0 counts as finished and is not restarted; the same command resumes
PREEMPTED = 75


class Preemption:
    """
    Catches SIGTERM while active (a ``with`` block) and remembers that it came; the previous
    handler comes back on exit. Only the main thread can install a handler: elsewhere it stays
    inactive and never reports a request.

    Example::

        >>> import os, signal
        >>> from engagerec.preemption import Preemption
        >>> with Preemption() as preemption:
        ...     os.kill(os.getpid(), signal.SIGTERM)
        ...     preemption.requested
        True
    """

    def __init__(self) -> None:
        self.requested = False
        self._installed = False
        self._previous: Optional[Any] = None

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True

    def __enter__(self) -> "Preemption":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)
            self._installed = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._installed:  # None: the old handler was not set from Python; the default then
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed, self._previous = False, None

    def agreed(self) -> bool:
        """
        Whether any rank was asked to stop: every rank must stop after the same step, so with
        more than one rank this is a collective (call it on every rank at the same steps).

        Returns:
            bool: True if SIGTERM reached any rank.
        """
        return any_rank(self.requested)
