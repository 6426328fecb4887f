"""Docker's volume lifecycle and snapshots, on top of a storage backend.

:class:`VolumeService` owns the rules the backend does not know: names and options are
validated here, every mutation happens under the volume's lock, Mount/Unmount are counted by
Docker mount ID and persisted, Remove refuses a volume in use, snapshots of several volumes
are all or none, and rollback is refused while a container uses the volume or when it would
silently destroy newer snapshots. Nothing here runs while a transfer needs the volume to stay
as it is (:class:`~plugin.inflight.InFlight`). Read-only calls (Path, List, snapshot listing)
take no lock, so they stay fast while a slow operation holds a volume.

The other domain modules build on this one: ``transfers`` (send, receive), ``schedules``
(automatic snapshots and retention), ``status`` (what inspect and ``snapvol ls`` show),
``check`` (``snapvol check``); ``domain`` wires them together.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path

from . import names, options, snapshot_names
from .backends.base import Backend, SnapshotInfo, VolumeInfo
from .errors import (BackendError, BackendUnavailable, Conflict, InvalidName, InvalidOption,
                     InvalidRequest, PluginError, SnapshotNotFound, VolumeExists, VolumeInUse, VolumeNotFound)
from .history import AutoHistory, ReplicationLog
from .inflight import InFlight
from .known import KnownVolumes
from .lifecycle import Lifecycle
from .locks import VolumeLocks
from .mounts import MountTable
from .quiesce import DockerQuiescer, QuiesceFailed
from .trash import Trash

log = logging.getLogger(__name__)


class VolumeService:
    """Docker's volume operations, made safe: validated, locked, counted, persisted."""

    def __init__(self, backend: Backend, mounts: MountTable, locks: VolumeLocks,
                 inflight: InFlight, lifecycle: Lifecycle, *, recover: Callable[[], object] | None = None,
                 history: AutoHistory | None = None, quiescer: DockerQuiescer | None = None,
                 replications: ReplicationLog | None = None) -> None:
        """*recover* makes the storage reachable again (re-mounts it); Mount calls it when the
        backend reports the storage unavailable, e.g. after ``docker plugin disable -f``.
        *quiescer* reaches Docker to pause containers (without one, ``quiesce=pause`` is
        refused); a removed volume's entries in *history* and *replications* are forgotten."""
        self._backend = backend
        self._mounts = mounts
        self._locks = locks
        self._inflight = inflight
        self._lifecycle = lifecycle
        self._recover = recover
        self._history = history
        self._quiescer = quiescer
        self._replications = replications
        self._listeners: list[Callable[[], None]] = []
        self._created: list[Callable[[str, dict[str, str]], None]] = []
        self._removed: list[Callable[[str], None]] = []
        self.known = KnownVolumes()
        # set by the standby roles (plugin.standby): called by Mount before anything else,
        # it refuses a volume that is not served here (a standby, a fenced primary)
        self.mount_guard: Callable[[str], None] | None = None
        # set by the trash (plugin.trash): Remove moves a volume there instead of destroying it
        self.trash: Trash | None = None
        # ... and by Create, with the options, before a new volume is made: each refuses one
        # this host must not make (named as its own standby: only a sync makes it here; a
        # replication over ssh that cannot work from here)
        self.create_guards: list[Callable[[str, dict[str, str]], None]] = []

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call *listener* after a scheduled volume is created or removed (the scheduler
        re-plans)."""
        self._listeners.append(listener)

    def on_create(self, listener: Callable[[str, dict[str, str]], None]) -> None:
        """Call *listener* with the name and options of every volume Create makes (before
        Create answers)."""
        self._created.append(listener)

    def on_remove(self, listener: Callable[[str], None]) -> None:
        """Call *listener* with the name of every volume Remove destroyed."""
        self._removed.append(listener)

    def _changed(self) -> None:
        for listener in self._listeners:
            listener()

    def open(self) -> None:
        """Check the backend and reconcile the mount table with the volumes that exist.

        :raises BackendUnavailable: the storage root is not usable.
        """
        self._backend.check()
        if self.trash is not None:
            self.trash.recover()           # before records of vanished volumes are forgotten
        # listing(), not volumes(): the same answer, and the first List then finds every
        # volume already read (BtrfsBackend.listing; 0.3 s at 10,000 volumes otherwise)
        existing = {v.name for v in self._backend.listing()}
        self.known.reset(existing)
        if self.trash is not None:
            existing |= self.trash.internal_names()
        for name in self._mounts.in_use():
            if name not in existing:
                log.warning("volume %s is gone; forgetting its mount IDs %s",
                            name, self._mounts.forget(name))
                continue
            try:
                self._backend.attach(name)  # re-provision what running containers still use
            except BackendError as exc:
                log.error("volume %s is in use but cannot be attached: %s", name, exc)
        self._forget_what_is_gone(existing)

    def _forget_what_is_gone(self, existing: set[str]) -> None:
        """What a kill in the middle of an operation left behind: the runs and replications
        of volumes that no longer exist, replication bases whose snapshot is gone, and
        snapshots snapvol took for itself that nothing needs any more."""
        for store in (self._history, self._replications):
            for name in sorted(store.volumes() - existing) if store is not None else ():
                log.warning("volume %s is gone; forgetting its record in %s", name, store.path)
                store.forget(name)
        for name in sorted(self._replications.volumes()) if self._replications is not None else ():
            self._lifecycle.forget_lost_bases(name)
        try:
            self._lifecycle.tidy()
        except PluginError as exc:          # never a reason not to start
            log.error("could not look for snapshots left by interrupted operations: %s", exc)

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
            self._inflight.refuse_if_receiving(name)   # a full receive makes it
            try:
                existing = self._backend.volume(name)
            except VolumeNotFound:
                for guard in self.create_guards:
                    guard(name, opts)
                if self.trash is not None and self.trash.holds_any():
                    self.trash.tidy()       # room for it first, if the pool is past the mark
                if origin:
                    self._clone(name, opts)
                else:
                    self._backend.create_volume(name, opts)
                self.known.add(name)
                for listener in self._created:
                    listener(name, opts)
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
        implicit = not snapshot
        if implicit:
            snapshot = snapshot_names.clone_origin(name)
            self._backend.create_snapshot(origin, snapshot)
        try:
            self._backend.clone(origin, snapshot, name, opts)
        except PluginError:
            if implicit:           # a refused Create leaves nothing, its snapshot included
                try:
                    self._backend.destroy_snapshot(origin, snapshot)
                except PluginError as exc:
                    log.warning("keeping %s@%s after the failed clone %s: %s", origin,
                                snapshot, name, exc)
            raise
        if implicit and not self._backend.clones_need_origin:
            try:                   # taken only to clone from, and the clone does not need it
                self._backend.destroy_snapshot(origin, snapshot)
            except PluginError as exc:
                log.warning("keeping %s@%s, taken for clone %s: %s", origin, snapshot, name, exc)

    # ------------------------------------------------------------------ snapshots

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
        snap = (names.snapshot_name(name) if name is not None
                else snapshot_names.MANUAL_PREFIX + snapshot_names.utc_stamp())
        if snapshot_names.is_automatic(snap):
            raise InvalidName(f"snapshot names starting with {snapshot_names.AUTO_PREFIX!r} "
                              "are reserved for scheduled snapshots")
        if quiesce not in ("none", "pause"):
            raise InvalidRequest("quiesce must be none or pause")
        if quiesce == "pause":
            for volume in targets:
                self._backend.volume(volume)   # before pausing anything (take checks again)
        return self.take(targets, snap, str(quiesce))

    def take(self, volumes: list[str], snapshot: str, quiesce: str) -> list[SnapshotInfo]:
        """Snapshot validated *volumes* under *snapshot*, quiesced as asked (no name checks)."""
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
        """:raises Conflict: a clone depends on the snapshot (ZFS), or it is being sent."""
        volume = names.volume_name(volume)
        snapshot = names.snapshot_name(snapshot)
        with self._locks.hold(volume):
            clone = self._backend.clone_origins().get(volume, {}).get(snapshot)
            if clone is not None:
                raise Conflict(f"snapshot {volume}@{snapshot} is the origin of volume {clone}, "
                               "which depends on it; remove that volume first")
            if snapshot in self._inflight.sending(volume):
                raise Conflict(f"snapshot {volume}@{snapshot} is being sent or verified; try "
                               "again when that is done")
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
            self._inflight.refuse_if_receiving(volume)
            self._inflight.refuse_if_sending(volume)
            users = self._mounts.users(volume)
            if users:
                raise VolumeInUse(f"volume {volume} is in use by {self.users_text(volume, users)}"
                                  "; stop those containers before a rollback")
            snaps = [s.name for s in self._backend.snapshots(volume)]
            if snapshot not in snaps:
                raise SnapshotNotFound(volume, snapshot)
            newer = snaps[snaps.index(snapshot) + 1:]
            if newer and not self._backend.rollback_keeps_newer and not destroy_newer:
                raise Conflict(f"rolling {volume} back to {snapshot} destroys the newer "
                               f"snapshot(s) {', '.join(newer)} on {self._backend.kind}; "
                               "pass --destroy-newer to do it")
            try:
                self._backend.rollback(volume, snapshot)
            finally:                # also after a failure: ZFS may have destroyed them first
                if newer and not self._backend.rollback_keeps_newer:
                    self._lifecycle.forget_lost_bases(volume)

    def remove(self, name: object) -> None:
        """Remove a volume that no container uses: into the trash (:mod:`plugin.trash`),
        unless there is none, its option says ``trash=off`` or the pool is past the trash's
        fill threshold; then destroy it.

        :raises VolumeNotFound: no such volume.
        :raises VolumeInUse: Docker mounts of it are still active.
        """
        name = names.volume_name(name)
        with self._locks.hold(name):
            self._inflight.refuse_if_receiving(name)
            self._inflight.refuse_if_sending(name)
            info = self._backend.volume(name)
            users = self._mounts.users(name)
            if users:
                raise VolumeInUse(f"volume {name} is in use by {len(users)} container "
                                  "mount(s); stop or remove those containers first")
            kept = self.trash is not None and self.trash.keeps(info)
            if kept:
                self.trash.put(name)                # type: ignore[union-attr]
                self.known.discard(name)
                self._mounts.forget(name)
            else:
                related = self._destroy_locked(name)
        if kept:
            self._changed()         # the scheduler watches the trash (expiry, space pressure)
            return
        self._forget_destroyed(name, info, related)

    def destroy_trashed(self, name: str) -> None:
        """Destroy snapvol's own volume *name* (the trash's purge; the caller holds its
        lock): as Remove destroys, with its records and clone relations.

        :raises VolumeNotFound: no such volume.
        """
        info = self._backend.volume(name)
        related = self._destroy_locked(name)
        self._forget_destroyed(name, info, related)

    def restored(self, name: str) -> None:
        """Volume *name* came back from the trash: it is listed again, and planned."""
        self.known.add(name)
        try:
            if "schedule" in self._backend.volume(name).options:
                self._changed()
        except PluginError as exc:
            log.warning("restored volume %s cannot be read: %s", name, exc)

    def _destroy_locked(self, name: str) -> set[str]:
        """Destroy volume *name* (lock held); return the volumes whose clone relations it had."""
        origins = self._backend.clone_origins()
        depended_on = {volume for volume, clones in origins.items()
                       if name in clones.values()}
        # its clones as the filesystem has them (a clone of a clone, once the middle one
        # went, hangs on this volume although its from= names the other): ZFS promotes
        # them and they take this volume's clone-origin snapshots over
        clones = set(origins.get(name, {}).values())
        self._backend.destroy_volume(name)
        self.known.discard(name)
        self._mounts.forget(name)
        return depended_on | clones

    def _forget_destroyed(self, name: str, info: VolumeInfo, related: set[str]) -> None:
        if self._history is not None:
            self._history.forget(name)
        if self._replications is not None:
            self._replications.forget(name)
        for listener in self._removed:
            listener(name)
        self._retire_clone_origin(name, info, related)
        if "schedule" in info.options:
            self._changed()      # only then has the scheduler anything to re-plan

    def _retire_clone_origin(self, name: str, info: VolumeInfo, depended_on: set[str]) -> None:
        """The snapshots a removed volume's clone relations kept may be unneeded now: the
        one it was cloned from (on its origin as from= names it, or as the filesystem had it:
        *depended_on*, since ZFS moves origins when it promotes clones), and those its clones
        took over when they were promoted (by from=, and as the filesystem had them: in
        *depended_on* too). Nothing else is looked at."""
        origin = info.options.get("from", "").partition("@")[0]
        concerned = ({origin} if origin else set()) | depended_on
        concerned |= {c.name for c in self._backend.volumes()
                      if c.options.get("from", "").partition("@")[0] == name}
        if concerned:
            self._lifecycle.tidy(only=concerned)

    def mount(self, name: object, mount_id: object) -> Path:
        """Record one more user of the volume and return the directory Docker bind-mounts.

        The backing mount is re-checked on every call, not trusted from the count: after a
        plugin restart or ``disable -f`` it may be gone (PROTOCOL.md section 6).

        :raises VolumeNotFound: no such volume.
        """
        name = names.volume_name(name)
        mount_id = names.mount_id(mount_id)
        if self.mount_guard is not None:
            self.mount_guard(name)       # no lock held: it may wait for a hand-off
        with self._locks.hold(name):
            self._inflight.refuse_if_receiving(name)
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

    def list(self) -> list[VolumeInfo]:
        """Every volume, cheaply (the backend's :meth:`~plugin.backends.base.Backend.listing`,
        no usage figures; no lock)."""
        found = self._backend.listing()
        self.known.update(v.name for v in found)   # one left out (unreadable) is not gone
        return found

    def users_text(self, volume: str, mount_ids: list[str]) -> str:
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


def _describe(opts: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "no options"
