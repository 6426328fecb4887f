"""Automatic snapshots and their retention: which volumes are scheduled, when each last ran,
taking the run's snapshot, and pruning by the volume's ``keep`` policy.

*When* to run is the :mod:`plugin.scheduler` thread's business; this module is what a run
does. Only ``auto-`` snapshots are ever pruned, and never one that a clone was made from, that
a replication target builds on, or that is being sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from . import names, options, retention
from .backends.base import Backend, SnapshotInfo, VolumeInfo
from .errors import NotFound, PluginError
from .history import AutoHistory, AutoRun
from .lifecycle import Lifecycle
from .locks import VolumeLocks
from .snapshot_names import automatic, is_automatic
from .units import parse_duration, rfc3339
from .volumes import VolumeService

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """A volume's automatic snapshots: every *interval*, pruned by *policy*."""

    volume: str
    interval: timedelta
    policy: retention.Policy
    quiesce: str
    created: datetime
    last: AutoRun | None
    replicate: str | None = None

    @property
    def next_run(self) -> datetime:
        """One interval after the last run (or after creation): a restart neither skips a
        run nor fires the missed ones; after a long stop, one run at once."""
        return (self.last.at if self.last else self.created) + self.interval


class Schedules:
    """The automatic snapshots of every volume with a ``schedule`` option."""

    def __init__(self, volumes: VolumeService, backend: Backend, locks: VolumeLocks,
                 lifecycle: Lifecycle, *, history: AutoHistory | None = None) -> None:
        """*history* keeps each volume's last run."""
        self._volumes = volumes
        self._backend = backend
        self._locks = locks
        self._lifecycle = lifecycle
        self._history = history

    @property
    def history(self) -> AutoHistory | None:
        """Where each volume's last automatic run is recorded (None: not kept)."""
        return self._history

    def schedules(self) -> list[Schedule]:
        """Every volume with a ``schedule`` option and its last automatic run (no lock)."""
        found = []
        for info in self._backend.volumes():
            schedule = schedule_of(info)
            if schedule is not None:
                try:
                    last = self.last_run(info.name)
                except NotFound:
                    continue                    # removed while we looked
                found.append(Schedule(info.name, *schedule, info.created, last,
                                      info.options.get("replicate")))
        return found

    def last_run(self, volume: str, snapshots: list[SnapshotInfo] | None = None) -> AutoRun | None:
        """The volume's last automatic run: from the history, or where the history has none
        (a history file lost or damaged, see ``statefile``) from its newest automatic
        snapshot, so a restart keeps the cadence rather than firing at once."""
        last = self._history.last(volume) if self._history is not None else None
        if last is not None:
            return last
        if snapshots is None:
            snapshots = self._backend.snapshots(volume)
        autos = [s for s in snapshots if is_automatic(s.name)]
        return AutoRun(autos[-1].created, autos[-1].name) if autos else None

    def run_automatic(self, volume: str, now: datetime, *, prune: bool = True) -> AutoRun:
        """Take *volume*'s automatic snapshot for *now* (quiesced as its options say), prune
        by its policy (unless *prune* is false: the caller calls :meth:`prune_after` later),
        and record the run, failed or not.

        :raises PluginError: the snapshot failed (recorded first); a pruning failure is
            recorded and logged but does not fail the run.
        """
        info = self._backend.volume(volume)
        interval, policy, quiesce = schedule_of(info) or (None, None, "none")
        snapshot = automatic(now)
        try:
            self._volumes.take([volume], snapshot, quiesce)
        except PluginError as exc:
            self._record(volume, AutoRun(now, None, str(exc)))
            raise
        log.info("automatic snapshot %s@%s taken", volume, snapshot)
        run = AutoRun(now, snapshot)
        if not prune:
            self._record(volume, run)
            return run
        return self.prune_after(volume, run)

    def prune_after(self, volume: str, run: AutoRun, *, hold: str | None = None) -> AutoRun:
        """Prune *volume* after its automatic *run* and record the run with what was pruned;
        with *hold* (the reason), prune nothing this time."""
        pruned, error = 0, None
        if hold:
            log.warning("keeping every automatic snapshot of %s: %s", volume, hold)
        else:
            try:
                pruned = sum(1 for d in self.prune(volume, now=run.at) if not d["keep"])
            except PluginError as exc:
                log.error("pruning %s failed: %s", volume, exc)
                error = f"snapshot taken, pruning failed: {exc}"
        done = AutoRun(run.at, run.snapshot, error, pruned)
        self._record(volume, done)
        return done

    def _record(self, volume: str, run: AutoRun) -> None:
        if self._history is not None:
            self._history.record(volume, run)

    def prune(self, volume: object = None, *, now: datetime | None = None,
              dry_run: bool = False) -> list[dict[str, Any]]:
        """Apply each scheduled volume's retention to its automatic snapshots (or only to
        *volume*'s), keeping every snapshot something needs (:meth:`Lifecycle.needs`).

        Returns one decision per automatic snapshot: volume, snapshot, created, keep, reasons
        (and ``error`` where a deletion failed). Each deletion holds the volume's lock only
        for itself, so Docker's calls are never held up by a long prune.

        :raises VolumeNotFound: *volume* does not exist.
        """
        now = now or datetime.now(timezone.utc)
        every = {v.name: v for v in self._backend.volumes()}
        if volume is None:
            targets = [every[n] for n in sorted(every)]
        else:
            wanted = names.volume_name(volume)
            targets = [every.get(wanted) or self._backend.volume(wanted)]
        decisions = []
        for info in targets:
            schedule = schedule_of(info)
            if schedule is None:
                continue
            autos = [s for s in self._backend.snapshots(info.name) if is_automatic(s.name)]
            plan = retention.plan(autos, schedule[1], now=now,
                                  protected=frozenset(self._lifecycle.needs(info.name, every.values())))
            for d in plan:
                row = {"volume": info.name, "snapshot": d.snapshot.name,
                       "created": rfc3339(d.snapshot.created), "keep": d.keep,
                       "reasons": list(d.reasons)}
                if not d.keep and not dry_run:
                    try:
                        with self._locks.hold(info.name):
                            self._backend.destroy_snapshot(info.name, d.snapshot.name)
                        log.info("pruned %s@%s", info.name, d.snapshot.name)
                    except PluginError as exc:
                        row["error"] = str(exc)
                decisions.append(row)
        return decisions


def schedule_of(info: VolumeInfo) -> tuple[timedelta, retention.Policy, str] | None:
    """(interval, retention, quiesce) of a volume with a ``schedule`` option, else None."""
    if "schedule" not in info.options:
        return None
    return (timedelta(seconds=parse_duration(info.options["schedule"])),
            retention.Policy.parse(info.options.get("keep", options.DEFAULT_KEEP)),
            info.options.get("quiesce", "none"))
