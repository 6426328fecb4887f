"""The domain: Docker's volume operations on top of a storage backend.

:class:`VolumeService` owns the rules the backend does not know: names and options are
validated here, every mutation happens under the volume's lock, Mount/Unmount are counted by
Docker mount ID and persisted, Remove refuses a volume in use, snapshots of several volumes
are all or none, and rollback is refused while a container uses the volume or when it would
silently destroy newer snapshots. Read-only calls (Get, List, Path, snapshot listing) take no
lock, so they stay fast while a slow operation holds a volume.
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from . import __version__, names, options, retention
from .backends.base import Backend, SnapshotInfo, VolumeInfo
from .errors import (BackendError, BackendUnavailable, Conflict, InvalidName, InvalidOption,
                     InvalidRequest, NotFound, PluginError, SnapshotNotFound, VolumeBusy, VolumeExists,
                     VolumeInUse, VolumeNotFound)
from . import stream
from .history import AutoHistory, AutoRun, ReplicationLog
from .locks import VolumeLocks
from .mounts import MountTable
from .process import Streaming
from .quiesce import DockerQuiescer, QuiesceFailed
from .statefile import quarantined
from .units import parse_duration

log = logging.getLogger(__name__)

AUTO_PREFIX = "auto-"    # reserved for the scheduler's snapshots, the only ones ever pruned


def utc_stamp(now: datetime | None = None) -> str:
    """20261129T101500Z: sorts by time, no ':' (awkward in paths and -v specs)."""
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def unique_name(prefix: str) -> str:
    """prefix + UTC time + 4 hex digits: sorts by time, never collides within a second."""
    return f"{prefix}{utc_stamp()}-{secrets.token_hex(2)}"


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


@dataclass(frozen=True)
class VolumeView:
    """What Docker's Get shows: the volume plus a ``Status`` map for ``docker volume inspect``."""

    name: str
    mountpoint: Path | None
    created: datetime | None
    status: dict[str, Any] = field(default_factory=dict)


