"""Where snapvol's volumes live on a Btrfs filesystem, and how they are marked as its own.

Layout under the root directory (a directory on a mounted Btrfs)::

    <root>/volumes/<name>        one subvolume per volume; this is what containers see
    <root>/snapshots/<name>/<s>  read-only snapshots of volume <name>
    <root>/.snapvol-staging/     volumes being created, destroyed or rolled back (never listed)

A subvolume belongs to snapvol when its root directory carries the ``trusted.snapvol``
extended attribute (JSON: format and options). The attribute lives *in* the subvolume, so it
can never drift from it, it travels with snapshots and ``btrfs send``, and the ``trusted.``
namespace needs CAP_SYS_ADMIN, so an ordinary container cannot forge or strip it. Subvolumes
without it are never listed, mounted, changed or destroyed.

Staging names are ``<operation>.<volume>.<random hex>``: the operation says what a crash left
(:mod:`.btrfs_recovery`), the volume whose it is.
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
from pathlib import Path
from typing import Any

import btrfsutil

from .. import names, process
from ..errors import BackendError, BackendUnavailable, InvalidOption, SnapshotNotFound, VolumeNotFound
from ..units import parse_size

log = logging.getLogger(__name__)

OWNER_XATTR = "trusted.snapvol"
FORMAT = 1
VOLUMES = "volumes"
SNAPSHOTS = "snapshots"
STAGING = ".snapvol-staging"
# In snapshots/<name>/ while the volume is being renamed (Backend.rename_volume): its
# snapshots have gone ahead of the volume, they are not orphans.
RENAMING = ".snapvol-renaming"
_BTRFS_IOC_FS_INFO = 0x8400941F       # _IOR(0x94, 31, struct btrfs_ioctl_fs_info_args[1024])
CLI_TIMEOUT = 60.0


def filesystem_id(path: Path) -> str:
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


class Layout:
    """The volumes, snapshots and staging area below *root*."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.volumes_dir = root / VOLUMES
        self.snapshots_dir = root / SNAPSHOTS
        self.staging_dir = root / STAGING
        self.fsid: str | None = None          # set once the root is known to be on Btrfs

    # ------------------------------------------------------------------ paths

    def path(self, name: str) -> Path:
        return names.under(self.volumes_dir, names.stored_volume_name(name))

    def snapshot_path(self, volume: str, snapshot: str) -> Path:
        return names.under(self.snapshots_dir, names.stored_volume_name(volume),
                           names.snapshot_name(snapshot))

    def temporary(self, label: str) -> Path:
        """A fresh path in staging for *label* (``<operation>.<volume>``)."""
        return names.under(self.staging_dir, f"{label}.{secrets.token_hex(4)}")

    def owned_path(self, name: str) -> Path:
        """:raises VolumeNotFound: no volume *name* of snapvol's (or BackendUnavailable)."""
        path = self.path(name)
        if not self.is_ours(path):
            self.require_healthy()
            raise VolumeNotFound(name)
        return path

    def owned_snapshot(self, volume: str, snapshot: str) -> Path:
        """:raises SnapshotNotFound: the volume has no such snapshot of snapvol's."""
        self.owned_path(volume)
        path = self.snapshot_path(volume, snapshot)
        if not self.is_ours(path):
            raise SnapshotNotFound(volume, snapshot)
        return path

    # ------------------------------------------------------------------ renames

    def mark_renaming(self, snapshots: Path, new_name: str) -> None:
        """Mark the snapshots' directory *snapshots* as moving to volume *new_name*
        (durably: the mark must be there before the directory moves)."""
        mark = snapshots / RENAMING
        with mark.open("w") as f:
            f.write(new_name + "\n")
            f.flush()
            os.fsync(f.fileno())

    def unmark_renaming(self, snapshots: Path) -> None:
        try:
            (snapshots / RENAMING).unlink()
        except FileNotFoundError:
            pass

    @staticmethod
    def renaming(snapshots: Path) -> bool:
        """Whether *snapshots* (a snapshots/<name>/ directory) belongs to a rename in
        progress, whose owner finishes it."""
        return os.path.lexists(snapshots / RENAMING)

    # ------------------------------------------------------------------ the owner mark

    def read_owner(self, path: Path) -> dict[str, Any] | None:
        """The mark of *path* (format and options), or ``None`` if it is not snapvol's."""
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

    def is_ours(self, path: Path) -> bool:
        """Whether *path* carries snapvol's mark.

        :raises BackendError: the mark cannot be read (EIO, EACCES, ...): that is never
            taken for "not ours", which would make Docker forget a volume that exists.
        """
        try:
            return self.read_owner(path) is not None
        except OSError as exc:
            raise BackendError(f"cannot read the owner mark of {path}: {exc.strerror or exc}",
                               errno=exc.errno) from None

    def write_owner(self, path: Path, options: Mapping[str, str]) -> None:
        meta = {"format": FORMAT, "options": dict(sorted(options.items()))}
        os.setxattr(path, OWNER_XATTR, json.dumps(meta).encode(), follow_symlinks=False)

    # ------------------------------------------------------------------ changes

    @contextmanager
    def staged(self, label: str, failure: str) -> Iterator[Path]:
        """A fresh path in staging for building a subvolume; if the block fails, whatever
        was built there is deleted and an OSError becomes a BackendError saying *failure*."""
        work = self.temporary(label)
        try:
            yield work
        except BaseException as exc:
            self.discard(work)
            if isinstance(exc, OSError):
                raise BackendError(f"{failure}: {exc}", errno=exc.errno) from None
            raise

    def discard(self, path: Path) -> None:
        """Delete what a failed operation built at *path*, a fresh name in staging (so
        whatever is there is its own, marked yet or not), without hiding the failure being
        handled: a cleanup that fails too is logged, and what it leaves is a leftover the
        next start removes (and ``snapvol check`` reports)."""
        try:
            if os.path.lexists(path) and btrfsutil.is_subvolume(path):
                self.delete_subvolume(path)
        except (OSError, BackendError) as exc:
            log.error("cannot remove %s after a failure (the next start will): %s", path, exc)

    def delete_subvolume(self, path: Path) -> None:
        try:
            btrfsutil.delete_subvolume(path, recursive=True)
        except btrfsutil.BtrfsUtilError as exc:
            raise BackendError(f"cannot delete subvolume {path}: {exc}", errno=exc.errno) from None

    def limit(self, path: Path, size: str) -> None:
        """A qgroup limit of *size* on the subvolume *path* (quotas are enabled)."""
        process.run(["btrfs", "qgroup", "limit", str(parse_size(size)), path], timeout=CLI_TIMEOUT)

    def quotas_enabled(self) -> bool:
        return bool(self.fsid) and Path("/sys/fs/btrfs", self.fsid, "qgroups").is_dir()

    def ensure_quotas(self) -> None:
        """Enable qgroups on the filesystem the first time a volume asks for a size limit."""
        if self.quotas_enabled():
            return
        log.info("enabling btrfs quotas on %s (first volume with a size limit)", self.root)
        process.run(["btrfs", "quota", "enable", self.root], timeout=CLI_TIMEOUT)
        if not self.quotas_enabled():
            raise InvalidOption("size: btrfs quotas could not be enabled on "
                                f"{self.root}; this kernel may not support qgroups")

    # ------------------------------------------------------------------ health

    def require_healthy(self) -> None:
        """Tell "no such volume" apart from "the storage is gone" (Docker purges on the former)."""
        try:
            if filesystem_id(self.volumes_dir) != self.fsid:
                raise OSError(errno.ENODEV, "another filesystem is mounted there now")
        except OSError as exc:
            raise self.unavailable(exc) from None

    def unavailable(self, exc: Exception) -> BackendUnavailable:
        return BackendUnavailable(f"btrfs root {self.root} is not usable: {exc}")
