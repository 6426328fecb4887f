"""Automatic snapshots: one thread in the plugin process, started and stopped by gunicorn.

``create_app`` builds the :class:`Scheduler` but starts no thread; gunicorn's
``post_worker_init`` hook starts it and ``worker_exit`` stops it. The loop sleeps on an
``Event`` until the next volume is due (at most a minute, or until a volume with a schedule
is created), calls :meth:`Scheduler.run_once` — the unit-tested core — and survives any
exception. Jobs call :class:`~plugin.schedules.Schedules` directly, so they take the same
per-volume locks as Docker's calls. When a run happens is decided by :attr:`Schedule.next_run` from the
persisted last run's slot, so a restart neither skips a run nor fires the missed ones, and a
late run does not move the slots after it.

At a thousand volumes due within seconds (issue 17), a pass lists the volumes once, takes
every due snapshot first, oldest slot first, a few at a time (Btrfs commits them together,
and the snapshot ioctl runs without the interpreter lock, so Docker's calls go on), then
prunes, and saves the history once.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from functools import partial
from collections.abc import Callable
from datetime import datetime, timedelta, timezone

from .errors import PluginError
from .history import AutoRun
from .replication import Replicator
from .schedules import Schedule, Schedules
from .standby import Standbys
from .trash import Trash
from .verify import Verifier
from .volumes import VolumeService

log = logging.getLogger(__name__)

MAX_SLEEP = 60.0
MIN_PAUSE = 0.25      # between two passes: volumes due a moment apart are taken in one pass
SNAPSHOT_WORKERS = 8  # automatic snapshots taken at once
TRASH_CHECK = 10.0    # seconds between looks at the pool's fill while the trash holds something
SETTLE = 0.2          # a pass woken by a change waits until changes stop this long...
MAX_SETTLE = 2.0      # ... but no longer than this (see Scheduler._settle)


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Scheduler:
    """Takes each scheduled volume's automatic snapshot when it is due, then prunes it."""

    def __init__(self, schedules: Schedules, volumes: VolumeService, *,
                 clock: Callable[[], datetime] = utc_now,
                 replicator: Replicator | None = None,
                 standbys: Standbys | None = None,
                 trash: Trash | None = None,
                 verifier: Verifier | None = None,
                 lateness: Callable[[float], None] | None = None,
                 workers: int = SNAPSHOT_WORKERS) -> None:
        """Runs *schedules*, re-planning when *volumes* creates or removes a scheduled
        volume. *replicator* sends each automatic snapshot of a volume with ``replicate=TARGET``
        there, in its own bounded pool (a slow target never delays other schedules);
        *standbys* syncs primaries to their standbys, each every ``sync``, in that pool too
        (a standby takes no automatic snapshots: its primary's come with the syncs).
        *trash* is tidied at every pass (expiry, space pressure), at least every
        :data:`TRASH_CHECK` seconds while it holds something. *verifier* runs the
        validated restores of volumes with ``verify=`` when due (each in its own thread),
        after it has removed what a killed verification left (its first pass). Up to
        *workers* automatic snapshots are taken at once."""
        self._schedules = schedules
        self._replicator = replicator
        self._standbys = standbys
        self._trash = trash
        self._verifier = verifier
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_due: datetime | None = None      # from the last run_once's listing
        self._lateness = lateness
        self._workers = workers
        self.last_pass: datetime | None = None      # when run_once last listed the volumes
        self.passing = False                        # whether the loop is in a pass now
        volumes.on_change(self._wake.set)
        volumes.on_create(lambda _name, opts: self._wake.set() if "verify" in opts else None)
        if standbys is not None:
            standbys.on_change(self._wake.set)

    def run_once(self, now: datetime) -> dict[str, AutoRun | Exception]:
        """Run every volume that is due at *now*; one failing volume never stops the others.

        One pass, one listing (:meth:`Schedules.survey`), one history save at the end (at
        most one a second while it lasts: :meth:`AutoHistory.batched`). Every due snapshot
        is taken first, the longest overdue first, each stamped with the time it really
        ran; the prunes come after them, so pruning a thousand volumes never makes the
        last snapshot of the pass late. Returns what happened per volume run: its
        :class:`AutoRun`, or the error.
        """
        done: dict[str, AutoRun | Exception] = {}
        self._next_due = None
        if self._trash is not None:
            try:
                self._trash.tidy(now)
            except PluginError as exc:
                log.error("scheduler: cannot tidy the trash: %s", exc)
        try:
            survey = self._schedules.survey()
            schedules = self._schedules.schedules(survey)
        except PluginError as exc:
            log.error("scheduler: cannot list volumes: %s", exc)
            return done
        # the same listing tells when to wake next: a volume due now (run, failed or
        # skipped) is due again at its next slot, the others at their next_run
        self.last_pass = now
        upcoming = [s.next_run if s.next_run > now else s.slot(now) + s.interval
                    for s in schedules]
        self._next_due = min(upcoming, default=None)
        self._run_syncs()
        self._run_verifications(now)
        due = sorted((s for s in schedules if s.next_run <= now), key=lambda s: s.next_run)
        history = self._schedules.history
        with history.batched() if history is not None else nullcontext():
            to_prune = self._take_due(due, now, done)
            for volume, run in to_prune:
                if self._stop.is_set():
                    break       # the next run of each prunes what this one left
                try:
                    done[volume] = self._schedules.prune_after(volume, run, survey=survey)
                except Exception as exc:    # prune_after records its own PluginErrors
                    log.error("scheduler: pruning %s failed: %s", volume, exc)
        return done

    def _take_due(self, due: list[Schedule], now: datetime,
                  done: dict[str, AutoRun | Exception]) -> list[tuple[str, AutoRun]]:
        """Take the snapshots of the *due* schedules, started in that order, up to
        ``workers`` at once (those with ``quiesce=pause`` after, one by one: each pauses
        containers through Docker); return the runs left to prune (a replicated volume's is
        pruned after its replication)."""
        wanted = [s for s in due if self._standbys is None
                  or not self._standbys.is_standby(s.volume)]
        together = [s for s in wanted if s.quiesce == "none"]
        alone = [s for s in wanted if s.quiesce != "none"]
        take = partial(self._take, now)
        if self._workers > 1 and len(together) > 1:
            # Btrfs commits snapshots requested together in one transaction: a pass of a
            # thousand (loop Btrfs, loaded 2-core VM) took 16 s on 2 threads, 5-6 s on 4,
            # 4.5 s on 8 and 4.6-4.8 s on 16
            with ThreadPoolExecutor(min(self._workers, len(together)),
                                    thread_name_prefix="snapvol-snapshot") as pool:
                results = list(zip(together, pool.map(take, together)))
        else:
            results = [(s, take(s)) for s in together]
        results += [(s, take(s)) for s in alone]
        to_prune = []
        for schedule, run in results:
            if run is None:
                continue                        # stopping
            done[schedule.volume] = run
            if isinstance(run, Exception):
                continue
            replicate = schedule.replicate if self._replicator is not None else None
            if replicate is None:
                to_prune.append((schedule.volume, run))
            elif run.snapshot:
                assert self._replicator is not None
                self._replicator.submit(schedule.volume, replicate, run.snapshot,
                                        then=partial(self._prune_after_replication,
                                                     schedule.volume, replicate, run))
        return to_prune

    def _take(self, now: datetime, schedule: Schedule) -> AutoRun | Exception | None:
        """One due snapshot, stamped with the time it is really taken and its slot; the
        error if it failed (recorded: the other volumes still run), None when stopping."""
        if self._stop.is_set():
            return None
        at = max(now, self._clock())
        slot = schedule.slot(at)
        if self._lateness is not None:
            self._lateness(max(0.0, (at - slot).total_seconds()))
        try:
            return self._schedules.run_automatic(schedule.volume, at, prune=False,
                                                 schedule=schedule, due=slot)
        except Exception as exc:
            log.error("scheduler: automatic snapshot of %s failed: %s", schedule.volume, exc)
            return exc

    def _run_verifications(self, now: datetime) -> None:
        """Start the validated restores that are due (after the start-up clean-up)."""
        if self._verifier is None:
            return
        try:
            if self._verifier.recovered or self._verifier.recover():
                self._verifier.run_due(now)
        except PluginError as exc:
            log.error("scheduler: cannot start verifications: %s", exc)

    def _run_syncs(self) -> None:
        """Start the standby syncs that are due, in the replication pool."""
        if self._standbys is None or self._replicator is None:
            return
        for volume in self._standbys.due():
            self._replicator.run(partial(self._standbys.sync, volume))

    def _prune_after_replication(self, volume: str, target: str, run: AutoRun,
                                 replicated: bool) -> None:
        """A replicated volume is pruned after its replication, so that the snapshot the
        target now holds is recorded as its base first and kept. Where the replication
        failed and that base is unknown (replication.json lost or damaged: the replication
        finds it again by asking the target), nothing is pruned: the snapshot the target
        holds may be any of them."""
        assert self._replicator is not None
        known = replicated or self._replicator.base_known(volume, target)
        hold = None if known else (f"the snapshot {target} holds is unknown until a "
                                   "replication to it succeeds")
        try:
            self._schedules.prune_after(volume, run, hold=hold)
        except PluginError as exc:
            log.error("scheduler: pruning %s after its replication failed: %s", volume, exc)

    def seconds_to_next(self, now: datetime) -> float:
        """How long the loop may sleep after :meth:`run_once`: until the next volume it saw is
        due, at most a minute (a volume created meanwhile wakes the loop)."""
        pause = MAX_SLEEP if self._next_due is None else (self._next_due - now).total_seconds()
        sync = self._standbys.seconds_to_next() if self._standbys is not None else None
        if sync is not None:
            pause = min(pause, max(sync, 1.0))     # a sync running now is not due again at once
        if self._trash is not None and self._trash.entries():
            pause = min(pause, TRASH_CHECK)        # expiry and space pressure
        if self._verifier is not None:
            due = (self._verifier.next_due() if self._verifier.recovered
                   else now + timedelta(seconds=5))   # Docker not reachable yet
            if due is not None:
                pause = min(pause, max((due - now).total_seconds(), 1.0))
        return max(MIN_PAUSE, min(MAX_SLEEP, pause))

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="snapvol-scheduler", daemon=True)
        self._thread.start()
        log.info("scheduler started")

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None
        log.info("scheduler stopped")

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._wake.clear()
            self.passing = True
            try:
                self.run_once(self._clock())
                pause = self.seconds_to_next(self._clock())
            except Exception:   # a bug must not end automatic snapshots for good
                log.exception("scheduler: unexpected error; retrying in a minute")
                pause = MAX_SLEEP
            finally:
                self.passing = False
            due_at = time.monotonic() + pause
            if self._wake.wait(pause):
                self._settle(due_at)

    def _settle(self, due_at: float) -> None:
        """After a wake by a change, wait until the changes stop for :data:`SETTLE` seconds,
        at most :data:`MAX_SETTLE`, and never past *due_at* (when the next pass was due
        anyway, a monotonic time). Why: every Create or Remove of a volume with a schedule
        or into the trash wakes the loop, and each pass lists every volume; during a burst
        (the bench removes 10,000 one after another) passes ran back to back, each holding
        the interpreter lock against Docker's calls (Remove's p95 was 19 ms at 10,000
        volumes). Now a burst makes one pass every :data:`MAX_SETTLE` seconds at most."""
        deadline = min(time.monotonic() + MAX_SETTLE, due_at)
        while not self._stop.is_set():
            self._wake.clear()
            left = deadline - time.monotonic()
            if left <= 0 or not self._wake.wait(min(SETTLE, left)):
                return
