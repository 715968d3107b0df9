"""Work on a copy-on-write copy of the process, while the process goes on: how the velocity and cross-subject
state is saved while a worker serves.

Pickling that state takes about 25 µs per event held in the windows (half a second for 20,000 payments, far more
at a marketplace's size), too long to hold the state lock for. ``os.fork`` copies the process as it is at one
instant, in the time it takes to copy its page tables, and the child pickles its copy while the parent serves on;
pages are copied only as either side writes them (the child's pickling touches reference counts, so at worst the
state's size). The same technique as Redis's background saves.

The child runs one function and leaves through ``os._exit``: no ``atexit`` handler, finalizer or buffered stream
of the parent's runs in it, and the collector is off, so no object the parent shares (a database connection, a
socket) is closed from the child. It must not touch what another thread of the parent may have held at the fork
(the database, the logging module's locks): it pickles and writes a file, nothing else.
"""

from __future__ import annotations

import gc
import os
import warnings
from collections.abc import Callable

FORK_AVAILABLE = hasattr(os, "fork")


def fork_and_run(work: Callable[[], object]) -> int:
    """Run ``work`` in a forked child; returns the child's pid (the parent does not wait). The child exits 0
    when ``work`` returned, 1 when it raised."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # Python 3.12+ warns of forking with threads
        pid = os.fork()
    if pid != 0:
        return pid
    code = 1
    try:
        gc.disable()
        work()
        code = 0
    finally:
        os._exit(code)


def exit_code(pid: int) -> int:
    """Wait for the child ``pid``; its exit code (negative: killed by that signal)."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)