class VolumeService:
    """Docker's volume operations, made safe: validated, locked, counted, persisted."""

    def __init__(self, backend: Backend, mounts: MountTable, locks: VolumeLocks,
                 recover: Callable[[], object] | None = None, *,
                 history: AutoHistory | None = None,
                 quiescer: DockerQuiescer | None = None,
                 replications: ReplicationLog | None = None, transfers: int = 4) -> None:
        """*recover* makes the storage reachable again (re-mounts it); Mount calls it when the
        backend reports the storage unavailable, e.g. after ``docker plugin disable -f``.
        *history* keeps the scheduler's last runs; *quiescer* reaches Docker to pause
        containers (without one, ``quiesce=pause`` is refused); *replications* records
        replications (their bases are never pruned); at most *transfers* streams run at once,
        so threads are always left for Docker's calls."""
        self._backend = backend
        self._mounts = mounts
        self._locks = locks
        self._recover = recover
        self._history = history
        self._quiescer = quiescer
        self._started = time.time()
        self._listeners: list[Callable[[], None]] = []
        self.replications = replications
        self._transfers = threading.BoundedSemaphore(transfers)
        self._transfer_limit = transfers
        self._guard = threading.Lock()
        self._pins: Counter[tuple[str, str]] = Counter()   # snapshots being sent
        self._receiving: set[str] = set()                   # volumes being received

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call *listener* after a volume is created or removed (the scheduler re-plans)."""
        self._listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def open(self) -> None:
        """Check the backend and reconcile the mount table with the volumes that exist.

        :raises BackendUnavailable: the storage root is not usable.
        """
        self._backend.check()
        existing = {v.name for v in self._backend.volumes()}
        for name in self._mounts.in_use():
            if name not in existing:
                log.warning("volume %s is gone; forgetting its mount IDs %s",
                            name, self._mounts.forget(name))
                continue
            try:
                self._backend.attach(name)  # re-provision what running containers still use
            except BackendError as exc:
                log.error("volume %s is in use but cannot be attached: %s", name, exc)

    # ------------------------------------------------------------------ Docker calls

    def create(self, name: object, raw_options: object) -> None:
        """Create a volume; a repeated Create with the same options succeeds (Docker retries).

        :raises InvalidName: the name breaks the naming rule.
        :raises InvalidOption: an option is unknown, for the other backend, or has a bad value.
        :raises VolumeExists: the name is taken with other options, or by something not ours.
        """
        name = names.volume_name(name)
        opts = options.validate(raw_options, self._backend.kind, self._backend.compressions)
        origin = opts.get("from", "").partition("@")[0]
        with self._locks.hold(name, *([origin] if origin else [])):
            self._not_receiving(name)   # a full receive makes it; its snapshot comes first
            try:
                existing = self._backend.volume(name)
            except VolumeNotFound:
                if origin:
                    self._clone(name, opts)
                else:
                    self._backend.create_volume(name, opts)
                if "schedule" in opts:
                    self._changed()
                return
            if dict(existing.options) != opts:
                raise VolumeExists(f"volume {name} already exists with other options "
                                   f"({_describe(existing.options)}); remove it first or "
                                   "choose another name")

    def _clone(self, name: str, opts: dict[str, str]) -> None:
        """from=VOL clones a snapshot taken now (kept, named after the clone); from=VOL@SNAP
        an existing one. Caller holds both volumes' locks."""
        origin, _, snapshot = opts["from"].partition("@")
        if origin == name:
            raise InvalidOption(f"option from={opts['from']}: a volume cannot be a clone of itself")
        if not snapshot:
            snapshot = f"clone-{name}-{utc_stamp()}"
            self._backend.create_snapshot(origin, snapshot)
        self._backend.clone(origin, snapshot, name, opts)

    # ------------------------------------------------------------------ snapshots (CLI)

    def snapshot(self, volumes: object, name: object = None,
                 quiesce: object = "none") -> list[SnapshotInfo]:
        """Snapshot one or more volumes under one name: all or none, one point in time where
        the backend can (ZFS, one pool), with their containers paused for ``quiesce="pause"``.

        :raises InvalidName: a bad volume or snapshot name, or one with the reserved prefix.
        :raises VolumeNotFound: a volume does not exist (nothing is taken).
        :raises SnapshotExists: a volume already has a snapshot of that name.
        :raises QuiesceFailed: the containers could not be paused or a hook failed.
        """
        if not isinstance(volumes, list) or not volumes:
            raise InvalidRequest("give one or more volume names")
        targets = sorted({names.volume_name(v) for v in volumes})
        snap = names.snapshot_name(name) if name is not None else f"manual-{utc_stamp()}"
        if snap.startswith(AUTO_PREFIX):
            raise InvalidName(f"snapshot names starting with {AUTO_PREFIX!r} are reserved for "
                              "scheduled snapshots")
        if quiesce not in ("none", "pause"):
            raise InvalidRequest("quiesce must be none or pause")
        if quiesce == "pause":
            for volume in targets:
                self._backend.volume(volume)   # before pausing anything (_take checks again)
        return self._take(targets, snap, str(quiesce))

    def _take(self, volumes: list[str], snapshot: str, quiesce: str) -> list[SnapshotInfo]:
        with self._quiesced(volumes, quiesce), self._locks.hold(*volumes):
            for volume in volumes:
                self._backend.volume(volume)
            return self._backend.create_snapshots(volumes, snapshot)

    def _quiesced(self, volumes: list[str], quiesce: str) -> AbstractContextManager[object]:
        if quiesce == "none":
            return nullcontext()
        if self._quiescer is None:
            raise QuiesceFailed("quiesce=pause needs the Docker API, which this plugin "
                                "instance was started without")
        return self._quiescer.quiesced(volumes)

    def snapshots(self, volume: object) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first (no lock)."""
        return self._backend.snapshots(names.volume_name(volume))

    def remove_snapshot(self, volume: object, snapshot: object) -> None:
        volume = names.volume_name(volume)
        snapshot = names.snapshot_name(snapshot)
        with self._locks.hold(volume):
            self._backend.destroy_snapshot(volume, snapshot)

    def rollback(self, volume: object, snapshot: object, *, destroy_newer: bool = False) -> None:
        """Make *volume* identical to *snapshot*.

        :raises VolumeInUse: containers use the volume (a running container would keep
            seeing the old content on Btrfs, where rollback replaces the subvolume).
        :raises Conflict: newer snapshots exist, the backend would destroy them, and
            *destroy_newer* was not given.
        """
        volume = names.volume_name(volume)
        snapshot = names.snapshot_name(snapshot)
        with self._locks.hold(volume):
            self._not_receiving(volume)
            self._not_sending(volume)
            users = self._mounts.users(volume)
            if users:
                raise VolumeInUse(f"volume {volume} is in use by {self._users_text(volume, users)}"
                                  "; stop those containers before a rollback")
            snaps = [s.name for s in self._backend.snapshots(volume)]
            if snapshot not in snaps:
                raise SnapshotNotFound(volume, snapshot)
            newer = snaps[snaps.index(snapshot) + 1:]
            if newer and not self._backend.rollback_keeps_newer and not destroy_newer:
                raise Conflict(f"rolling {volume} back to {snapshot} destroys the newer "
                               f"snapshot(s) {', '.join(newer)} on {self._backend.kind}; "
                               "pass --destroy-newer to do it")
            self._backend.rollback(volume, snapshot)

    def remove(self, name: object) -> None:
        """Destroy a volume that no container uses.

        :raises VolumeNotFound: no such volume.
        :raises VolumeInUse: Docker mounts of it are still active.
        """
        name = names.volume_name(name)
        with self._locks.hold(name):
            self._not_receiving(name)
            self._not_sending(name)
            info = self._backend.volume(name)
            users = self._mounts.users(name)
            if users:
                raise VolumeInUse(f"volume {name} is in use by {len(users)} container "
                                  "mount(s); stop or remove those containers first")
            self._backend.destroy_volume(name)
            self._mounts.forget(name)
        if self._history is not None:
            self._history.forget(name)
        if self.replications is not None:
            self.replications.forget(name)
        if "schedule" in info.options:
            self._changed()      # only then has the scheduler anything to re-plan

    def mount(self, name: object, mount_id: object) -> Path:
        """Record one more user of the volume and return the directory Docker bind-mounts.

        The backing mount is re-checked on every call, not trusted from the count: after a
        plugin restart or ``disable -f`` it may be gone (PROTOCOL.md section 6).

        :raises VolumeNotFound: no such volume.
        """
        name = names.volume_name(name)
        mount_id = names.mount_id(mount_id)
        with self._locks.hold(name):
            self._not_receiving(name)
            try:
                self._backend.volume(name)
            except BackendUnavailable as exc:
                if self._recover is None:
                    raise
                log.warning("mount %s: storage unavailable (%s); mounting it again", name, exc)
                self._recover()
                self._backend.volume(name)
            path = self._backend.attach(name)
            self._mounts.add(name, mount_id)   # persisted before Docker hears back
        log.info("mounted volume %s for mount id %.12s", name, mount_id)
        return path

    def unmount(self, name: object, mount_id: object) -> None:
        """Drop one user; detach the volume when it was the last. Unknown IDs are harmless."""
        name = names.volume_name(name)
        mount_id = names.mount_id(mount_id)
        with self._locks.hold(name):
            now_unused = self._mounts.discard(name, mount_id)
            if now_unused is None:
                log.warning("unmount of volume %s by unknown mount id %.12s ignored", name, mount_id)
                return
            if now_unused:
                self._backend.detach(name)
        log.info("unmounted volume %s for mount id %.12s", name, mount_id)

    def path(self, name: object) -> Path:
        """The directory of a volume (no lock: Docker asks this often).

        :raises VolumeNotFound: no such volume.
        """
        return self._backend.volume(names.volume_name(name)).mountpoint

    def get(self, name: object) -> VolumeView:
        """One volume with its status for ``docker volume inspect`` (no lock).

        Only a volume that really does not exist is an error: dockerd purges its own
        metadata (options, labels) of a volume whose Get fails, so when the storage itself is
        unavailable we still answer, with the problem in ``Status``.

        :raises VolumeNotFound: no such volume.
        """
        name = names.volume_name(name)
        try:
            info = self._backend.volume(name)
        except (BackendUnavailable, BackendError) as exc:
            log.warning("get %s: answering without details: %s", name, exc)
            return VolumeView(name, None, None, {"state": "unavailable", "error": str(exc)})
        try:
            status = self._status(info)
        except VolumeNotFound:
            raise                                   # removed since: really gone
        except (PluginError, OSError) as exc:
            # A snapshot pruned, sent or received while we looked: the volume is there, only
            # its details are not, for now.
            log.warning("get %s: answering without all details: %s", name, exc)
            status = {"backend": self._backend.kind, "options": dict(info.options),
                      "error": f"details unavailable for now: {exc}"}
        return VolumeView(info.name, info.mountpoint, info.created, status)

    def list(self) -> list[VolumeView]:
        """Every volume, cheaply (one bulk backend pass, no usage figures)."""
        return [VolumeView(v.name, v.mountpoint, v.created) for v in self._backend.volumes()]

    # ------------------------------------------------------------------ send / receive

    def send(self, volume: object, snapshot: object = None, since: object = None, *,
             holding_slot: bool = False, resume_token: str | None = None) -> Transfer:
        """The framed stream of *volume*@*snapshot* (a snapshot taken now when None),
        incremental from *since*, as a :class:`Transfer` to iterate (and close).

        Only choosing the snapshots takes the volume's lock; while the stream runs, they are
        pinned (retention skips them) and no lock is held, so Docker's calls go on.

        :raises VolumeNotFound, SnapshotNotFound: as named.
        :raises VolumeBusy: as many transfers as allowed are already running (unless the
            caller holds a slot of :meth:`transfer_slot` already).
        """
        volume = names.volume_name(volume)
        since = None if since is None else names.snapshot_name(since)
        if snapshot is None:
            snapshot = self.snapshot([volume], unique_name("send-"))[0].name
        snapshot = names.snapshot_name(snapshot)
        with self._locks.hold(volume):
            info = self._backend.volume(volume)
            by_name = {s.name: s for s in self._backend.snapshots(volume)}
            for wanted in (snapshot, since):
                if wanted is not None and wanted not in by_name:
                    raise SnapshotNotFound(volume, wanted)
            if since is not None and by_name[since].created > by_name[snapshot].created:
                raise InvalidRequest(f"--since {since} is newer than {snapshot}")
            argv = self._backend.send_argv(volume, snapshot, since, resume_token=resume_token)
            if not holding_slot:
                self._acquire_transfer()
            pinned = [(volume, n) for n in (snapshot, since) if n is not None]
            with self._guard:
                self._pins.update(pinned)
        header = {"backend": self._backend.kind, "volume": volume, "snapshot": snapshot,
                  "identity": by_name[snapshot].identity, "created": rfc3339(by_name[snapshot].created),
                  "base": since, "base_identity": by_name[since].identity if since else None,
                  "options": dict(info.options), "resume": resume_token is not None}
        return Transfer(header, argv, lambda: self._release_transfer(pinned, not holding_slot))

    def move_base(self, volume: str, new: str, old: str | None) -> None:
        """A replication target now holds *new*: hold it, and release *old* unless another
        target still builds on it (ZFS user holds; no-ops on Btrfs)."""
        with self._locks.hold(volume):
            self._backend.hold(volume, new)
            bases = self.replications.bases(volume) if self.replications else set()
            if old and old != new and old not in bases:
                try:
                    self._backend.release(volume, old)
                except PluginError as exc:
                    log.warning("could not release %s@%s: %s", volume, old, exc)

    @contextmanager
    def transfer_slot(self) -> Iterator[None]:
        """Hold one of the ``transfers`` slots for a whole replication (its target may hang
        before any byte is sent; that must count against the bound too).

        :raises VolumeBusy: all slots are taken.
        """
        self._acquire_transfer()
        try:
            yield
        finally:
            self._transfers.release()

    def _acquire_transfer(self) -> None:
        if not self._transfers.acquire(timeout=1.0):
            raise VolumeBusy(f"{self._transfer_limit} transfers are running already; try again "
                             "when one has finished")

    def _release_transfer(self, pinned: list[tuple[str, str]], slot: bool) -> None:
        with self._guard:
            self._pins.subtract(pinned)
            self._pins += Counter()          # drop zero counts
        if slot:
            self._transfers.release()

    def receive(self, volume: object, source: Any) -> dict[str, Any]:
        """Read a framed stream from *source* (a binary file) into *volume*: a new volume from
        a full stream, the replica brought up to date by an incremental one.

        The stream is checked before anything is published: a truncated, corrupted or
        aborted stream, one for the other backend, or an incremental one whose base the
        replica lacks is refused and leaves nothing behind.

        :raises StreamRefused: the stream is bad or does not fit this replica.
        :raises VolumeExists: a full stream for an existing volume.
        :raises VolumeInUse: containers use the replica an incremental stream would change.
        """
        volume = names.volume_name(volume)
        reader = stream.Reader(source)
        try:
            header = reader.header()
        except stream.StreamError as exc:
            raise StreamRefused(str(exc)) from None
        if header.get("backend") != self._backend.kind:
            raise StreamRefused(f"the stream is from a {header.get('backend')} volume; this "
                                f"plugin stores volumes on {self._backend.kind}")
        try:
            snapshot = names.snapshot_name(header.get("snapshot"))
            opts = options.validate({k: v for k, v in (header.get("options") or {}).items()
                                     if k in options.REPLICA_OPTIONS},
                                    self._backend.kind, self._backend.compressions)
        except (InvalidName, InvalidOption) as exc:
            raise StreamRefused(f"the stream's header is not acceptable: {exc}") from None
        resume = header.get("resume") is True
        if resume and not self._backend.resumable:
            raise StreamRefused(f"the stream resumes an interrupted transfer; {self._backend.kind} "
                                "here cannot resume (send the whole stream again)")
        with self._receiving_into(volume):
            base = self._replica_base(volume, header)   # after the mark: no Mount slips in
            try:
                with self._backend.receiving(volume, snapshot, base, opts, resume=resume) as pipe:
                    for chunk in stream.prefetch(reader.data(hold_last=True)):
                        pipe.write(chunk)
            except stream.StreamError as exc:
                raise StreamRefused(f"{exc}; nothing was kept") from None
            except (BrokenPipeError, ConnectionError) as exc:
                raise StreamRefused(f"the receiver stopped early ({exc}); nothing was kept") from None
        log.info("received %s@%s: %d bytes (%s)", volume, snapshot, reader.bytes,
                 "incremental from " + base if base else "full")
        return {"volume": volume, "snapshot": snapshot, "base": base, "bytes": reader.bytes}

    @contextmanager
    def _receiving_into(self, volume: str) -> Iterator[None]:
        """Hold a transfer slot and mark *volume* as being received, both undone on exit.

        The mark is set under the volume's lock, which Mount holds while it checks the mark:
        a Mount either finished before (and the caller's check of the volume's users sees
        it) or is refused after, so a replica in use is never replaced under a container.

        :raises VolumeBusy: no slot is free, or the volume is being received already.
        """
        self._acquire_transfer()
        try:
            with self._locks.hold(volume), self._guard:
                if volume in self._receiving:
                    raise VolumeBusy(f"volume {volume} is being received already")
                self._receiving.add(volume)
            try:
                yield
            finally:
                with self._guard:
                    self._receiving.discard(volume)
        finally:
            self._transfers.release()

    def resume_token(self, volume: object) -> str | None:
        """The token of an interrupted receive into *volume*, where the backend can resume."""
        return self._backend.resume_token(names.volume_name(volume))

    def _replica_base(self, volume: str, header: dict[str, Any]) -> str | None:
        """The replica's snapshot an incremental stream builds on (None for a full stream)."""
        wanted = header.get("base_identity")
        if not wanted:
            return None
        try:
            have = self._backend.snapshots(volume)
        except VolumeNotFound:
            raise StreamRefused(f"the stream is incremental (from {header.get('base')}) but "
                                f"there is no volume {volume} here to apply it to; send a full "
                                "stream first") from None
        users = self._mounts.users(volume)
        if users:
            raise VolumeInUse(f"volume {volume} is in use by {self._users_text(volume, users)}; "
                              "a replica cannot be updated while containers use it")
        for snap in reversed(have):
            if snap.matches(str(wanted)):
                return snap.name
        raise StreamRefused(f"volume {volume} lacks the stream's base snapshot "
                            f"{header.get('base')} (identity {str(wanted)[:12]}); send from a "
                            "snapshot both sides have, or a full stream to a new volume")

    def _not_receiving(self, name: str) -> None:
        if name in self._receiving:
            raise VolumeBusy(f"volume {name} is being received; try again when it is done")

    def _not_sending(self, name: str) -> None:
        with self._guard:
            sending = sorted(snap for (vol, snap), count in self._pins.items() if vol == name and count)
        if sending:
            raise VolumeBusy(f"volume {name} is being sent ({', '.join(sending)}); try again "
                             "when the transfer is done")

    # ------------------------------------------------------------------ schedules

    def schedules(self) -> list[Schedule]:
        """Every volume with a ``schedule`` option and its last automatic run (no lock)."""
        found = []
        for info in self._backend.volumes():
            schedule = _schedule_of(info)
            if schedule is not None:
                try:
                    last = self._last_run(info.name)
                except NotFound:
                    continue                    # removed while we looked
                found.append(Schedule(info.name, *schedule, info.created, last,
                                      info.options.get("replicate")))
        return found

    def _last_run(self, volume: str, snapshots: list[SnapshotInfo] | None = None) -> AutoRun | None:
        """The volume's last automatic run: from the history, or where the history has none
        (a history file lost or damaged, see ``statefile``) from its newest automatic
        snapshot, so a restart keeps the cadence rather than firing at once."""
        last = self._history.last(volume) if self._history is not None else None
        if last is not None:
            return last
        if snapshots is None:
            snapshots = self._backend.snapshots(volume)
        autos = [s for s in snapshots if s.name.startswith(AUTO_PREFIX)]
        return AutoRun(autos[-1].created, autos[-1].name) if autos else None

    def run_automatic(self, volume: str, now: datetime) -> AutoRun:
        """Take *volume*'s automatic snapshot for *now* (quiesced as its options say), prune
        by its policy, and record the run, failed or not.

        :raises PluginError: the snapshot failed (recorded first); a pruning failure is
            recorded and logged but does not fail the run.
        """
        info = self._backend.volume(volume)
        interval, policy, quiesce = _schedule_of(info) or (None, None, "none")
        snapshot = AUTO_PREFIX + utc_stamp(now)
        try:
            self._take([volume], snapshot, quiesce)
        except PluginError as exc:
            self._record(volume, AutoRun(now, None, str(exc)))
            raise
        log.info("automatic snapshot %s@%s taken", volume, snapshot)
        pruned, error = 0, None
        try:
            pruned = sum(1 for d in self.prune(volume, now=now) if not d["keep"])
        except PluginError as exc:
            log.error("pruning %s failed: %s", volume, exc)
            error = f"snapshot taken, pruning failed: {exc}"
        self._record(volume, AutoRun(now, snapshot, error, pruned))
        return AutoRun(now, snapshot, error, pruned)

    def _record(self, volume: str, run: AutoRun) -> None:
        if self._history is not None:
            self._history.record(volume, run)

    def prune(self, volume: object = None, *, now: datetime | None = None,
              dry_run: bool = False) -> list[dict[str, Any]]:
        """Apply each scheduled volume's retention to its automatic snapshots (or only to
        *volume*'s); manual snapshots and clone origins are never touched.

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
        origins = _clone_origins(every.values())
        decisions = []
        for info in targets:
            schedule = _schedule_of(info)
            if schedule is None:
                continue
            autos = [s for s in self._backend.snapshots(info.name) if s.name.startswith(AUTO_PREFIX)]
            plan = retention.plan(autos, schedule[1], now=now,
                                  protected=frozenset(self._protected(info.name, origins)))
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

    def _protected(self, volume: str, origins: dict[str, set[str]]) -> set[str]:
        """Snapshots retention must keep: clone origins, replication bases, those being sent."""
        protected = set(origins.get(volume, ()))
        if self.replications is not None:
            protected |= self.replications.bases(volume)
        with self._guard:
            protected |= {snap for (vol, snap), count in self._pins.items() if vol == volume and count}
        return protected

    def _users_text(self, volume: str, mount_ids: list[str]) -> str:
        """"container(s) db, web" when Docker can tell, else a count of mounts."""
        if self._quiescer is not None:
            try:
                found = [c.name for c in self._quiescer.containers([volume])
                         if c.state in ("running", "paused", "restarting")]
                if found:
                    return "container(s) " + ", ".join(found)
            except QuiesceFailed as exc:
                log.warning("cannot name the containers of %s: %s", volume, exc)
        return f"{len(mount_ids)} container mount(s)"

    # ------------------------------------------------------------------ admin (CLI)

    def describe_volumes(self) -> list[dict[str, Any]]:
        """Every volume with usage and mount count, for ``snapvol ls``."""
        in_use = self._mounts.in_use()
        rows = []
        for info in sorted(self._backend.volumes(), key=lambda v: v.name):
            try:
                status = self._status(info, in_use)
            except (VolumeNotFound, BackendError):
                continue  # removed while listing
            rows.append({"name": info.name, "created": rfc3339(info.created),
                         "mountpoint": str(info.mountpoint), **status})
        return rows

    def describe(self) -> dict[str, Any]:
        """Facts about the plugin process and its storage, for ``snapvol status``."""
        in_use = self._mounts.in_use()
        volumes = self._backend.volumes()
        return {"version": __version__, "pid": os.getpid(),
                "uptime_seconds": round(time.time() - self._started),
                "backend": self._backend.kind, "storage": self._backend.describe(),
                "atomic_multi_volume_snapshots": self._backend.atomic_snapshots,
                "volumes": len(volumes), "volumes_in_use": len(in_use),
                "mounts": sum(in_use.values()), "options": options.accepted(self._backend.kind),
                "damaged_state_files": [str(p) for p in quarantined(*self._state_dirs())]}

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
        if self.replications is not None:
            for volume, targets in self.replications.recorded_bases().items():
                for target, base in targets.items():
                    with self._locks.hold(volume):
                        if base not in self._snapshot_names(volume):
                            self.replications.forget_base(volume, target)
        left = self._problems()
        return {"problems": left, "repaired": [p for p in found if p not in left]}

    def _problems(self) -> list[dict[str, Any]]:
        problems = [{"kind": "leftover", "what": leftover.what, "repair": None,
                     "note": f"the next start of the plugin will {leftover.repair}"}
                    for leftover in self._backend.leftovers()
                    if not (self._locks.busy(leftover.volume) or leftover.volume in self._receiving)]
        problems += [{"kind": "damaged state file",
                      "what": f"{path}: a state file that did not parse, moved aside",
                      "repair": None} for path in quarantined(*self._state_dirs())]
        existing = {v.name for v in self._backend.volumes()}
        problems += [{"kind": "stale mount", "what": f"volume {name} does not exist but "
                      f"{count} Docker mount ID(s) still count as using it",
                      "repair": "forget those mount IDs"}
                     for name, count in sorted(self._mounts.in_use().items()) if name not in existing]
        for volume, targets in (self.replications.recorded_bases().items()
                                if self.replications is not None else ()):
            have = self._snapshot_names(volume)
            for target, base in sorted(targets.items()):
                if base not in have:
                    problems.append({
                        "kind": "missing replication base",
                        "what": f"{volume}@{base}, the snapshot {target} last received, is gone "
                                "here", "repair": "forget it (the next replication looks for "
                                "another snapshot both sides hold)"})
        return problems

    def _snapshot_names(self, volume: str) -> set[str]:
        try:
            return {s.name for s in self._backend.snapshots(volume)}
        except VolumeNotFound:
            return set()

    def _state_dirs(self) -> set[Path]:
        return {s.path.parent for s in (self._mounts, self._history, self.replications)
                if s is not None}

    def _status(self, info: VolumeInfo, in_use: dict[str, int] | None = None) -> dict[str, Any]:
        usage = self._backend.usage(info.name)
        if in_use is None:
            mounts = len(self._mounts.users(info.name))
        else:
            mounts = in_use.get(info.name, 0)
        listed = self._backend.snapshots(info.name)
        snapshots = [{"name": s.name, "created": rfc3339(s.created),
                      "automatic": s.name.startswith(AUTO_PREFIX)} for s in listed]
        status = {"backend": self._backend.kind, "options": dict(info.options),
                  "used_bytes": usage.used_bytes, "quota_bytes": usage.quota_bytes,
                  "mounts": mounts, "snapshots": snapshots}
        replication = self.replications.last(info.name) if self.replications else None
        if replication is not None:
            status["replication"] = {
                "target": replication.target, "snapshot": replication.snapshot,
                "base": replication.base, "at": rfc3339(replication.at), "bytes": replication.bytes,
                "result": replication.result, "error": replication.error}
        schedule = _schedule_of(info)
        if schedule is not None:
            last = self._last_run(info.name, listed)
            plan = Schedule(info.name, *schedule, info.created, last)
            status["schedule"] = {
                "every": info.options["schedule"], "keep": str(schedule[1]),
                "quiesce": schedule[2], "next": rfc3339(plan.next_run),
                "last": None if last is None else {
                    "at": rfc3339(last.at), "snapshot": last.snapshot, "result": last.result,
                    "error": last.error, "pruned": last.pruned}}
        return status


def _schedule_of(info: VolumeInfo) -> tuple[timedelta, retention.Policy, str] | None:
    """(interval, retention, quiesce) of a volume with a ``schedule`` option, else None."""
    if "schedule" not in info.options:
        return None
    return (timedelta(seconds=parse_duration(info.options["schedule"])),
            retention.Policy.parse(info.options.get("keep", options.DEFAULT_KEEP)),
            info.options.get("quiesce", "none"))


def _clone_origins(volumes: Iterable[VolumeInfo]) -> dict[str, set[str]]:
    """volume -> names of its snapshots that other volumes were cloned from (``from=V@S``)."""
    origins: dict[str, set[str]] = {}
    for info in volumes:
        volume, _, snapshot = info.options.get("from", "").partition("@")
        if snapshot:
            origins.setdefault(volume, set()).add(snapshot)
    return origins


class StreamRefused(InvalidRequest):
    """A stream that cannot be received here (bad, for the other backend, missing its base)."""


class Transfer:
    """A running send: iterate it for the framed stream; :meth:`close` (also called by the
    WSGI server when the client goes away) stops the native sender and frees its slot."""

    CHUNK = stream.FRAME

    def __init__(self, header: dict[str, Any], argv: list[str],
                 release: Callable[[], None]) -> None:
        self.header = header
        self.bytes = 0
        self._argv = argv
        self._release: Callable[[], None] | None = release
        self._child: Any = None

    def _native(self) -> Iterator[bytes]:
        self._child = Streaming(self._argv, feed=False)
        with self._child:
            out = self._child.proc.stdout
            while chunk := out.read(self.CHUNK):     # whole frames (a pipe gives 64 KiB reads)
                self.bytes += len(chunk)
                yield chunk
            self._child.finish()

    def __iter__(self) -> Iterator[bytes]:
        try:
            yield from stream.encode(self.header, stream.prefetch(self._native()))
        finally:
            self.close()

    def close(self) -> None:
        if self._child is not None and self._child.proc.poll() is None:
            self._child.kill()
        release, self._release = self._release, None
        if release is not None:
            release()


def rfc3339(moment: datetime) -> str:
    """``2026-11-29T07:33:23Z``: the only time format Docker's Go decoder accepts."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(opts: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "no options"
