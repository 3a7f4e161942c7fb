"""Progress of long loops: a rich bar on a terminal, a log line every 30 s or 10 % off one (SLURM,
nohup), and a Ctrl-C safe point at every advance (loops advance after each durable unit of work)."""

from __future__ import annotations

import logging
import sys
import time
from contextlib import contextmanager

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from mcollapse.interrupt import checkpoint

log = logging.getLogger("mcollapse.progress")

LOG_EVERY_S = 30.0
LOG_EVERY_FRACTION = 0.1
QUIET_S = 5.0


def _eta(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


class _LogLines:
    """Off a terminal: a line with count, rate and ETA every LOG_EVERY_S seconds, and at each further
    10 % of the total once QUIET_S seconds passed since the last line (short loops stay quiet)."""

    def __init__(self, description: str, total: int, clock=time.monotonic):
        self.description, self.total, self.clock = description, total, clock
        self.started = self.last_time = clock()
        self.done = self.last_done = 0
        self.lines = 0

    def __call__(self, n: int = 1) -> None:
        self.done += n
        now = self.clock()
        since = now - self.last_time
        step = max(1, int(self.total * LOG_EVERY_FRACTION))
        finished = self.done >= self.total
        due = since >= LOG_EVERY_S or (since >= QUIET_S and (self.done - self.last_done >= step or finished))
        if not due and not (finished and self.lines):
            return
        elapsed = max(now - self.started, 1e-9)
        rate = self.done / elapsed
        eta = _eta((self.total - self.done) / rate) if rate > 0 else "?"
        log.info("%s: %d/%d (%.0f %%), %.2f/s, %s elapsed, ETA %s", self.description, self.done, self.total,
                 100 * self.done / self.total, rate, _eta(elapsed), eta)
        self.last_time, self.last_done = now, self.done
        self.lines += 1


@contextmanager
def progress_bar(description: str, total: int):
    """Yields `advance(n)`: draws a bar on a terminal, logs lines off one; each call is a safe point
    where a pending Ctrl-C stops the run."""
    if total == 0:
        yield lambda n=1: checkpoint()
        return
    if not sys.stderr.isatty():
        lines = _LogLines(description, total)

        def advance(n=1):
            lines(n)
            checkpoint()

        yield advance
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(description, total=total)

        def advance(n=1):
            progress.advance(task, n)
            checkpoint()

        yield advance
