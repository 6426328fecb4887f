"""Volumes as ZFS datasets: the Backend contract, over the modules that do the work.

Creation is committed by the last ``zfs set snapvol:owner=snapvol``, removal starts by
setting ``removing``, so Docker never sees a half-made volume; start-up destroys datasets left
"creating" or "removing" by a crash, and the inboxes of interrupted receives. Which volumes
there are comes from :class:`.zfs_index.ZfsIndex` (one ``zfs get -H -p -d 1`` at start, then
kept current by the operations here): Get, Path, Mount and List of mounted volumes run no
``zfs`` process, and Remove finds the clones it must promote without listing every dataset.

* :mod:`.zfs_commands`: each ZFS primitive, through libzfs_core or the ``zfs`` CLI, and why;
* :mod:`.zfs_layout`: where volumes live in the pool, their ownership and options properties;
* :mod:`.zfs_index`: the datasets and their properties in memory, and why it is never stale;
* :mod:`.zfs_receive`: streams received into volumes, inboxes and resume tokens;
* :mod:`.zfs_removal`: removal (clones promoted first) and what crashed operations left.
"""

from __future__ import annotations

import errno
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from .. import names
from ..errors import (BackendError, BackendUnavailable, CommandFailed, Conflict, SnapshotExists,
                      SnapshotNotFound, VolumeExists, VolumeNotFound)
from .base import Capacity, Leftover, SnapshotInfo, Usage, VolumeInfo, snapshot_each
from .zfs_commands import ZfsCommands
from .zfs_layout import OWNER, Layout
from .zfs_receive import Receiver
from .zfs_removal import Remover

log = logging.getLogger(__name__)

_ROLLBACK_ROOM = 1 << 20          # below this, a rollback is refused before it destroys anything


