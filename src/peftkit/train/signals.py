"""Ctrl-C / SIGTERM: ask the loop to stop after the current optimizer step, checkpointed."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any


class StopRequest:
    """A flag set by SIGINT/SIGTERM (or `request()`); the loop checks it after each step.

    While installed, the first signal only sets the flag; a second SIGINT raises
    KeyboardInterrupt at once, for a user who does not want to wait for the step to end.
    Handlers are installed only in the main thread (Python allows no other) and the
    previous handlers are put back on exit.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._previous: dict[int, Any] = {}

    def request(self, reason: str = "request") -> None:
        self.requested = True
        self.signal_name = self.signal_name or reason

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.request(signal.Signals(signum).name)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
