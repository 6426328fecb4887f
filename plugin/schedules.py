"""Automatic snapshots and their retention: which volumes are scheduled, when each last ran,
taking the run's snapshot, and pruning by the volume's ``keep`` policy.

*When* to run is the :mod:`plugin.scheduler` thread's business; this module is what a run
does. Only ``auto-`` snapshots are ever pruned, and never one that a clone was made from, that
a replication target builds on, or that is being sent.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from . import names, options, retention
from .backends.base import Backend, SnapshotInfo, VolumeInfo
from .errors import NotFound, PluginError, VolumeNotFound
from .history import AutoHistory, AutoRun
from .lifecycle import Lifecycle
from .locks import VolumeLocks
from .snapshot_names import automatic, is_automatic
from .units import parse_duration, rfc3339
from .volumes import VolumeService

log = logging.getLogger(__name__)

SURVEY_TTL = 10.0   # seconds a pass's listing serves its prunes (a Create renews it at once)


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
        """The slot after the last run's (before any run: one interval after creation). A
        restart neither skips a run nor fires the missed ones; after a long stop, one run
        at once (:meth:`slot`). Slots follow from slots, not from when runs happened, so a
        late run does not delay the next ones (records without a slot: their run time)."""
        if self.last is None:
            return self.created + self.interval
        return (self.last.due or self.last.at) + self.interval

    def slot(self, now: datetime) -> datetime:
        """The slot a run at *now* is for: :attr:`next_run`, or after a long stop the newest
        slot passed since (the older ones are skipped: one run, not one per missed slot)."""
        first = self.next_run
        if now <= first:
            return first
        return first + ((now - first) // self.interval) * self.interval


@dataclass
class Survey:
    """One listing of the volumes and of the snapshots clones depend on, shared by the
    prunes of a scheduler pass: a prune needs both (what must be kept), and listing them
    once per pruned volume cost O(volumes) each time (a full scan on Btrfs, two ``zfs``
    commands on ZFS), O(volumes²) for a pass."""

    volumes: dict[str, VolumeInfo]
    clones: dict[str, list[VolumeInfo]]   # volume -> those whose from= names it
    taken: float                   # time.monotonic()
    creates: int                   # volumes created before it was taken (Schedules' count)
    # Backend.clone_origins, asked on the first prune only (on ZFS a ``zfs get`` of every
    # dataset; most passes prune nothing)
    origins: dict[str, dict[str, str]] | None = None


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
        self._creates = 0
        self._count_guard = threading.Lock()
        volumes.on_create(self._created)

    def _created(self, _name: str, _options: object) -> None:
        with self._count_guard:
            self._creates += 1

    def survey(self) -> Survey:
        """Every volume (:meth:`Backend.listing`: cheap at thousands), indexed by the origin
        of its clones; the clone origins are asked by the first prune that uses it."""
        with self._count_guard:
            creates = self._creates
        volumes = {v.name: v for v in self._backend.listing()}
        clones: dict[str, list[VolumeInfo]] = {}
        for info in volumes.values():
            origin = info.options.get("from", "").partition("@")[0]
            if origin:
                clones.setdefault(origin, []).append(info)
        return Survey(volumes, clones, time.monotonic(), creates)

    def _current(self, survey: Survey | None) -> Survey:
        """*survey* if still good, else a new one: a volume created since may be a clone
        whose origin a prune must keep, and after :data:`SURVEY_TTL` seconds anything else
        (a receive, a restore from the trash) may have added one."""
        if survey is not None and survey.creates == self._creates \
                and time.monotonic() - survey.taken < SURVEY_TTL:
            return survey
        return self.survey()

    @property
    def history(self) -> AutoHistory | None:
        """Where each volume's last automatic run is recorded (None: not kept)."""
        return self._history

    def schedules(self, survey: Survey | None = None) -> list[Schedule]:
        """Every volume with a ``schedule`` option and its last automatic run (no lock), from
        *survey* if given."""
        found = []
        listed = survey.volumes.values() if survey is not None else self._backend.listing()
        for info in listed:
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

    def run_automatic(self, volume: str, now: datetime, *, prune: bool = True,
                      schedule: Schedule | None = None, due: datetime | None = None,
                      survey: Survey | None = None) -> AutoRun:
        """Take *volume*'s automatic snapshot for *now* (quiesced as its options say), prune
        by its policy (unless *prune* is false: the caller calls :meth:`prune_after` later),
        and record the run, failed or not, with the slot *due* it ran for. *schedule* (the
        volume's, as just listed) and *survey* spare a listing each.

        :raises PluginError: the snapshot failed (recorded first); a pruning failure is
            recorded and logged but does not fail the run.
        """
        if schedule is None:
            info = self._backend.volume(volume)
            quiesce = (schedule_of(info) or (None, None, "none"))[2]
        else:
            quiesce = schedule.quiesce
        snapshot = automatic(now)
        try:
            self._volumes.take([volume], snapshot, quiesce)
        except VolumeNotFound:
            raise               # removed since the pass listed it: nothing to record
        except PluginError as exc:
            self._record(volume, AutoRun(now, None, str(exc), due=due))
            raise
        log.info("automatic snapshot %s@%s taken", volume, snapshot)
        run = AutoRun(now, snapshot, due=due)
        if not prune:
            self._record(volume, run)
            return run
        return self.prune_after(volume, run, survey=survey)

    def prune_after(self, volume: str, run: AutoRun, *, hold: str | None = None,
                    survey: Survey | None = None) -> AutoRun:
        """Prune *volume* after its automatic *run* and record the run with what was pruned;
        with *hold* (the reason), prune nothing this time."""
        pruned, error = 0, None
        if hold:
            log.warning("keeping every automatic snapshot of %s: %s", volume, hold)
        else:
            try:
                pruned = sum(1 for d in self.prune(volume, now=run.at, survey=survey)
                             if not d["keep"])
            except VolumeNotFound:
                return run      # removed since its snapshot: its record went with it
            except PluginError as exc:
                log.error("pruning %s failed: %s", volume, exc)
                error = f"snapshot taken, pruning failed: {exc}"
        done = AutoRun(run.at, run.snapshot, error, pruned, run.due)
        self._record(volume, done)
        return done

    def _record(self, volume: str, run: AutoRun) -> None:
        if self._history is not None:
            self._history.record(volume, run)

    def prune(self, volume: object = None, *, now: datetime | None = None,
              dry_run: bool = False, survey: Survey | None = None) -> list[dict[str, Any]]:
        """Apply each scheduled volume's retention to its automatic snapshots (or only to
        *volume*'s), keeping every snapshot something needs (:meth:`Lifecycle.needs`).

        Returns one decision per automatic snapshot: volume, snapshot, created, keep, reasons
        (and ``error`` where a deletion failed). Each deletion holds the volume's lock only
        for itself, so Docker's calls are never held up by a long prune. *survey* (a
        scheduler pass's) is used while it is current.

        :raises VolumeNotFound: *volume* does not exist.
        """
        now = now or datetime.now(timezone.utc)
        survey = self._current(survey)
        every = survey.volumes
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
            # the clones of this volume, not every volume: needs() looks for them among
            # what it is given, and scanning a thousand per pruned volume cost O(volumes²)
            if survey.origins is None:
                survey.origins = self._backend.clone_origins()
            needed = self._lifecycle.needs(info.name, survey.clones.get(info.name, []),
                                           survey.origins)
            plan = retention.plan(autos, schedule[1], now=now, protected=frozenset(needed))
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
