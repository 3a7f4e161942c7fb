"""Ctrl-C is a request honoured at the next safe point: never swallowed by a library, always one
line and exit 130; progress off a terminal is logged lines."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from mcollapse import interrupt
from mcollapse.progress import _LogLines, progress_bar


@pytest.fixture
def clean_flag():
    interrupt.reset()
    yield
    interrupt.reset()


def test_a_request_is_raised_at_the_next_advance_not_before(clean_flag):
    seen = []
    with pytest.raises(interrupt.Interrupted):
        with progress_bar("work", total=5) as advance:
            for i in range(5):
                seen.append(i)
                if i == 2:
                    interrupt._handle(signal.SIGINT, None)  # the signal arrives mid-unit
                advance(1)
    assert seen == [0, 1, 2]  # unit 2 finished; unit 3 never started
    assert issubclass(interrupt.Interrupted, KeyboardInterrupt) and not issubclass(interrupt.Interrupted, Exception)


def test_a_library_finalizer_cannot_swallow_the_request(tmp_path):
    """The failure mode of Python's default handler: KeyboardInterrupt raised inside __del__ is
    printed as 'Exception ignored' and lost. With the request flag the finalizer never sees it."""
    script = textwrap.dedent("""
        import os, signal, sys
        from mcollapse import interrupt
        from mcollapse.progress import progress_bar
        interrupt.install()

        class Finalizer:
            def __del__(self):
                os.kill(os.getpid(), signal.SIGINT)  # the signal lands while a finalizer runs
                for _ in range(10000):
                    pass

        try:
            with progress_bar("work", total=3) as advance:
                for _ in range(3):
                    Finalizer()
                    advance(1)
        except interrupt.Interrupted:
            print("stopped at a safe point")
            sys.exit(130)
        sys.exit(0)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130 and "stopped at a safe point" in proc.stdout, proc.stderr
    assert "Exception ignored" not in proc.stderr


def test_an_inherited_ignore_is_kept(clean_flag):
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        assert interrupt.install() is False and signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


def test_off_a_terminal_progress_is_a_line_every_30_s_or_10_percent(caplog):
    now = [0.0]
    with caplog.at_level(logging.INFO, logger="mcollapse.progress"):
        slow = _LogLines("slow", 100, clock=lambda: now[0])
        for _ in range(100):
            now[0] += 1.0
            slow(1)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 10 and lines[-1].startswith("slow: 100/100 (100 %), 1.00/s, 1:40 elapsed")
    assert "ETA 0:50" in lines[4]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mcollapse.progress"):
        fast = _LogLines("fast", 100, clock=lambda: now[0])
        for _ in range(100):
            now[0] += 0.01
            fast(1)
        stuck = _LogLines("stuck", 1000, clock=lambda: now[0])
        for _ in range(3):
            now[0] += 31.0
            stuck(1)
    assert [r.getMessage().split(":")[0] for r in caplog.records] == ["stuck"] * 3  # 1 s loops stay quiet


def test_the_entry_point_routes_sigint_before_the_heavy_imports():
    probe = ("import signal, sys; import mcollapse.launch as l; l.install(); "
             "print(signal.getsignal(signal.SIGINT).__name__, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         env={**os.environ}, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert out.stdout.split() == ["_handle", "False"]


def test_a_ctrl_c_after_the_outcome_is_decided_still_exits_130():
    """The window between the run's last check and the interpreter's exit: the work is written,
    so the handler prints the closing line and exits 130 at once."""
    script = ("import os, signal, time; from mcollapse import interrupt; interrupt.install(); "
              "assert interrupt.close('mcollapse: interrupted; closing') is False; "
              "os.kill(os.getpid(), signal.SIGINT); time.sleep(30); print('not reached')")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert proc.returncode == 130 and "not reached" not in proc.stdout
    assert proc.stderr.strip().splitlines()[-1] == "mcollapse: interrupted; closing"
