"""The worker gives its memory back by being replaced, when it is idle after many volumes went.

Why a new process: CPython returns an arena to the kernel only when every object in it is
gone, so after 10,000 volumes are removed and purged the worker keeps its high-water mark
(reused by the next volumes, not leaked; README, Benchmark). A fresh worker has none of it.
gunicorn's master already replaces a worker that exits, as it does for ``max_requests``; the
listening socket stays with the master, so a call that arrives meanwhile waits in its
backlog and is answered by the new worker. Nothing is lost: the mount table, the trash, the
histories and the roles are on disk, and ``worker_exit`` stops the scheduler and the stream
socket before the old worker goes. Counters of the metrics endpoint start again from zero, as
after any restart (Prometheus takes that as a counter reset).

The worker asks for it (SIGTERM to itself: gunicorn's graceful exit of one worker) only when
all of these hold:

* the volumes (with the trash) are at least ``SNAPVOL_RECYCLE_DROP`` fewer than the most this
  worker held;
* their number has not changed for ``SNAPVOL_RECYCLE_QUIET`` seconds;
* nothing is going on: no request in flight, no transfer, no volume lock held, no scheduler
  pass running.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

# seconds between two looks. The most volumes the worker held is sampled, so a look must come
# often enough to see it: Creates take over a millisecond each, so a second misses at most
# the last few hundred of a burst (two len() calls a second: nothing to pay for it).
LOOK_EVERY = 1.0


def _rss_mib() -> float | None:
    """This process's resident memory, in MiB (None off Linux)."""
    try:
        resident_pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return None
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _ask_gunicorn_for_a_new_worker() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class Requests:
    """How many requests of the plugin socket are being served right now."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._serving = 0

    def begin(self) -> None:
        with self._guard:
            self._serving += 1

    def end(self) -> None:
        with self._guard:
            self._serving -= 1

    @property
    def serving(self) -> int:
        with self._guard:
            return self._serving


class Recycler:
    """Watches the number of volumes and asks for a fresh worker when the rules above hold.

    :meth:`look` is one decision (the tests call it with their own clock); :meth:`start`
    looks every :data:`LOOK_EVERY` seconds on a thread of its own until :meth:`stop`.
    """

    def __init__(self, *, count: Callable[[], int], idle: Callable[[], bool], drop: int,
                 quiet: float, replace: Callable[[], None] = _ask_gunicorn_for_a_new_worker,
                 clock: Callable[[], float] = time.monotonic) -> None:
        """*count* says how many volumes there are (with the trash); *idle* whether nothing
        is going on; *drop* 0 turns recycling off; *replace* asks for the new worker."""
        self._count = count
        self._idle = idle
        self._drop = drop
        self._quiet = quiet
        self._replace = replace
        self._clock = clock
        self._peak = 0
        self._last: int | None = None
        self._changed_at = clock()
        self._asked = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def look(self) -> bool:
        """Look once; return whether a new worker was asked for (at most once)."""
        if self._drop <= 0 or self._asked:
            return False
        now, count = self._clock(), self._count()
        if count != self._last:
            self._last, self._changed_at = count, now
        self._peak = max(self._peak, count)
        if self._peak - count < self._drop or now - self._changed_at < self._quiet \
                or not self._idle():
            return False
        rss = _rss_mib()
        log.info("%d volumes fewer than the %d this worker held, and idle for %.0f s: handing "
                 "over to a fresh worker to give the memory back (RSS %s MiB)",
                 self._peak - count, self._peak, now - self._changed_at,
                 f"{rss:.1f}" if rss is not None else "?")
        self._asked = True
        self._replace()
        return True

    def start(self) -> None:
        if self._drop <= 0:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="snapvol-recycler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(LOOK_EVERY)
        self._thread = None

    def _loop(self) -> None:
        while not self._stop.wait(LOOK_EVERY):
            try:
                if self.look():
                    return
            except Exception:                   # a bug here must not end the worker
                log.exception("recycler: unexpected error")
