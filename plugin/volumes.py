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
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from . import __version__, names, options
from .backends.base import Backend, SnapshotInfo, VolumeInfo
from .errors import (BackendError, BackendUnavailable, Conflict, InvalidName, InvalidOption,
                     InvalidRequest, SnapshotNotFound, VolumeExists, VolumeInUse, VolumeNotFound)
from .locks import VolumeLocks
from .mounts import MountTable

log = logging.getLogger(__name__)

AUTO_PREFIX = "auto-"    # reserved for the scheduler's snapshots, the only ones ever pruned


def _stamp() -> str:
    """20261129T101500Z: sorts by time, no ':' (awkward in paths and -v specs)."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


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
                 recover: Callable[[], object] | None = None) -> None:
        """*recover* makes the storage reachable again (re-mounts it); Mount calls it when the
        backend reports the storage unavailable, e.g. after ``docker plugin disable -f``."""
        self._backend = backend
        self._mounts = mounts
        self._locks = locks
        self._recover = recover
        self._started = time.time()

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
            try:
                existing = self._backend.volume(name)
            except VolumeNotFound:
                if origin:
                    self._clone(name, opts)
                else:
                    self._backend.create_volume(name, opts)
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
            snapshot = f"clone-{name}-{_stamp()}"
            self._backend.create_snapshot(origin, snapshot)
        self._backend.clone(origin, snapshot, name, opts)

    # ------------------------------------------------------------------ snapshots (CLI)

    def snapshot(self, volumes: object, name: object = None) -> list[SnapshotInfo]:
        """Snapshot one or more volumes under one name, all or none.

        :raises InvalidName: a bad volume or snapshot name, or one with the reserved prefix.
        :raises VolumeNotFound: a volume does not exist (nothing is taken).
        :raises SnapshotExists: a volume already has a snapshot of that name.
        """
        if not isinstance(volumes, list) or not volumes:
            raise InvalidRequest("give one or more volume names")
        targets = sorted({names.volume_name(v) for v in volumes})
        snap = names.snapshot_name(name) if name is not None else f"manual-{_stamp()}"
        if snap.startswith(AUTO_PREFIX):
            raise InvalidName(f"snapshot names starting with {AUTO_PREFIX!r} are reserved for "
                              "scheduled snapshots")
        with self._locks.hold(*targets):
            for volume in targets:
                self._backend.volume(volume)
            taken: list[SnapshotInfo] = []
            try:
                for volume in targets:
                    taken.append(self._backend.create_snapshot(volume, snap))
            except BaseException:
                for info in taken:   # all or none
                    self._backend.destroy_snapshot(info.volume, info.name)
                raise
        return taken

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
            users = self._mounts.users(volume)
            if users:
                raise VolumeInUse(f"volume {volume} is in use by {len(users)} container "
                                  "mount(s); stop those containers before a rollback")
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
            self._backend.volume(name)
            users = self._mounts.users(name)
            if users:
                raise VolumeInUse(f"volume {name} is in use by {len(users)} container "
                                  "mount(s); stop or remove those containers first")
            self._backend.destroy_volume(name)
            self._mounts.forget(name)

    def mount(self, name: object, mount_id: object) -> Path:
        """Record one more user of the volume and return the directory Docker bind-mounts.

        The backing mount is re-checked on every call, not trusted from the count: after a
        plugin restart or ``disable -f`` it may be gone (PROTOCOL.md section 6).

        :raises VolumeNotFound: no such volume.
        """
        name = names.volume_name(name)
        mount_id = names.mount_id(mount_id)
        with self._locks.hold(name):
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
        return VolumeView(info.name, info.mountpoint, info.created, self._status(info))

    def list(self) -> list[VolumeView]:
        """Every volume, cheaply (one bulk backend pass, no usage figures)."""
        return [VolumeView(v.name, v.mountpoint, v.created) for v in self._backend.volumes()]

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
                "volumes": len(volumes), "volumes_in_use": len(in_use),
                "mounts": sum(in_use.values()), "options": options.accepted(self._backend.kind)}

    def _status(self, info: VolumeInfo, in_use: dict[str, int] | None = None) -> dict[str, Any]:
        usage = self._backend.usage(info.name)
        if in_use is None:
            mounts = len(self._mounts.users(info.name))
        else:
            mounts = in_use.get(info.name, 0)
        snapshots = [{"name": s.name, "created": rfc3339(s.created),
                      "automatic": s.name.startswith(AUTO_PREFIX)}
                     for s in self._backend.snapshots(info.name)]
        return {"backend": self._backend.kind, "options": dict(info.options),
                "used_bytes": usage.used_bytes, "quota_bytes": usage.quota_bytes,
                "mounts": mounts, "snapshots": snapshots}


def rfc3339(moment: datetime) -> str:
    """``2026-11-29T07:33:23Z``: the only time format Docker's Go decoder accepts."""
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _describe(opts: Mapping[str, str]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(opts.items())) or "no options"