class ZfsBackend:
    """Volumes as datasets below the parent dataset *root*, mounted below *mount_base*;
    *lzc* is the libzfs_core module, or ``None`` for the CLI only."""

    kind: ClassVar[str] = "zfs"
    rollback_keeps_newer: ClassVar[bool] = False        # zfs rollback -r destroys them
    clones_need_origin: ClassVar[bool] = True           # destroy refuses while a clone exists
    # format 3: zfs send's stream carries a fletcher4 checksum over all of it, which zfs
    # receive checks at the END record before it commits anything (OpenZFS: also per record)
    checked_streams: ClassVar[bool] = True

    def __init__(self, root: str, mount_base: Path, lzc: Any | None = None) -> None:
        self.root = root
        self.pool = root.split("/", 1)[0]
        self.mount_base = mount_base
        self._zfs = ZfsCommands(lzc)
        self._layout = Layout(self._zfs, root, mount_base,
                              lzc.lzc_exists if lzc is not None else None)
        self._index = self._layout.index
        self._receiver = Receiver(self._zfs, self._layout)
        self._remover = Remover(self._zfs, self._layout, self._receiver)
        self.atomic_snapshots = self._zfs.atomic_snapshots
        self.resumable = self._zfs.resumable
        self.compressions: frozenset[str] = frozenset()
        self._facts: dict[str, Any] = {}

    # ------------------------------------------------------------------ start-up

    def preflight(self) -> None:
        """Whether this storage can work at all, in two quick ``zpool``/``zfs`` calls.

        :raises BackendUnavailable: no such pool, no zfs tools, or userland and kernel module
            versions differ (OpenZFS refuses some ioctls across versions).
        """
        try:
            pools = self._zfs.pools()
        except BackendError as exc:
            raise BackendUnavailable(f"ZFS is not usable here: {exc}") from None
        if self.pool not in pools:
            raise BackendUnavailable(f"ZFS pool {self.pool} does not exist (SNAPVOL_ZFS_ROOT={self.root}); "
                                     "create it, or point SNAPVOL_ZFS_ROOT at an existing pool")
        self._facts["implementation"] = self._zfs.implementation()

    def check(self) -> None:
        """:meth:`preflight`, then create the parent dataset, detect capabilities, and finish
        operations a crash interrupted.

        :raises BackendUnavailable: as :meth:`preflight`.
        """
        self.preflight()
        if self._zfs.get(self.root, ["type"], missing_ok=True) is None:
            log.info("creating parent dataset %s", self.root)
            self._zfs.create_parent(self.root)
        self.mount_base.mkdir(parents=True, exist_ok=True, mode=0o711)
        self._index.sync()              # the index: the one listing of every dataset
        self.compressions = self._zfs.compressions(self.pool)
        self._facts.update({"libzfs_core": self._zfs.libzfs_core,
                            "compression": sorted(self.compressions)})
        log.info("zfs backend on %s: libzfs_core=%s, compression=%s", self.root,
                 self._zfs.libzfs_core, ",".join(sorted(self.compressions)))
        self.finish_interrupted()

    def leftovers(self) -> list[Leftover]:
        return self._remover.leftovers()

    def finish_interrupted(self) -> None:
        self._remover.finish_interrupted()

    def describe(self) -> dict[str, Any]:
        return {"root": self.root, "filesystem": "zfs", "mounts": str(self.mount_base), **self._facts}

    def capacity(self) -> Capacity:
        """The root dataset's used + available: the pool's room for volumes (less any quota
        set on the root)."""
        props = self._zfs.get(self.root, ["used", "available"])
        used, available = int(props["used"]), int(props["available"])
        return Capacity(used + available, available)

    # ------------------------------------------------------------------ queries

    def volumes(self) -> list[VolumeInfo]:
        return self._listed(internal=False, fresh=False)

    def listing(self) -> list[VolumeInfo]:
        """:meth:`volumes` for a client's List; the index is re-synced when it is older than
        :data:`.zfs_index.MAX_AGE` (so datasets made unmounted behind our back show too), in
        the background: this call does not wait for it."""
        return self._listed(internal=False, fresh=True)

    def internal_volumes(self) -> list[VolumeInfo]:
        return self._listed(internal=True, fresh=False)

    def _listed(self, *, internal: bool, fresh: bool) -> list[VolumeInfo]:
        """The volumes (snapvol's own, or the clients'), each proven to exist: mounted per
        the mount table, or by ``lzc_exists``; those that cannot be proven so (not mounted,
        on zfs-fuse: zfs-fuse mounts no more than 999 here) by one ``zfs get`` of them
        alone, never one per volume."""
        children = self._layout.children(fresh=fresh)
        chosen = {name: props for name, props in children.items()
                  if props.get(OWNER) == "snapvol" and names.is_internal(name) == internal}
        sources = self._index.mounts.sources()          # read once for all of them
        unproven = [name for name in chosen if not self._index.alive(name, sources)]
        if unproven:
            gone = set(unproven) - self._index.confirm(unproven)
            chosen = {name: props for name, props in chosen.items() if name not in gone}
        return [self._layout.info(name, props) for name, props in chosen.items()]

    def volume(self, name: str) -> VolumeInfo:
        return self._layout.info(name, self._layout.owned_props(name)[1])

    def usage(self, name: str) -> Usage:
        """From ``statvfs`` of its mount point when the mount table shows it mounted there
        (no process: Docker's Get shows it), else from ``zfs get``. ZFS reports the dataset's
        ``referenced`` bytes as used blocks, counted in 512-byte units on zfs-fuse and in the
        record size on OpenZFS (128 KiB by default): so this is within one such unit of
        :meth:`usages`, which reads ``referenced`` itself."""
        dataset, props = self._layout.owned_props(name)
        quota = int(props["refquota"]) if props.get("refquota", "").isdigit() else 0
        mountpoint = os.path.realpath(self._layout.mountpoint(name))
        if self._index.mounts.sources().get(mountpoint) == dataset:
            try:
                st = os.statvfs(mountpoint)
                return Usage((st.f_blocks - st.f_bfree) * st.f_frsize, quota or None)
            except OSError:
                pass                    # unmounted meanwhile: ask ZFS
        props = self._zfs.get(dataset, ["referenced", "refquota"])
        quota = int(props["refquota"]) if props["refquota"].isdigit() else 0
        return Usage(int(props["referenced"]), quota or None)

    def usages(self) -> dict[str, Usage]:
        found = self._zfs.get_with_children(self.root, ["type", "referenced", "refquota", OWNER])
        prefix = self.root + "/"
        usages = {}
        for dataset, props in found.items():
            name = dataset[len(prefix):]
            if (dataset.startswith(prefix) and "/" not in name and "@" not in name
                    and not names.is_internal(name)
                    and props.get(OWNER) == "snapvol" and props.get("referenced", "").isdigit()):
                quota = props.get("refquota", "")
                usages[name] = Usage(int(props["referenced"]),
                                     int(quota) if quota.isdigit() and int(quota) else None)
        return usages

    # ------------------------------------------------------------------ changes

    def create_volume(self, name: str, options: Mapping[str, str]) -> VolumeInfo:
        dataset = self._layout.dataset(name)
        existing = self._zfs.get(dataset, [OWNER], missing_ok=True)
        if existing is not None:
            owner = "snapvol" if existing.get(OWNER) == "snapvol" else "something else (not snapvol)"
            raise VolumeExists(f"volume {name} already exists (made by {owner})")
        mountpoint = self._layout.mountpoint(name)
        props = self._layout.properties(name, options)
        try:
            self._zfs.create(dataset, props)
            self._zfs.mount(dataset, mountpoint)
            os.chmod(mountpoint, int(options.get("mode", "755"), 8))
            if "uid" in options or "gid" in options:
                os.chown(mountpoint, int(options.get("uid", -1)), int(options.get("gid", -1)))
            self._zfs.set(dataset, OWNER, "snapvol")       # the commit point
        except BaseException as exc:
            self._layout.remove_half_made(dataset, "half-made")   # report the cause, not the cleanup
            if isinstance(exc, OSError):
                raise BackendError(f"cannot create volume {name}: {exc}", errno=exc.errno) from None
            raise
        self._index.refresh(names.stored_volume_name(name))
        log.info("created volume %s (options: %s)", name, ", ".join(sorted(options)) or "none")
        return self.volume(name)

    def rename_volume(self, name: str, new_name: str) -> None:
        """One ``zfs rename`` (the snapshots go with the dataset), then the mount point
        follows the name; repeated after a kill, only what is left is done."""
        old, new = self._layout.dataset(name), self._layout.dataset(new_name)
        old_props = self._zfs.get(old, [OWNER], missing_ok=True)
        new_props = self._zfs.get(new, [OWNER, "mountpoint"], missing_ok=True)
        if old_props is not None and new_props is not None:
            raise VolumeExists(f"cannot rename volume {name} to {new_name}: it exists")
        if old_props is None and new_props is None:
            raise VolumeNotFound(name)
        if old_props is not None:
            self._layout.owned(name)
            if self._layout.is_mounted(self._layout.mountpoint(name)):
                self._zfs.unmount(old)
            self._zfs.rename(old, new)
            new_props = None
        mountpoint = str(self._layout.mountpoint(new_name))
        if new_props is None or new_props.get("mountpoint") != mountpoint:
            # not when a repeat finds it done: setting it remounts, which zfs-fuse can refuse
            # as busy for a moment, and an undo must not fail on a step it does not need
            self._zfs.set_while_busy(new, "mountpoint", mountpoint)
        self._index.forget(names.stored_volume_name(name))
        self._index.refresh(names.stored_volume_name(new_name))
        try:
            self._layout.mountpoint(name).rmdir()
        except OSError:
            pass
        log.info("renamed volume %s to %s", name, new_name)

    def destroy_volume(self, name: str) -> None:
        """Clones of its snapshots are promoted first, the removal is marked before anything
        moves (see :meth:`.zfs_removal.Remover.destroy_volume`)."""
        self._remover.destroy_volume(name)

    # ------------------------------------------------------------------ snapshots

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        # `zfs get -r` lists snapshots in creation order; creation has whole seconds, so the
        # stable sort keeps that order within a second
        return sorted(self._layout.snapshots(self._layout.owned(volume), volume).values(),
                      key=lambda s: s.created)

    def clone_origins(self) -> dict[str, dict[str, str]]:
        prefix = self.root + "/"
        found: dict[str, dict[str, str]] = {}
        for name, props in self._layout.children().items():
            origin = props.get("origin", "")
            if props.get(OWNER) == "snapvol" and origin.startswith(prefix) and "@" in origin:
                volume, _, snapshot = origin[len(prefix):].partition("@")
                found.setdefault(volume, {})[snapshot] = name
        return found

    def all_snapshots(self) -> dict[str, list[SnapshotInfo]]:
        owned = {v.name for v in self.volumes()}
        found: dict[str, list[SnapshotInfo]] = {name: [] for name in owned}
        for snap in self._layout.snapshots_below():
            if snap.volume in owned:
                found[snap.volume].append(snap)
        return {name: sorted(snaps, key=lambda s: s.created) for name, snaps in found.items()}

    def create_snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        dataset = self._layout.owned(volume)
        full = f"{dataset}@{names.snapshot_name(snapshot)}"
        if snapshot in self._layout.snapshots(dataset, volume):
            raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
        self._zfs.snapshot([full], f"cannot snapshot {volume}")
        log.info("took snapshot %s@%s", volume, snapshot)
        return self._layout.snapshots(dataset, volume)[snapshot]

    def create_snapshots(self, volumes: list[str], snapshot: str) -> list[SnapshotInfo]:
        """libzfs_core: one ``lzc_snapshot`` call, atomic (one transaction group) across the
        datasets of a pool. zfs-fuse's ``zfs snapshot`` takes one name per call, so there
        they are taken one after another (all or none)."""
        if not self.atomic_snapshots or len(volumes) < 2:
            return snapshot_each(self, volumes, snapshot)
        fulls = []
        for volume in volumes:
            dataset = self._layout.owned(volume)
            if snapshot in self._layout.snapshots(dataset, volume):
                raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
            fulls.append(f"{dataset}@{names.snapshot_name(snapshot)}")
        self._zfs.snapshot(fulls, f"cannot snapshot {', '.join(volumes)}")
        log.info("took snapshot %s of %s in one transaction", snapshot, ", ".join(volumes))
        return [self._layout.snapshots(self._layout.dataset(v), v)[snapshot] for v in volumes]

    def destroy_snapshot(self, volume: str, snapshot: str) -> None:
        full = self._layout.owned_snapshot(volume, snapshot)
        try:
            self._zfs.destroy_snapshot(full, f"cannot destroy snapshot {volume}@{snapshot}")
        except BackendError:
            if self._zfs.is_held(full):
                raise Conflict(f"snapshot {volume}@{snapshot} is the base of a replication "
                               "(held by snapvol); it is released when a newer one replaces "
                               "it or the volume is removed") from None
            raise
        log.info("removed snapshot %s@%s", volume, snapshot)

    def clone(self, volume: str, snapshot: str, new_volume: str,
              options: Mapping[str, str]) -> VolumeInfo:
        origin = self._layout.owned_snapshot(volume, snapshot)
        dataset = self._layout.dataset(new_volume)
        if self._zfs.get(dataset, [OWNER], missing_ok=True) is not None:
            raise VolumeExists(f"volume {new_volume} already exists")
        try:
            self._zfs.clone(origin, dataset, self._layout.properties(new_volume, options))
            self._zfs.mount(dataset, self._layout.mountpoint(new_volume))
            self._zfs.set(dataset, OWNER, "snapvol")
        except BaseException:
            self._layout.remove_half_made(dataset, "half-made")
            raise
        self._index.refresh(names.stored_volume_name(new_volume))
        log.info("cloned %s@%s as %s", volume, snapshot, new_volume)
        return self.volume(new_volume)

    def rollback(self, volume: str, snapshot: str) -> None:
        """``zfs rollback -r``: snapshots newer than *snapshot* are destroyed (the caller
        agreed, see ``rollback_keeps_newer``)."""
        full = self._layout.owned_snapshot(volume, snapshot)
        free = int(self._zfs.get(self._layout.dataset(volume), ["available"])["available"])
        if free < _ROLLBACK_ROOM:
            # zfs rollback -r destroys the newer snapshots first and then fails for lack of
            # space: refuse before anything is lost
            raise BackendError(f"cannot roll {volume} back to {snapshot}: the pool is full "
                               f"({free} bytes available); free some space first",
                               errno=errno.ENOSPC)
        try:
            self._zfs.rollback(full)
        except CommandFailed as exc:
            if "clones of previous snapshots exist" not in exc.stderr:
                raise
            prefix = self.root + "/"
            clones = [line.strip().removeprefix(prefix) for line in exc.stderr.splitlines()
                      if line.strip().startswith(prefix)]
            raise Conflict(f"cannot roll {volume} back to {snapshot}: volume(s) "
                           f"{', '.join(clones) or '?'} were cloned from a newer snapshot of it; "
                           "remove them first (ZFS keeps a clone's origin)") from None
        log.info("rolled volume %s back to snapshot %s", volume, snapshot)

    def hold(self, volume: str, snapshot: str) -> None:
        """A user hold (OpenZFS, libzfs_core) so nothing destroys a replication base by
        accident; without libzfs_core (zfs-fuse, whose holds are broken) snapvol's own record
        is the only protection."""
        if self._zfs.holds:
            self._zfs.hold(self._layout.owned_snapshot(volume, snapshot),
                           f"cannot hold {volume}@{snapshot}")

    def release(self, volume: str, snapshot: str) -> None:
        if not self._zfs.holds:
            return
        try:
            self._zfs.release([self._layout.owned_snapshot(volume, snapshot)])
        except SnapshotNotFound:
            pass

    # ------------------------------------------------------------------ send / receive

    def resume_token(self, volume: str) -> str | None:
        return self._receiver.resume_token(volume)

    def send_argv(self, volume: str, snapshot: str, base: str | None, *,
                  resume_token: str | None = None) -> list[str]:
        full = self._layout.owned_snapshot(volume, snapshot)
        if resume_token is None and base is not None:
            self._layout.owned_snapshot(volume, base)
        return self._zfs.send_argv(full, base, resume_token=resume_token)

    def receiving(self, volume: str, snapshot: str, base: str | None,
                  options: Mapping[str, str], *,
                  resume: bool = False) -> AbstractContextManager[BinaryIO]:
        """See :meth:`.zfs_receive.Receiver.receiving` (nothing runs before the context is
        entered). The index reads the volume again after it, whatever happened."""
        return self._received(volume, self._receiver.receiving(volume, snapshot, base, options,
                                                               resume=resume))

    @contextmanager
    def _received(self, volume: str,
                  receiving: AbstractContextManager[BinaryIO]) -> Iterator[BinaryIO]:
        try:
            with receiving as stream:
                yield stream
        finally:
            self._index.invalidate()         # inboxes came and went
            try:
                self._index.refresh(names.stored_volume_name(volume))
            except BackendError as exc:      # the listing re-syncs; keep the receive's own error
                log.warning("cannot read %s after a receive: %s", volume, exc)

    # ------------------------------------------------------------------ mounting

    def attach(self, name: str) -> Path:
        dataset = self._layout.owned(name)
        mountpoint = self._layout.mountpoint(name)
        # the index's mount table: re-read only when the kernel says mounts changed
        if self._index.mounts.sources().get(os.path.realpath(mountpoint)) != dataset:
            log.info("mounting %s at %s", dataset, mountpoint)
            self._zfs.mount(dataset, mountpoint)
        return mountpoint

    def detach(self, name: str) -> None:
        """Volumes stay mounted while they exist; nothing to undo."""
