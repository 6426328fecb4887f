"""Whose each snapshot is, and when it may go, so that the snapshots snapvol takes for its own
purposes never pile up.

The owner is read from the name (:mod:`plugin.snapshot_names`), so it survives the loss of
every state file:

    schedule      auto-*          pruned by the volume's ``keep`` policy (``schedules``)
    user          manual-*, any name a user chose: never removed by snapvol
    send          send-*          the newest is kept (the base for ``send --since``); older
                                  ones go when a newer send completes, a failed send's at once
    replication   repl-*          the newest and every target's base are kept; older ones go
                                  after each replication
    clone X       clone-X-<time>  the origin of clone X: on ZFS, where the clone depends on
                                  it, removed with X; on Btrfs, where a clone shares nothing
                                  with its origin, removed as soon as the clone exists

Whatever its owner, a snapshot stays while something *needs* it (:meth:`Lifecycle.needs`):
a clone made from it (``from=VOLUME@SNAPSHOT``), a replication target that builds on it, a
send that is reading it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable

from .backends.base import Backend, SnapshotInfo, VolumeInfo
from .errors import NotFound, PluginError
from .history import ReplicationLog
from .inflight import InFlight
from .locks import VolumeLocks
from .snapshot_names import AUTO_PREFIX, CLONE_PREFIX, REPL_PREFIX, SEND_PREFIX

log = logging.getLogger(__name__)

_CLONE_ORIGIN = re.compile(re.escape(CLONE_PREFIX) + r"(?P<clone>.+)-\d{8}T\d{6}Z")
SUPERSEDED = {SEND_PREFIX: "send", REPL_PREFIX: "replication"}   # only the newest is kept


def owner(snapshot: str) -> str:
    """Who took *snapshot*: schedule, send, replication, ``clone X`` or user."""
    if snapshot.startswith(AUTO_PREFIX):
        return "schedule"
    for prefix, who in SUPERSEDED.items():
        if snapshot.startswith(prefix):
            return who
    match = _CLONE_ORIGIN.fullmatch(snapshot)
    return f"clone {match['clone']}" if match else "user"


def clone_of(snapshot: str) -> str | None:
    """The clone whose origin *snapshot* was taken for (``from=VOLUME``), if it is one."""
    match = _CLONE_ORIGIN.fullmatch(snapshot)
    return match["clone"] if match else None


class Lifecycle:
    """Says what the snapshots of a volume are kept for, and removes those nothing needs."""

    def __init__(self, backend: Backend, locks: VolumeLocks, inflight: InFlight,
                 replications: ReplicationLog | None = None) -> None:
        self._backend = backend
        self._locks = locks
        self._inflight = inflight
        self._replications = replications
        # set by validated restores (plugin.verify): the newest snapshot of a volume that
        # passed verification, kept so that there is always one known-good restore point
        self.verified: Callable[[str], str | None] | None = None

    def needs(self, volume: str, volumes: Iterable[VolumeInfo] | None = None,
              origins: dict[str, dict[str, str]] | None = None) -> dict[str, str]:
        """Snapshots of *volume* that something still needs -> what (``origin of clone X``,
        ``base of replication to T``, ``being sent``). *volumes* and *origins* (of
        ``Backend.clone_origins``) save a listing when the caller has them.

        Clone origins are what the options say (``from=VOLUME@SNAPSHOT``) and, where clones
        depend on their origin (ZFS), what the filesystem says: promoting a clone when its
        origin volume is removed moves origins between volumes, so names and options alone
        cannot tell."""
        needed: dict[str, str] = {}
        for info in self._backend.volumes() if volumes is None else volumes:
            origin, _, snapshot = info.options.get("from", "").partition("@")
            if origin == volume and snapshot:
                needed[snapshot] = f"origin of clone {info.name}"
        if origins is None:
            origins = self._backend.clone_origins()
        for snapshot, clone in origins.get(volume, {}).items():
            needed[snapshot] = f"origin of clone {clone}"
        if self._replications is not None:
            for target, base in self._replications.bases_by_target(volume).items():
                needed[base] = f"base of replication to {target}"
        for snapshot in self._inflight.sending(volume):
            needed[snapshot] = "being sent"
        verified = self.verified(volume) if self.verified is not None else None
        if verified:
            needed.setdefault(verified, "newest verified restore point")
        return needed

    def forget_lost_bases(self, volume: str) -> None:
        """Forget the recorded replication bases of *volume* whose snapshot is gone (a
        rollback destroyed it, or one was killed midway): the next replication to that target
        asks it for another snapshot both hold. What ``check --repair`` would do."""
        if self._replications is None or not self._replications.bases_by_target(volume):
            return
        try:
            have = {s.name for s in self._backend.snapshots(volume)}
        except NotFound:
            have = set()
        for target, base in self._replications.bases_by_target(volume).items():
            if base not in have:
                log.warning("%s@%s, the replication base of %s, is gone; forgetting it",
                            volume, base, target)
                self._replications.forget_base(volume, target)

    def retire(self, volume: str, snapshots: Iterable[str], why: str) -> list[str]:
        """Remove those of *snapshots* that nothing needs, each under the volume's lock;
        one that cannot go is logged and kept. Returns the names removed."""
        removed = []
        for snapshot in snapshots:
            try:
                with self._locks.hold(volume):
                    if snapshot in self.needs(volume):
                        continue
                    self._backend.destroy_snapshot(volume, snapshot)
            except NotFound:
                continue                                  # gone already: fine
            except PluginError as exc:
                log.warning("keeping %s@%s (%s): %s", volume, snapshot, why, exc)
                continue
            log.info("removed %s@%s: %s", volume, snapshot, why)
            removed.append(snapshot)
        return removed

    def unneeded(self, busy: Callable[[str], bool] = lambda volume: False,
                 only: Iterable[str] | None = None) -> list[tuple[str, str, str]]:
        """(volume, snapshot, why) of the snapshots snapvol took for itself that nothing
        needs any more (a kill between an operation and their removal, or the last clone
        made from one removed), from one listing of every volume's snapshots (or of those
        *only*); volumes for which *busy* is true are left out."""
        volumes = {v.name: v for v in self._backend.volumes()}
        if only is None:
            listing = self._backend.all_snapshots()
        else:
            listing = {}
            for name in set(only) & set(volumes):
                try:
                    listing[name] = self._backend.snapshots(name)
                except NotFound:
                    continue
        found = []
        origins = self._backend.clone_origins()         # one query, not one per volume
        for volume, listed in sorted(listing.items()):
            if busy(volume) or volume not in volumes:
                continue
            candidates = [(s, "a newer one replaces it") for s in self.superseded(volume, listed)]
            candidates += [(s, "no clone needs it") for s in self.stale_clone_origins(listed)]
            if candidates:
                needed = self.needs(volume, volumes.values(), origins)
                found += [(volume, s, why) for s, why in candidates if s not in needed]
        return found

    def tidy(self, only: Iterable[str] | None = None) -> int:
        """Remove what :meth:`unneeded` finds (at start: everywhere, each logged as left by
        an interrupted operation; after a Remove: on the volumes it concerned). Returns how
        many went."""
        removed = 0
        for volume, snapshot, why in self.unneeded(only=only):
            if only is None:
                log.warning("%s@%s was left by an interrupted operation (%s, %s)", volume,
                            snapshot, owner(snapshot), why)
            removed += len(self.retire(volume, [snapshot], why))
        return removed

    def retire_older(self, volume: str, newest: str, why: str) -> list[str]:
        """*newest*, a send-/repl- snapshot, now replaces the older ones of its kind (their
        names sort by time): retire them. Nothing for other snapshots."""
        prefix = next((p for p in SUPERSEDED if newest.startswith(p)), None)
        if prefix is None:
            return []
        try:
            older = [s.name for s in self._backend.snapshots(volume)
                     if s.name.startswith(prefix) and s.name < newest]
        except NotFound:
            return []
        return self.retire(volume, older, why)

    def superseded(self, volume: str, listed: list[SnapshotInfo]) -> list[str]:
        """Of *listed*, the send-/repl- snapshots a newer one of the same kind replaces (their
        names sort by time); whether something still needs one is for the caller to check.

        A repl- snapshot is replaced only by a newer one a target is known to hold (a
        recorded base): one taken by a replication that failed may be on its target all
        the same (the answer lost), and be the only snapshot both sides still share."""
        sends = sorted(s.name for s in listed if s.name.startswith(SEND_PREFIX))
        bases = self._replications.bases(volume) if self._replications is not None else set()
        newest_base = max((b for b in bases if b.startswith(REPL_PREFIX)), default="")
        return sends[:-1] + sorted(s.name for s in listed
                                   if s.name.startswith(REPL_PREFIX) and s.name < newest_base)

    @staticmethod
    def stale_clone_origins(listed: list[SnapshotInfo]) -> list[str]:
        """The clone-NAME-<time> snapshots among *listed*: taken for a clone, they are
        unneeded unless :meth:`needs` says otherwise (on Btrfs they are removed as soon as
        the clone exists; on ZFS the filesystem says whether a clone still depends on one)."""
        return [s.name for s in listed if clone_of(s.name) is not None]
