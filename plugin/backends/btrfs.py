"""Volumes as Btrfs subvolumes, through ``btrfsutil`` (the ``btrfs`` CLI only for quotas).

Layout under the root directory (a directory on a mounted Btrfs)::

    <root>/volumes/<name>        one subvolume per volume; this is what containers see
    <root>/snapshots/<name>/<s>  read-only snapshots of volume <name>
    <root>/.snapvol-staging/     volumes being created, destroyed or rolled back (never listed)

A subvolume belongs to snapvol when its root directory carries the ``trusted.snapvol``
extended attribute (JSON: format and options). The attribute lives *in* the subvolume, so it
can never drift from it, it travels with snapshots and ``btrfs send``, and the ``trusted.``
namespace needs CAP_SYS_ADMIN, so an ordinary container cannot forge or strip it. Subvolumes
without it are never listed, mounted, changed or destroyed. Creation time is the subvolume's
``otime``: the filesystem is the only source of truth.

Creation and destruction go through the staging directory so that Docker never sees a
half-made volume: a volume is built and configured there, then renamed into ``volumes/``
(atomic), and removed by renaming it out first. Leftovers of a crash are finished at start.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

import btrfsutil

from .. import names, process
from ..errors import (BackendError, BackendUnavailable, InvalidName, InvalidOption,
                      SnapshotExists, SnapshotNotFound, VolumeExists, VolumeNotFound)
from ..units import parse_size
from .base import Leftover, SnapshotInfo, Usage, VolumeInfo, snapshot_each

log = logging.getLogger(__name__)

OWNER_XATTR = "trusted.snapvol"
FORMAT = 1
VOLUMES = "volumes"
SNAPSHOTS = "snapshots"
STAGING = ".snapvol-staging"
_BTRFS_IOC_FS_INFO = 0x8400941F       # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args[1024])
_CLI_TIMEOUT = 60.0
_RECEIVE_TIMEOUT = 600.0          # to finish after the last byte of a stream


def _filesystem_id(path: Path) -> str:
    """The Btrfs filesystem UUID of *path* (the name of its directory in /sys/fs/btrfs).

    :raises OSError: *path* is missing (ENOENT) or not on Btrfs (ENOTTY).
    """
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        buf = bytearray(1024)
        fcntl.ioctl(fd, _BTRFS_IOC_FS_INFO, buf)
    finally:
        os.close(fd)
    return str(uuid.UUID(bytes=bytes(buf[16:32])))


class BtrfsBackend:
    """Volumes as subvolumes below *root*, which must be a directory on a mounted Btrfs."""

    kind: ClassVar[str] = "btrfs"
    rollback_keeps_newer: ClassVar[bool] = True
    clones_need_origin: ClassVar[bool] = False   # a snapshot of a snapshot shares no history
    atomic_snapshots: ClassVar[bool] = False   # one ioctl per subvolume: pause writers instead
    resumable: ClassVar[bool] = False          # an interrupted btrfs receive starts again
    compressions: frozenset[str] = frozenset({"zstd", "lzo", "zlib", "none"})

    def __init__(self, root: Path) -> None:
        self.root = root
        self.volumes_dir = root / VOLUMES
        self.snapshots_dir = root / SNAPSHOTS
        self.staging_dir = root / STAGING
        self._fsid: str | None = None

    # ------------------------------------------------------------------ start-up

    def preflight(self) -> None:
        """Whether this storage can work at all: the root is a directory on Btrfs.

        :raises BackendUnavailable: the root does not exist or is not on Btrfs.
        """
        if not self.root.is_dir():
            raise BackendUnavailable(f"btrfs root {self.root} does not exist or is not a directory")
        try:
            self._fsid = _filesystem_id(self.root)
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
        found = []
        for entry in os.scandir(self.staging_dir):
            path = Path(entry.path)
            # staging names are <operation>.<volume>.<random hex>
            volume = entry.name.partition(".")[2].rpartition(".")[0]
            if entry.name.startswith("recv.") and entry.is_dir(follow_symlinks=False):
                found.append(Leftover(volume, f"{path}: an interrupted receive", "remove it"))
            elif not entry.is_dir(follow_symlinks=False) or not self._is_ours(path):
                continue                            # not ours: never touched, not reported
            elif entry.name.startswith("replaced.") and not os.path.lexists(self.volumes_dir / volume):
                found.append(Leftover(volume, f"{path}: a volume an interrupted rollback took "
                                      "out", "put it back"))
            else:
                found.append(Leftover(volume, f"{path}: left by an interrupted operation",
                                      "remove it"))
        for entry in os.scandir(self.snapshots_dir):
            if entry.is_dir(follow_symlinks=False) and not os.path.lexists(self.volumes_dir / entry.name):
                mine = [e.name for e in os.scandir(entry.path) if self._is_ours(Path(e.path))]
                if mine:
                    found.append(Leftover(entry.name, f"{entry.path}: snapshot(s) "
                                          f"{', '.join(sorted(mine))} of a volume that no longer "
                                          "exists", "delete them"))
        return found

    def finish_interrupted(self) -> None:
        """Destroy what a crash left in staging: half-made or half-destroyed volumes of ours."""
        for entry in os.scandir(self.staging_dir):
            path = Path(entry.path)
            if entry.name.startswith("recv.") and entry.is_dir(follow_symlinks=False):
                log.info("removing the interrupted receive %s", path)
                self._empty_inbox(path)
                continue
            if not entry.is_dir(follow_symlinks=False) or not self._is_ours(path):
                log.warning("leaving unknown entry %s in staging alone", path)
                continue
            if path.name.startswith("replaced."):
                # a rollback stopped between its two renames: put the volume back
                name = path.name.removeprefix("replaced.").rsplit(".", 1)[0]
                if not os.path.lexists(self.volumes_dir / name):
                    log.warning("restoring volume %s from an interrupted rollback", name)
                    os.rename(path, self.volumes_dir / name)
                    continue
            log.info("removing %s left by an interrupted operation", path)
            try:
                self._delete_subvolume(path)
            except BackendError as exc:   # never invisible to Docker; retried at next start
                log.error("could not remove %s: %s", path, exc)
        # after the rollbacks above were put back: snapshots whose volume is gone are orphans
        for entry in os.scandir(self.snapshots_dir):
            if entry.is_dir(follow_symlinks=False) and not os.path.lexists(self.volumes_dir / entry.name):
                try:
                    self._sweep_orphan_snapshots(entry.name)
                except (BackendError, InvalidName) as exc:
                    log.error("could not remove the orphan snapshots in %s: %s", entry.path, exc)

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "filesystem": "btrfs", "fsid": self._fsid,
                "quotas": self._quotas_enabled()}

    # ------------------------------------------------------------------ queries

    def volumes(self) -> list[VolumeInfo]:
        found = []
        try:
            entries = list(os.scandir(self.volumes_dir))
        except OSError as exc:
            raise self._unavailable(exc) from None
        for entry in entries:
            try:
                found.append(self._info(entry.name, Path(entry.path)))
            except (VolumeNotFound, OSError):  # BtrfsUtilError is an OSError
                continue  # not ours, or removed while we were listing
        return found

    def volume(self, name: str) -> VolumeInfo:
        try:
            return self._info(name, self._path(name))
        except VolumeNotFound:
            self._require_healthy()
            raise
        except OSError as exc:
            self._require_healthy()
            raise BackendError(f"cannot read volume {name}: {exc}", errno=exc.errno) from None

    def usage(self, name: str) -> Usage:
        info = btrfsutil.subvolume_info(self._owned_path(name))
        if not self._fsid or not self._quotas_enabled():
            return Usage(None, None)
        qgroup = Path("/sys/fs/btrfs", self._fsid, "qgroups", f"0_{info.id}")
        try:
            used = int((qgroup / "referenced").read_text())
            limit = int((qgroup / "max_referenced").read_text())
        except (OSError, ValueError):
            return Usage(None, None)
        return Usage(used, limit or None)

    def _info(self, name: str, path: Path) -> VolumeInfo:
        meta = self._read_owner(path)
        if meta is None:
            raise VolumeNotFound(name)
        sub = btrfsutil.subvolume_info(path)
        created = datetime.fromtimestamp(sub.otime, tz=timezone.utc)
        return VolumeInfo(name=name, mountpoint=path, created=created,
                          options=dict(meta.get("options", {})))

    # ------------------------------------------------------------------ changes

    def create_volume(self, name: str, options: Mapping[str, str]) -> VolumeInfo:
        target = self._path(name)
        if os.path.lexists(target):
            owner = "snapvol" if self._is_ours(target) else "something else (not snapvol)"
            raise VolumeExists(f"volume {name} already exists (made by {owner})")
        self._sweep_orphan_snapshots(name)
        with self._staged(f"create.{name}", f"cannot create volume {name}") as work:
            btrfsutil.create_subvolume(work)
            # Mark it ours first: if we crash below, start-up cleanup recognises and removes it.
            self._write_owner(work, options)
            self._apply_options(work, options)
            os.rename(work, target)
        log.info("created volume %s (options: %s)", name, ", ".join(sorted(options)) or "none")
        return self._info(name, target)

    def destroy_volume(self, name: str) -> None:
        path = self._owned_path(name)
        doomed = names.under(self.staging_dir, f"remove.{name}.{secrets.token_hex(4)}")
        try:
            os.rename(path, doomed)  # gone from listings at once, even if deletion is slow
        except OSError as exc:
            raise BackendError(f"cannot remove volume {name}: {exc.strerror}", errno=exc.errno) from None
        self._delete_subvolume(doomed)
        self._sweep_orphan_snapshots(name)
        log.info("removed volume %s", name)

    def _sweep_orphan_snapshots(self, name: str) -> None:
        """Delete the snapshots left in snapshots/<name>/ by a volume that no longer exists
        (a Remove or a full receive interrupted by a crash), so a new volume of that name
        never inherits them. Caller: the volume does not exist, and nothing is creating it.
        Idempotent: a crash midway leaves the rest for the next call."""
        directory = self.snapshots_dir / names.volume_name(name)
        if not directory.is_dir() or os.path.lexists(self._path(name)):
            return
        for entry in os.scandir(directory):
            path = Path(entry.path)
            if self._is_ours(path):
                log.warning("deleting snapshot %s@%s of a volume that no longer exists", name,
                            entry.name)
                self._delete_subvolume(path)
        try:
            directory.rmdir()
        except OSError:
            log.warning("left %s: it holds something snapvol did not make", directory)

    # ------------------------------------------------------------------ snapshots

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        self._owned_path(volume)
        directory = self.snapshots_dir / volume
        found = []
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            entries = []
        for entry in entries:
            path = Path(entry.path)
            if not (entry.is_dir(follow_symlinks=False) and self._is_ours(path)):
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

    def create_snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        source = self._owned_path(volume)
        target = self._snapshot_path(volume, snapshot)
        if os.path.lexists(target):
            raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
        target.parent.mkdir(mode=0o700, exist_ok=True)
        try:
            btrfsutil.create_snapshot(source, target, read_only=True)
        except OSError as exc:
            raise BackendError(f"cannot snapshot {volume}: {exc}", errno=exc.errno) from None
        log.info("took snapshot %s@%s", volume, snapshot)
        return self._snapshot_info(volume, snapshot, target)

    def create_snapshots(self, volumes: list[str], snapshot: str) -> list[SnapshotInfo]:
        return snapshot_each(self, volumes, snapshot)

    def hold(self, volume: str, snapshot: str) -> None:
        """Btrfs has no holds: snapvol's replication record protects the base."""
        self._owned_snapshot(volume, snapshot)

    def release(self, volume: str, snapshot: str) -> None:
        """Nothing to release (see :meth:`hold`)."""

    def destroy_snapshot(self, volume: str, snapshot: str) -> None:
        self._delete_subvolume(self._owned_snapshot(volume, snapshot))
        log.info("removed snapshot %s@%s", volume, snapshot)

    def clone(self, volume: str, snapshot: str, new_volume: str,
              options: Mapping[str, str]) -> VolumeInfo:
        origin = self._owned_snapshot(volume, snapshot)
        target = self._path(new_volume)
        if os.path.lexists(target):
            raise VolumeExists(f"volume {new_volume} already exists")
        self._sweep_orphan_snapshots(new_volume)
        with self._staged(f"clone.{new_volume}", f"cannot clone {volume}@{snapshot}") as work:
            btrfsutil.create_snapshot(origin, work)           # writable, O(1)
            self._write_owner(work, options)
            if "size" in options:
                self._ensure_quotas()
                process.run(["btrfs", "qgroup", "limit", str(parse_size(options["size"])), work],
                            timeout=_CLI_TIMEOUT)
            os.rename(work, target)
        log.info("cloned %s@%s as %s", volume, snapshot, new_volume)
        return self._info(new_volume, target)

    def rollback(self, volume: str, snapshot: str) -> None:
        """Replace the volume's subvolume by a writable snapshot of *snapshot*; other
        snapshots are untouched (Btrfs snapshots are independent subvolumes)."""
        current = self._owned_path(volume)
        origin = self._owned_snapshot(volume, snapshot)
        meta = self._read_owner(current) or {}
        token = secrets.token_hex(4)
        fresh = names.under(self.staging_dir, f"rollback.{volume}.{token}")
        replaced = names.under(self.staging_dir, f"replaced.{volume}.{token}")
        try:
            btrfsutil.create_snapshot(origin, fresh)
            self._write_owner(fresh, meta.get("options", {}))
            size = meta.get("options", {}).get("size")
            if size:
                process.run(["btrfs", "qgroup", "limit", str(parse_size(size)), fresh],
                            timeout=_CLI_TIMEOUT)
            os.rename(current, replaced)
            os.rename(fresh, current)
        except BaseException as exc:
            if not os.path.lexists(current) and os.path.lexists(replaced):
                os.rename(replaced, current)
            if self._is_ours(fresh):
                self._delete_subvolume(fresh)
            if isinstance(exc, OSError):
                raise BackendError(f"cannot roll {volume} back to {snapshot}: {exc}", errno=exc.errno) from None
            raise
        self._delete_subvolume(replaced)
        log.info("rolled volume %s back to snapshot %s", volume, snapshot)

    # ------------------------------------------------------------------ send / receive

    def resume_token(self, volume: str) -> str | None:
        """btrfs receive cannot resume: an interrupted transfer starts again."""
        return None

    def send_argv(self, volume: str, snapshot: str, base: str | None, *,
                  resume_token: str | None = None) -> list[str]:
        if resume_token is not None:
            raise InvalidOption("btrfs streams cannot be resumed")
        argv = ["btrfs", "send", "-q"]
        if base is not None:
            argv += ["-p", str(self._owned_snapshot(volume, base))]
        return [*argv, str(self._owned_snapshot(volume, snapshot))]

    @contextmanager
    def receiving(self, volume: str, snapshot: str, base: str | None,
                  options: Mapping[str, str], *, resume: bool = False) -> Iterator[BinaryIO]:
        """``btrfs receive`` into a directory of staging (invisible to Docker); on success the
        snapshot moves to snapshots/<volume>/ and the volume becomes a writable snapshot of
        it (made, for a full stream; replaced, for an incremental one)."""
        if resume:
            raise InvalidOption("btrfs streams cannot be resumed")
        target = self._snapshot_path(volume, snapshot)
        if base is None and os.path.lexists(self._path(volume)):
            raise VolumeExists(f"volume {volume} already exists; a full stream makes a new "
                               "volume (remove it, or send an incremental stream)")
        if base is None:
            self._sweep_orphan_snapshots(volume)
        if base is not None:
            self._owned_snapshot(volume, base)
        if os.path.lexists(target):
            raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
        inbox = names.under(self.staging_dir, f"recv.{volume}.{secrets.token_hex(4)}")
        inbox.mkdir(mode=0o700)
        try:
            with process.Streaming(["btrfs", "receive", str(inbox)], feed=True) as child:
                yield child.proc.stdin   # type: ignore[misc]
                child.finish(timeout=_RECEIVE_TIMEOUT)
            received = inbox / snapshot
            if not self._is_ours(received):
                raise BackendError(f"the stream did not hold snapshot {snapshot} made by snapvol")
            target.parent.mkdir(mode=0o700, exist_ok=True)
            # a read-only subvolume cannot change its parent directory: flip it for the
            # rename (the ioctl keeps its received UUID, which incremental streams rely on)
            btrfsutil.set_subvolume_read_only(received, False)
            os.rename(received, target)
            btrfsutil.set_subvolume_read_only(target, True)
        finally:
            self._empty_inbox(inbox)
        try:
            if base is None:
                with self._staged(f"create.{volume}", f"cannot create volume {volume}") as work:
                    btrfsutil.create_snapshot(target, work)
                    self._write_owner(work, options)
                    if "size" in options:
                        self._ensure_quotas()
                        process.run(["btrfs", "qgroup", "limit", str(parse_size(options["size"])),
                                     work], timeout=_CLI_TIMEOUT)
                    os.rename(work, self._path(volume))
            else:
                self.rollback(volume, snapshot)
        except BaseException:
            if base is None:   # nothing half-made: the snapshot goes with the failed volume
                self._delete_subvolume(target)
            raise
        log.info("received %s@%s (%s)", volume, snapshot, "incremental" if base else "full")

    def _empty_inbox(self, inbox: Path) -> None:
        for entry in os.scandir(inbox) if inbox.is_dir() else ():
            try:
                if btrfsutil.is_subvolume(entry.path):
                    btrfsutil.set_subvolume_read_only(entry.path, False)
                    btrfsutil.delete_subvolume(entry.path)
                else:
                    log.warning("leaving %s in %s", entry.name, inbox)
            except OSError as exc:
                log.error("cannot remove %s: %s", entry.path, exc)
        try:
            inbox.rmdir()
        except OSError:
            pass

    @contextmanager
    def _staged(self, label: str, failure: str) -> Iterator[Path]:
        """A fresh path in staging for building a subvolume; if the block fails, whatever
        was built there is deleted and an OSError becomes a BackendError saying *failure*."""
        work = names.under(self.staging_dir, f"{label}.{secrets.token_hex(4)}")
        try:
            yield work
        except BaseException as exc:
            if self._is_ours(work):
                self._delete_subvolume(work)
            if isinstance(exc, OSError):
                raise BackendError(f"{failure}: {exc}", errno=exc.errno) from None
            raise

    def _snapshot_path(self, volume: str, snapshot: str) -> Path:
        return names.under(self.snapshots_dir, names.volume_name(volume),
                           names.snapshot_name(snapshot))

    def _owned_snapshot(self, volume: str, snapshot: str) -> Path:
        self._owned_path(volume)
        path = self._snapshot_path(volume, snapshot)
        if not self._is_ours(path):
            raise SnapshotNotFound(volume, snapshot)
        return path

    @staticmethod
    def _snapshot_info(volume: str, snapshot: str, path: Path) -> SnapshotInfo:
        sub = btrfsutil.subvolume_info(path)
        received = sub.received_uuid.hex().strip("0") and sub.received_uuid.hex()
        return SnapshotInfo(volume, snapshot, datetime.fromtimestamp(sub.otime, tz=timezone.utc),
                            sub.uuid.hex(), received)

    def attach(self, name: str) -> Path:
        path = self._owned_path(name)
        if not btrfsutil.is_subvolume(path):
            raise BackendError(f"volume {name}: {path} is no longer a subvolume")
        return path

    def detach(self, name: str) -> None:
        """Nothing to undo: a subvolume needs no mount of its own on the host."""

    # ------------------------------------------------------------------ helpers

    def _path(self, name: str) -> Path:
        return names.under(self.volumes_dir, names.volume_name(name))

    def _owned_path(self, name: str) -> Path:
        path = self._path(name)
        if not self._is_ours(path):
            self._require_healthy()
            raise VolumeNotFound(name)
        return path

    def _read_owner(self, path: Path) -> dict[str, Any] | None:
        try:
            raw = os.getxattr(path, OWNER_XATTR, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENODATA, errno.ENOENT, errno.ENOTDIR, errno.EOPNOTSUPP):
                return None
            raise
        try:
            meta = json.loads(raw)
        except ValueError:
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT else None

    def _is_ours(self, path: Path) -> bool:
        try:
            return self._read_owner(path) is not None
        except OSError:
            return False

    def _write_owner(self, path: Path, options: Mapping[str, str]) -> None:
        meta = {"format": FORMAT, "options": dict(sorted(options.items()))}
        os.setxattr(path, OWNER_XATTR, json.dumps(meta).encode(), follow_symlinks=False)

    def _apply_options(self, path: Path, options: Mapping[str, str]) -> None:
        """Apply validated options to a fresh, empty subvolume."""
        if options.get("nocow") == "true":
            # Only affects files created afterwards, hence on the empty root (chattr(1)).
            process.run(["chattr", "+C", "--", path], timeout=_CLI_TIMEOUT)
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
            self._ensure_quotas()
            process.run(["btrfs", "qgroup", "limit", str(parse_size(options["size"])), path],
                        timeout=_CLI_TIMEOUT)

    def _quotas_enabled(self) -> bool:
        return bool(self._fsid) and Path("/sys/fs/btrfs", self._fsid, "qgroups").is_dir()

    def _ensure_quotas(self) -> None:
        """Enable qgroups on the filesystem the first time a volume asks for a size limit."""
        if self._quotas_enabled():
            return
        log.info("enabling btrfs quotas on %s (first volume with a size limit)", self.root)
        process.run(["btrfs", "quota", "enable", self.root], timeout=_CLI_TIMEOUT)
        if not self._quotas_enabled():
            raise InvalidOption("size: btrfs quotas could not be enabled on "
                                f"{self.root}; this kernel may not support qgroups")

    def _delete_subvolume(self, path: Path) -> None:
        try:
            btrfsutil.delete_subvolume(path, recursive=True)
        except btrfsutil.BtrfsUtilError as exc:
            raise BackendError(f"cannot delete subvolume {path}: {exc}", errno=exc.errno) from None

    def _require_healthy(self) -> None:
        """Tell "no such volume" apart from "the storage is gone" (Docker purges on the former)."""
        try:
            if _filesystem_id(self.volumes_dir) != self._fsid:
                raise OSError(errno.ENODEV, "another filesystem is mounted there now")
        except OSError as exc:
            raise self._unavailable(exc) from None

    def _unavailable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"btrfs root {self.root} is not usable: {exc}")
