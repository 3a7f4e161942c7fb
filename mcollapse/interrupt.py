"""Ctrl-C as a request, honoured at the next safe point.

Python's default SIGINT handler raises KeyboardInterrupt wherever the interpreter happens to be,
including inside a library's finalizer, which prints "Exception ignored" and carries on (h5py does
this). Here the handler only records the request; long loops call `checkpoint()` at their batch,
shard or step boundaries (the progress bar's advance does it for them), which raises `Interrupted`
there, after the last unit of work is durable. A second Ctrl-C stops at once: every store write is
atomic, so nothing half-written is left behind.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

_requested = False
_installed = False
_closing_line: str | None = None  # set once the run's outcome is decided: a later Ctrl-C exits at once


class Interrupted(KeyboardInterrupt):
    """Raised at a safe point after Ctrl-C; a KeyboardInterrupt, so `except Exception` lets it pass."""


def _handle(signum, frame) -> None:
    global _requested
    if _closing_line is not None:  # the work is done and written: nothing is left to stop cleanly
        print(_closing_line, file=sys.stderr, flush=True)
        os._exit(130)
    if _requested:
        print("mcollapse: interrupted again; stopping now (every published cache entry and shard is intact)",
              file=sys.stderr, flush=True)
        os._exit(130)
    _requested = True
    print("mcollapse: Ctrl-C: stopping at the next batch, shard or step boundary (Ctrl-C again to stop now)",
          file=sys.stderr, flush=True)


def install() -> bool:
    """Route SIGINT to the request flag. A process started with SIGINT ignored (a shell's background
    job) keeps ignoring it, as Unix programs do. Returns whether the handler is in place."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return False
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        return False
    signal.signal(signal.SIGINT, _handle)
    _installed = True
    return True


def requested() -> bool:
    return _requested


def checkpoint() -> None:
    """A safe point: raise `Interrupted` if Ctrl-C was pressed since the run started."""
    if _requested:
        raise Interrupted()


def close(line: str) -> bool:
    """The run's outcome is being decided: from now on a Ctrl-C prints `line` and exits 130 at once.
    Returns whether one was requested before; called first, then checked, so no signal falls between."""
    global _closing_line
    _closing_line = line
    return _requested


def reset() -> None:
    """Forget a handled request (a test or an API caller running several jobs in one process)."""
    global _requested, _closing_line
    _requested = False
    _closing_line = None
