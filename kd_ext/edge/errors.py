"""Errors of the edge runtime, with messages meant for the person running it."""

from __future__ import annotations

import os
import signal
from pathlib import Path


class EdgeError(Exception):
    """Base class of the edge runtime's errors."""


class EdgeModelError(EdgeError):
    """The IR is missing, incomplete, corrupt, or not an anomaly model."""


class EdgeInputError(EdgeError):
    """The images or the output folder cannot be used."""


class EdgeInterruptedError(EdgeError):
    """A run was stopped by a signal (Ctrl-C, SIGTERM); the message says what was left where.

    Args:
        message: What was interrupted and what is left on disk.
        signal_number: The signal that stopped the run.
    """

    def __init__(self, message: str, signal_number: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signal_number = int(signal_number)

    @property
    def exit_code(self) -> int:
        """Shell convention for a process stopped by a signal: ``128 + signal number`` (130 for Ctrl-C)."""
        return 128 + self.signal_number


class TerminationSignal(KeyboardInterrupt):
    """A termination signal (SIGTERM) raised as an exception, so that a run cleans up as it does on Ctrl-C.

    Args:
        signal_number: The signal received.
    """

    def __init__(self, signal_number: int) -> None:
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = int(signal_number)


def text_name(path: str | Path) -> str:
    r"""A path as text that can always be written to CSV, JSON and a terminal.

    Bytes of a file name that are not valid UTF-8 (kept by Python as surrogate escapes) become backslash
    escapes, e.g. ``b"bad\xff.png"`` -> ``bad\xff.png``; valid names are unchanged.

    Args:
        path: A path as Python returned it from the file system.

    Returns:
        str: The name, encodable as UTF-8.
    """
    return os.fsencode(path).decode("utf-8", "backslashreplace")
