"""Volumes as Btrfs subvolumes, through ``btrfsutil`` (the ``btrfs`` CLI only for quotas).

Where volumes, snapshots and work in progress live, and the ``trusted.snapvol`` mark that
makes a subvolume snapvol's, are in :mod:`.btrfs_layout`. Creation time is the subvolume's
``otime``: the filesystem is the only source of truth.

Creation and destruction go through the staging directory so that Docker never sees a
half-made volume: a volume is built and configured there, then renamed into ``volumes/``
(atomic), and removed by renaming it out first. Leftovers of a crash are finished at start
(:mod:`.btrfs_recovery`).
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
from collections.abc import Mapping
from contextlib import AbstractContextManager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import btrfsutil

from .. import names, process
from ..errors import (BackendError, BackendUnavailable, InvalidOption, SnapshotExists, VolumeExists,
                      VolumeNotFound)
from . import btrfs_ioctl, btrfs_recovery
from .base import Capacity, Leftover, SnapshotInfo, Usage, VolumeInfo, snapshot_each
from .btrfs_layout import CLI_TIMEOUT, Layout, filesystem_id
from .btrfs_receive import Receiver, snapshot_info

log = logging.getLogger(__name__)


class BtrfsBackend:
    """Volumes as subvolumes below *root*, which must be a directory on a mounted Btrfs."""

    kind: ClassVar[str] = "btrfs"
    rollback_keeps_newer: ClassVar[bool] = True
    clones_need_origin: ClassVar[bool] = False   # a snapshot of a snapshot shares no history
    atomic_snapshots: ClassVar[bool] = False   # one ioctl per subvolume: pause writers instead
    resumable: ClassVar[bool] = False          # an interrupted btrfs receive starts again
    # every command of a btrfs stream carries a CRC32C that btrfs receive checks, and a
    # stream is received into staging, published only once the end mark checked out
    checked_streams: ClassVar[bool] = True
    compressions: frozenset[str] = frozenset({"zstd", "lzo", "zlib", "none"})

    def __init__(self, root: Path) -> None:
        self.root = root
        self._layout = Layout(root)
        self.volumes_dir = self._layout.volumes_dir
        self.snapshots_dir = self._layout.snapshots_dir
        self.staging_dir = self._layout.staging_dir
        # what listing() found last time: name -> the volume (with its subvolume ID)
        self._listed: dict[str, _Listed] = {}

    # ------------------------------------------------------------------ start-up

    def preflight(self) -> None:
        """Whether this storage can work at all: the root is a directory on Btrfs.

        :raises BackendUnavailable: the root does not exist or is not on Btrfs.
        """
        if not self.root.is_dir():
            raise BackendUnavailable(f"btrfs root {self.root} does not exist or is not a directory")
        try:
            self._layout.fsid = filesystem_id(self.root)
        except OSError as exc:
            raise BackendUnavailable(f"{self.root} is not on a Btrfs filesystem ({exc.strerror})") from None

    def check(self) -> None:
        """:meth:`preflight`, then create the layout and finish interrupted work.

        :raises BackendUnavailable: as :meth:`preflight`.
        """
        self.preflight()
        for directory in (self.volumes_dir, self.snapshots_dir, self.staging_dir):
            directory.mkdir(mode=0o711, exist_ok=True)
        self.finish_interrupted()

    def leftovers(self) -> list[Leftover]:
        """What :meth:`finish_interrupted` would do, found without changing anything."""
        return btrfs_recovery.leftovers(self._layout)

    def finish_interrupted(self) -> None:
        """Finish or remove what a crash left (:mod:`.btrfs_recovery`)."""
        btrfs_recovery.finish_interrupted(self._layout)

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "filesystem": "btrfs", "fsid": self._layout.fsid,
                "quotas": self._layout.quotas_enabled()}

    def capacity(self) -> Capacity:
        """statvfs of the root: Btrfs's estimate of what can still be written (it counts
        data and metadata chunks; good enough to see a pool filling up)."""
        try:
            fs = os.statvfs(self.root)
        except OSError as exc:
            raise self._layout.unavailable(exc) from None
        return Capacity(fs.f_blocks * fs.f_frsize, fs.f_bavail * fs.f_frsize)

    # ------------------------------------------------------------------ queries

    def volumes(self) -> list[VolumeInfo]:
        """:meth:`listing`: every caller gets the same answer from the same memo.

        Reading each subvolume again on every call (mark, JSON, otime) made each full pass
        cost about 60 us a volume: at 10,000 volumes, 0.6 s for every scheduler pass, every
        Remove (its clone relations) and four times over at start (issue 17). What the memo
        keeps cannot go stale within a mount (see :meth:`listing`)."""
        return self.listing()

    def internal_volumes(self) -> list[VolumeInfo]:
        return list(self._scan(internal=True).values())

    def listing(self) -> list[VolumeInfo]:
        """:meth:`volumes`, with each subvolume read once rather than on every call.

        The directory is read on every call, so a volume created, removed or renamed since
        the last one shows at once. What is remembered is what one subvolume under one name
        said (its mark, options, otime), keyed by name and subvolume ID, which the directory
        entry carries (its d_ino). That cannot go stale within a mount: the mark is written
        in staging only, never in volumes/, and any other volume there (created, rolled
        back, received, restored) is a new subvolume with a new ID, which Btrfs does not
        reuse while mounted. After a remount it may (seen: the highest ID, deleted and
        cleaned up, was given to the next subvolume), but the memo keeps only what the
        previous call found: a stale entry needs a volume destroyed, the filesystem
        remounted and a subvolume made under the same name, all between two calls.

        :raises BackendUnavailable: the volumes directory cannot be read.
        """
        # one dict per call, swapped in whole: concurrent calls never share one being built
        self._listed = found = self._scan(internal=False, known=self._listed)
        return list(found.values())

    def _scan(self, *, internal: bool, known: Mapping[str, _Listed] | None = None,
              ) -> dict[str, _Listed]:
        """The volumes of ours in volumes/, snapvol's own (the trash) or the others, by name;
        a subvolume already in *known* (same name, same subvolume ID) is not read again."""
        found = {}
        try:
            entries = list(os.scandir(self.volumes_dir))
        except OSError as exc:
            raise self._layout.unavailable(exc) from None
        for entry in entries:
            if names.is_internal(entry.name) != internal:
                continue
            subvolume_id = entry.inode()        # from getdents: a subvolume's ID, no stat
            info = known.get(entry.name) if known is not None else None
            if info is None or info.subvolume_id != subvolume_id:
                try:
                    info = _Listed.of(self._info(entry.name, entry.path), subvolume_id)
                except VolumeNotFound:
                    continue                    # not ours
                except OSError as exc:          # BtrfsUtilError is an OSError
                    if exc.errno not in (errno.ENOENT, errno.ENOTDIR):
                        log.warning("volume %s left out of the list: %s", entry.name, exc)
                    continue                    # removed while we were listing
            found[info.name] = info             # the memo's string, not a new one per scan
        return found

    def volume(self, name: str) -> VolumeInfo:
        try:
            return self._info(name, self._layout.path(name))
        except VolumeNotFound:
            self._layout.require_healthy()
            raise
        except OSError as exc:
            self._layout.require_healthy()
            raise BackendError(f"cannot read volume {name}: {exc}", errno=exc.errno) from None

    def usage(self, name: str) -> Usage:
        info = btrfsutil.subvolume_info(self._layout.owned_path(name))
        if not self._layout.fsid or not self._layout.quotas_enabled():
            return Usage(None, None)
        qgroup = Path("/sys/fs/btrfs", self._layout.fsid, "qgroups", f"0_{info.id}")
        try:
            used = int((qgroup / "referenced").read_text())
            limit = int((qgroup / "max_referenced").read_text())
        except (OSError, ValueError):
            return Usage(None, None)
        return Usage(used, limit or None)

    def usages(self) -> dict[str, Usage]:
        found = {}
        for info in self.volumes():         # sysfs reads: no subprocess
            try:
                found[info.name] = self.usage(info.name)
            except (VolumeNotFound, OSError):
                continue                    # removed while we looked
        return found

    def _info(self, name: str, path: Path | str) -> VolumeInfo:
        meta = self._layout.read_owner(path)
        if meta is None:
            raise VolumeNotFound(name)
        sub = btrfsutil.subvolume_info(path)
        created = datetime.fromtimestamp(sub.otime, tz=timezone.utc)
        return VolumeInfo(name=name, mountpoint=path, created=created,
                          options=dict(meta.get("options", {})))

    # ------------------------------------------------------------------ changes

    def create_volume(self, name: str, options: Mapping[str, str]) -> VolumeInfo:
        target = self._layout.path(name)
        if os.path.lexists(target):
            owner = "snapvol" if self._layout.is_ours(target) else "something else (not snapvol)"
            raise VolumeExists(f"volume {name} already exists (made by {owner})")
        btrfs_recovery.sweep_orphan_snapshots(self._layout, name)
        with self._layout.staged(f"create.{name}", f"cannot create volume {name}") as work:
            btrfsutil.create_subvolume(work)
            # Mark it ours first: if we crash below, start-up cleanup recognises and removes it.
            self._layout.write_owner(work, options)
            self._apply_options(work, options)
            os.rename(work, target)
        log.info("created volume %s (options: %s)", name, ", ".join(sorted(options)) or "none")
        return self._info(name, target)

    def destroy_volume(self, name: str) -> None:
        path = self._layout.owned_path(name)
        doomed = self._layout.temporary(f"remove.{name}")
        try:
            os.rename(path, doomed)  # gone from listings at once, even if deletion is slow
        except OSError as exc:
            raise BackendError(f"cannot remove volume {name}: {exc.strerror}", errno=exc.errno) from None
        self._layout.delete_subvolume(doomed)
        btrfs_recovery.sweep_orphan_snapshots(self._layout, name, level=logging.INFO)
        log.info("removed volume %s", name)

    def rename_volume(self, name: str, new_name: str) -> None:
        """Two renames, the snapshots' directory first: repeated after a kill between them,
        the second one finishes it (the volume never shows without its snapshots once the
        intent is finished; the caller keeps the intent and finishes it at start-up, see
        ``plugin.standby`` and ``plugin.trash``). The snapshots' directory carries a
        :data:`~.btrfs_layout.RENAMING` mark meanwhile, so that start-up's sweep of snapshots
        whose volume is gone leaves them alone."""
        old, new = self._layout.path(name), self._layout.path(new_name)
        old_snaps = names.under(self.snapshots_dir, names.stored_volume_name(name))
        new_snaps = names.under(self.snapshots_dir, names.stored_volume_name(new_name))
        if os.path.lexists(old) and os.path.lexists(new):
            raise VolumeExists(f"cannot rename volume {name} to {new_name}: it exists")
        if not os.path.lexists(old) and not os.path.lexists(new):
            raise VolumeNotFound(name)
        try:
            if os.path.lexists(old_snaps) and not os.path.lexists(new_snaps):
                self._layout.mark_renaming(old_snaps, new_name)
                os.rename(old_snaps, new_snaps)
            if os.path.lexists(old):
                os.rename(self._layout.owned_path(name), new)
            self._layout.unmark_renaming(new_snaps)
        except OSError as exc:
            raise BackendError(f"cannot rename volume {name} to {new_name}: {exc.strerror}",
                               errno=exc.errno) from None
        log.info("renamed volume %s to %s", name, new_name)

    # ------------------------------------------------------------------ snapshots

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        self._layout.owned_path(volume)
        directory = self.snapshots_dir / volume
        found = []
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            path = Path(entry.path)
            if not (entry.is_dir(follow_symlinks=False) and self._layout.is_ours(path)):
                continue
            try:
                # otime has whole seconds; the creating transaction orders within a second
                transid = btrfsutil.subvolume_info(path).otransid
                found.append((transid, self._snapshot_info(volume, entry.name, path)))
            except OSError as exc:              # BtrfsUtilError is an OSError
                if exc.errno != errno.ENOENT:
                    raise BackendError(f"cannot read snapshot {volume}@{entry.name}: {exc}", errno=exc.errno) from None
                # pruned (or sent and released) while we listed: it is simply gone
        return [info for _, info in sorted(found, key=lambda pair: (pair[1].created, pair[0]))]

    def clone_origins(self) -> dict[str, dict[str, str]]:
        return {}                               # a clone never depends on its origin

    def all_snapshots(self) -> dict[str, list[SnapshotInfo]]:
        """One listing of the volumes and one of snapshots/: only the volumes that have a
        snapshots directory are read further (at 10,000 volumes, mostly without snapshots,
        one lookup each through :meth:`snapshots` cost 1.4 s at start)."""
        owned = {info.name for info in self.listing()}
        try:
            with_snapshots = {e.name for e in os.scandir(self.snapshots_dir)
                              if e.is_dir(follow_symlinks=False)}
        except FileNotFoundError:
            with_snapshots = set()
        found: dict[str, list[SnapshotInfo]] = {name: [] for name in owned}
        for name in owned & with_snapshots:
            try:
                found[name] = self.snapshots(name)
            except VolumeNotFound:
                del found[name]                 # removed while we listed
        return found

    def create_snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        source = self._layout.owned_path(volume)
        target = self._layout.snapshot_path(volume, snapshot)
        if os.path.lexists(target):
            raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
        target.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            # not btrfsutil's: it holds the interpreter lock through the transaction commit,
            # and Docker's calls wait for every snapshot a scheduler pass takes
            btrfs_ioctl.create_snapshot(source, target, read_only=True)
        except OSError as exc:
            raise BackendError(f"cannot snapshot {volume}: {exc}", errno=exc.errno) from None
        log.info("took snapshot %s@%s", volume, snapshot)
        return self._snapshot_info(volume, snapshot, target)

    def create_snapshots(self, volumes: list[str], snapshot: str) -> list[SnapshotInfo]:
        return snapshot_each(self, volumes, snapshot)

    def hold(self, volume: str, snapshot: str) -> None:
        """Btrfs has no holds: snapvol's replication record protects the base."""
        self._layout.owned_snapshot(volume, snapshot)

    def release(self, volume: str, snapshot: str) -> None:
        """Nothing to release (see :meth:`hold`)."""

    def destroy_snapshot(self, volume: str, snapshot: str) -> None:
        self._layout.delete_subvolume(self._layout.owned_snapshot(volume, snapshot))
        log.info("removed snapshot %s@%s", volume, snapshot)

    def clone(self, volume: str, snapshot: str, new_volume: str,
              options: Mapping[str, str]) -> VolumeInfo:
        origin = self._layout.owned_snapshot(volume, snapshot)
        target = self._layout.path(new_volume)
        if os.path.lexists(target):
            raise VolumeExists(f"volume {new_volume} already exists")
        btrfs_recovery.sweep_orphan_snapshots(self._layout, new_volume)
        with self._layout.staged(f"clone.{new_volume}", f"cannot clone {volume}@{snapshot}") as work:
            btrfsutil.create_snapshot(origin, work)           # writable, O(1)
            self._layout.write_owner(work, options)
            if "size" in options:
                self._layout.ensure_quotas()
                self._layout.limit(work, options["size"])
            os.rename(work, target)
        log.info("cloned %s@%s as %s", volume, snapshot, new_volume)
        return self._info(new_volume, target)

    def rollback(self, volume: str, snapshot: str) -> None:
        """Replace the volume's subvolume by a writable snapshot of *snapshot*; other
        snapshots are untouched (Btrfs snapshots are independent subvolumes)."""
        self._replace(volume, self._layout.owned_snapshot(volume, snapshot),
                      f"cannot roll {volume} back to {snapshot}")
        log.info("rolled volume %s back to snapshot %s", volume, snapshot)

    def _replace(self, volume: str, origin: Path, failure: str) -> None:
        """Make the volume a writable snapshot of the subvolume *origin*, its options kept:
        built in staging, then swapped in by two renames (start-up puts the old one back if
        a kill comes between them)."""
        current = self._layout.owned_path(volume)
        meta = self._layout.read_owner(current) or {}
        token = secrets.token_hex(4)
        fresh = names.under(self.staging_dir, f"rollback.{volume}.{token}")
        replaced = names.under(self.staging_dir, f"replaced.{volume}.{token}")
        try:
            btrfsutil.create_snapshot(origin, fresh)
            self._layout.write_owner(fresh, meta.get("options", {}))
            size = meta.get("options", {}).get("size")
            if size:
                self._layout.limit(fresh, size)
            os.rename(current, replaced)
            os.rename(fresh, current)
        except BaseException as exc:
            if not os.path.lexists(current) and os.path.lexists(replaced):
                os.rename(replaced, current)
            self._layout.discard(fresh)
            if isinstance(exc, OSError):
                raise BackendError(f"{failure}: {exc}", errno=exc.errno) from None
            raise
        self._layout.discard(replaced)          # a leftover at worst: start-up removes it

    # ------------------------------------------------------------------ send / receive

    def resume_token(self, volume: str) -> str | None:
        """btrfs receive cannot resume: an interrupted transfer starts again."""
        return Receiver(self._layout, self._replace).resume_token(volume)

    def send_argv(self, volume: str, snapshot: str, base: str | None, *,
                  resume_token: str | None = None) -> list[str]:
        if resume_token is not None:
            raise InvalidOption("btrfs streams cannot be resumed")
        argv = ["btrfs", "send", "-q"]
        if base is not None:
            argv += ["-p", str(self._layout.owned_snapshot(volume, base))]
        return [*argv, str(self._layout.owned_snapshot(volume, snapshot))]

    def receiving(self, volume: str, snapshot: str, base: str | None,
                  options: Mapping[str, str], *,
                  resume: bool = False) -> AbstractContextManager[BinaryIO]:
        """See :meth:`.btrfs_receive.Receiver.receiving` (nothing runs before the context is
        entered)."""
        return Receiver(self._layout, self._replace).receiving(volume, snapshot, base, options,
                                                               resume=resume)

    _snapshot_info = staticmethod(snapshot_info)

    def attach(self, name: str) -> Path:
        path = self._layout.owned_path(name)
        if not btrfsutil.is_subvolume(path):
            raise BackendError(f"volume {name}: {path} is no longer a subvolume")
        return path

    def detach(self, name: str) -> None:
        """Nothing to undo: a subvolume needs no mount of its own on the host."""

    # ------------------------------------------------------------------ helpers

    def _apply_options(self, path: Path, options: Mapping[str, str]) -> None:
        """Apply validated options to a fresh, empty subvolume."""
        if options.get("nocow") == "true":
            # Only affects files created afterwards, hence on the empty root (chattr(1)).
            process.run(["chattr", "+C", "--", path], timeout=CLI_TIMEOUT)
        if "compression" in options:
            value = options["compression"]
            # The "compression" property is this xattr; "none" disables compression (5.14+).
            os.setxattr(path, "btrfs.compression", value.encode(), follow_symlinks=False)
        mode = int(options.get("mode", "755"), 8)
        os.chmod(path, mode)
        if "uid" in options or "gid" in options:
            os.chown(path, int(options.get("uid", -1)), int(options.get("gid", -1)),
                     follow_symlinks=False)
        if "size" in options:
            self._layout.ensure_quotas()
            self._layout.limit(path, options["size"])


class _Listed(VolumeInfo):
    """A volume as :meth:`BtrfsBackend.listing` remembers it: with the ID of the subvolume it
    was read from (the memo's check), in a slot rather than in a key tuple (10,000 of them)."""

    __slots__ = ("subvolume_id",)
    subvolume_id: int

    @classmethod
    def of(cls, info: VolumeInfo, subvolume_id: int) -> _Listed:
        listed = cls(info.name, info.path, info.created, info.options)
        object.__setattr__(listed, "subvolume_id", subvolume_id)
        return listed
