"""Trace files: checked before the first run, and a write that fails during one (a full
disk) ends the run with :class:`TraceWriteError` naming the flag, never an OSError traceback.
"""

from __future__ import annotations

import stat
from pathlib import Path
from typing import Any, TextIO

__all__ = ["TraceFile", "TraceWriteError", "check_output"]


class TraceWriteError(Exception):
    """A trace file cannot be written; the message names the flag and the path.

    ``partial`` holds the results that finished before it (set by api.run and compare)."""

    partial: Any = None


def _error(flag: str, path: Path, err: OSError) -> TraceWriteError:
    why = err.strerror or type(err).__name__
    return TraceWriteError(f"{flag}: cannot write {str(path)!r} ({why})")


def check_output(path: Path, flag: str, probe: bool = True) -> None:
    """Raise TraceWriteError unless ``path`` can be written as a regular file.

    A directory or a special file (a device such as /dev/full, a FIFO, a socket) is refused;
    then, with ``probe``, the file is opened for writing (an existing one is not truncated, a
    new one is removed again), so a read-only file system or a missing permission fails
    here, before any run."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        mode = None
    except OSError as err:
        raise _error(flag, path, err) from None
    if mode is not None and not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise TraceWriteError(f"{flag}: {str(path)!r} is {kind}; give the path of a file")
    if not probe:
        return
    try:
        with path.open("a" if mode is not None else "x", encoding="utf-8"):
            pass
        if mode is None:
            path.unlink()
    except OSError as err:
        raise _error(flag, path, err) from None


class TraceFile:
    """A trace output file. A write that fails raises :class:`TraceWriteError` once; later
    writes and the close are then no-ops, so closing after the failure cannot raise again."""

    def __init__(self, path: Path, flag: str) -> None:
        self.path, self.flag = path, flag
        self.failed = False
        try:
            self._file: TextIO = path.open("w", encoding="utf-8")
        except OSError as err:
            raise _error(flag, path, err) from None

    def write(self, text: str) -> None:
        if self.failed:
            return
        try:
            self._file.write(text)
        except OSError as err:
            self.failed = True
            raise _error(self.flag, self.path, err) from None

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as err:
            if not self.failed:
                self.failed = True
                raise _error(self.flag, self.path, err) from None
