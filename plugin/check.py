"""``snapvol check [--repair]``: the state files compared with the filesystem, the mount table
and Docker, one problem a row, each saying what ``--repair`` would do about it.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .backends.base import Backend, Leftover
from .errors import VolumeNotFound
from .history import ReplicationLog
from .inflight import InFlight
from .lifecycle import Lifecycle, owner
from .locks import VolumeLocks
from .mounts import MountTable
from .quiesce import DockerQuiescer, QuiesceFailed
from .statefile import quarantined

log = logging.getLogger(__name__)

# A container in one of these states may hold a mount of its volumes ("created": it may be
# starting right now, its Mount done and its state not yet "running").
HOLDING_STATES = frozenset({"created", "running", "paused", "restarting"})


class Checker:
    """Finds (and, asked to, repairs) what disagrees between the state and the storage."""

    def __init__(self, backend: Backend, mounts: MountTable, locks: VolumeLocks,
                 inflight: InFlight, lifecycle: Lifecycle, *, replications: ReplicationLog | None = None,
                 quiescer: DockerQuiescer | None = None,
                 state_dirs: frozenset[Path] = frozenset()) -> None:
        """*quiescer* asks Docker which containers use a volume (without one, mount IDs
        are not compared with Docker)."""
        self._backend = backend
        self._mounts = mounts
        self._locks = locks
        self._inflight = inflight
        self._lifecycle = lifecycle
        self._replications = replications
        self._state_dirs = state_dirs
        self._quiescer = quiescer

    def check(self, repair: bool = False) -> dict[str, list[dict[str, Any]]]:
        """``snapvol check``: compare the state files with the filesystem and the mount
        table. Each problem says what ``--repair`` does about it (``repair``; None: nothing,
        and ``note`` says what will). With *repair*, do what is provably safe, under each
        volume's lock, and answer what is left.

        What a crash left is repaired by the next start, not here: while the plugin runs,
        a temporary can belong to an operation that has only just begun, so only those of
        volumes no operation holds are reported, and none is removed.

        :returns: ``{"problems": [...], "repaired": [...]}``, each ``{"kind", "what",
            "repair"}`` (and ``note``).
        """
        found = self._problems()
        if not repair or not any(p["repair"] for p in found):
            return {"problems": found, "repaired": []}
        existing = {v.name for v in self._backend.volumes()}
        for name in self._mounts.in_use():
            if name not in existing:
                with self._locks.hold(name):
                    if name not in {v.name for v in self._backend.volumes()}:
                        self._mounts.forget(name)
        if self._replications is not None:
            for volume, targets in self._replications.recorded_bases().items():
                for target, base in targets.items():
                    with self._locks.hold(volume):
                        if base not in self._snapshot_names(volume):
                            self._replications.forget_base(volume, target)
        for volume, snapshot, why in self._lifecycle.unneeded(busy=self._locks.busy):
            self._lifecycle.retire(volume, [snapshot], why)
        for volume, _ in self._unheld_mounts():
            try:
                with self._locks.hold(volume):
                    if self._unheld(volume):        # asked again, under the lock
                        log.warning("volume %s: forgetting mount IDs %s, which no container "
                                    "holds", volume, self._mounts.forget(volume))
                        self._backend.detach(volume)
            except QuiesceFailed as exc:
                log.warning("check --repair: mount IDs of %s kept: %s", volume, exc)
        left = self._problems()
        return {"problems": left, "repaired": [p for p in found if p not in left]}

    def _problems(self) -> list[dict[str, Any]]:
        problems = [{"kind": "leftover", "what": leftover.what, "repair": None,
                     "note": f"the next start of the plugin will {leftover.repair}"}
                    for leftover in self._interrupted_leftovers()]
        problems += [{"kind": "damaged state file",
                      "what": f"{path}: a state file that did not parse, moved aside",
                      "repair": None} for path in quarantined(*self._state_dirs)]
        existing = {v.name for v in self._backend.volumes()}
        problems += [{"kind": "stale mount", "what": f"volume {name} does not exist but "
                      f"{count} Docker mount ID(s) still count as using it",
                      "repair": "forget those mount IDs"}
                     for name, count in sorted(self._mounts.in_use().items()) if name not in existing]
        for volume, targets in (self._replications.recorded_bases().items()
                                if self._replications is not None else ()):
            have = self._snapshot_names(volume)
            for target, base in sorted(targets.items()):
                if base not in have and self._still_missing(volume, target, base):
                    problems.append({
                        "kind": "missing replication base",
                        "what": f"{volume}@{base}, the snapshot {target} last received, is gone "
                                "here", "repair": "forget it (the next replication looks for "
                                "another snapshot both sides hold)"})
        problems += [{"kind": "mount no container holds",
                      "what": f"volume {volume} counts {count} Docker mount ID(s), but no "
                              "container Docker knows of uses it (dockerd was killed, or its "
                              "Unmount never arrived)",
                      "repair": "forget those mount IDs and detach the volume"}
                     for volume, count in self._unheld_mounts()]
        problems += [{"kind": "unneeded snapshot",
                      "what": f"{volume}@{snapshot}, taken for {owner(snapshot)}: {why}",
                      "repair": "remove it"} for volume, snapshot, why in self._lifecycle.unneeded(busy=self._locks.busy)]
        return problems

    def _interrupted_leftovers(self) -> list[Leftover]:
        """The backend's leftovers that no running operation can own: those no operation
        holds, seen again in a second look.

        One look is not enough: a listing can take seconds, and an operation can finish
        between it and the lock check (a trash purge marks its dataset "removing", destroys
        it and lets go). Its temporary is then in the listing but not busy, though it is
        already gone. What a crash left stays until the next start, so it is in both looks;
        the second look costs a listing only when the first found something.
        """
        def unowned(leftovers: list[Leftover]) -> dict[str, Leftover]:
            return {found.what: found for found in leftovers
                    if not (self._locks.busy(found.volume) or self._inflight.is_receiving(found.volume))}

        first = unowned(self._backend.leftovers())
        if not first:
            return []
        again = unowned(self._backend.leftovers())
        return [found for what, found in first.items() if what in again]

    def _unheld_mounts(self) -> list[tuple[str, int]]:
        """(volume, mount count) of existing volumes the mount table counts as in use that
        no container holds; none when Docker cannot be asked (that is logged)."""
        existing = {v.name for v in self._backend.volumes()}
        counted = {v: n for v, n in sorted(self._mounts.in_use().items())
                   if v in existing and not self._locks.busy(v)}
        try:
            return [(v, n) for v, n in counted.items() if self._unheld(v)]
        except QuiesceFailed as exc:
            log.warning("check: mount IDs not compared with Docker: %s", exc)
            return []

    def _unheld(self, volume: str) -> bool:
        """Whether Docker knows of no container that may hold a mount of *volume*.

        :raises QuiesceFailed: Docker cannot be asked.
        """
        if self._quiescer is None:
            return False
        return not any(c.state in HOLDING_STATES for c in self._quiescer.containers([volume]))

    def _still_missing(self, volume: str, target: str, base: str) -> bool:
        """Whether the base *target* last received of *volume*, which a listing just did not
        find, is stale, and not the middle of an operation.

        Every change to a volume's snapshots and its records happens under its lock (a purge
        destroys the volume, then forgets its records; a move into the trash renames the
        records, then the volume). So after the listing: if the lock is held, an operation
        may be between its two steps (not a problem, not yet); if it is free and the record
        is still there, no operation was midway when the listing ran, and the base is gone.
        """
        if self._locks.busy(volume):
            return False
        assert self._replications is not None
        return self._replications.base(volume, target) == base

    def _snapshot_names(self, volume: str) -> set[str]:
        try:
            return {s.name for s in self._backend.snapshots(volume)}
        except VolumeNotFound:
            return set()
