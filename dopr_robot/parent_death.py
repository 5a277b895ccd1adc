"""A child process that dies with its parent, even when the parent is killed with SIGKILL (which it cannot
catch, so it cannot stop its children itself): sweep cells and evaluation workers, each ~1 GB.

On Linux, PR_SET_PDEATHSIG asks the kernel to send SIGKILL to this process when the thread that started it
ends (the parent process dying ends it). The request is made by the child once it runs, so a parent that died
before then is caught by comparing os.getppid() with the parent's pid. A watchdog thread polling getppid() is
the fallback where prctl does not exist (macOS): an orphan is re-parented, and then exits within a second.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int, watchdog: bool = True) -> None:
    """Call first thing in a child started by process `parent`."""
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(137)
    if watchdog:
        threading.Thread(target=_watch, args=(parent,), name="parent-watchdog", daemon=True).start()


def _watch(parent: int, interval_s: float = 1.0) -> None:
    while os.getppid() == parent:
        time.sleep(interval_s)
    os._exit(137)
