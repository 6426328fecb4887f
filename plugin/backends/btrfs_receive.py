"""Receiving Btrfs streams into volumes: ``btrfs receive`` into an inbox in staging, then
the snapshot published and the volume made (full stream) or replaced (incremental).

The inbox is a directory of staging, invisible to Docker and emptied whatever happens (start-up
empties what a crash left, see :mod:`.btrfs_recovery`). btrfs receive cannot resume: an
interrupted transfer starts again, so there is never a resume token.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import btrfsutil

from .. import process
from ..errors import BackendError, InvalidOption, SnapshotExists, VolumeExists
from . import btrfs_recovery
from .base import SnapshotInfo
from .btrfs_layout import Layout

log = logging.getLogger(__name__)

_RECEIVE_TIMEOUT = 600.0          # to finish after the last byte of a stream


class Receiver:
    """Streams into the volumes of *layout* (the caller holds the volume lock). *replace*
    makes a volume a writable snapshot of a subvolume, its options kept (the backend's
    rollback step)."""

    def __init__(self, layout: Layout, replace: Callable[[str, Path, str], None]) -> None:
        self._layout = layout
        self._replace = replace

    def resume_token(self, volume: str) -> str | None:
        """btrfs receive cannot resume: an interrupted transfer starts again."""
        return None

    @contextmanager
    def receiving(self, volume: str, snapshot: str, base: str | None,
                  options: Mapping[str, str], *, resume: bool = False) -> Iterator[BinaryIO]:
        """``btrfs receive`` into a directory of staging (invisible to Docker); on success the
        snapshot moves to snapshots/<volume>/ and the volume becomes a writable snapshot of
        it (made, for a full stream; replaced, for an incremental one).

        An incremental stream replaces the volume *before* its snapshot is published: a kill
        in between leaves the volume new and the snapshot absent (the next replication sends
        it again), never the snapshot present over the old content, which the source would
        then take as replicated."""
        if resume:
            raise InvalidOption("btrfs streams cannot be resumed")
        target = self._layout.snapshot_path(volume, snapshot)
        if base is None and os.path.lexists(self._layout.path(volume)):
            raise VolumeExists(f"volume {volume} already exists; a full stream makes a new "
                               "volume (remove it, or send an incremental stream)")
        if base is None:
            btrfs_recovery.sweep_orphan_snapshots(self._layout, volume)
        if base is not None:
            self._layout.owned_snapshot(volume, base)
        if os.path.lexists(target):
            raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
        inbox = self._layout.temporary(f"recv.{volume}")
        inbox.mkdir(mode=0o700)
        try:
            with process.Streaming(["btrfs", "receive", str(inbox)], feed=True) as child:
                try:
                    yield child.proc.stdin   # type: ignore[misc]
                except BrokenPipeError:
                    # it stopped reading: its status and stderr say why (a command that
                    # fails its CRC32C, a stream that is not one), not the broken pipe
                    child.finish(timeout=_RECEIVE_TIMEOUT)
                    raise
                child.finish(timeout=_RECEIVE_TIMEOUT)
            received = inbox / snapshot
            if not self._layout.is_ours(received):
                raise BackendError(f"the stream did not hold snapshot {snapshot} made by snapvol")
            if base is not None:
                self._replace(volume, received, f"cannot update volume {volume} to {snapshot}")
            target.parent.mkdir(mode=0o700, exist_ok=True)
            # a read-only subvolume cannot change its parent directory: flip it for the
            # rename (the ioctl keeps its received UUID, which incremental streams rely on)
            btrfsutil.set_subvolume_read_only(received, False)
            os.rename(received, target)
            btrfsutil.set_subvolume_read_only(target, True)
        finally:
            btrfs_recovery.empty_inbox(inbox)
        if base is None:
            try:
                with self._layout.staged(f"create.{volume}", f"cannot create volume {volume}") as work:
                    btrfsutil.create_snapshot(target, work)
                    self._layout.write_owner(work, options)
                    if "size" in options:
                        self._layout.ensure_quotas()
                        self._layout.limit(work, options["size"])
                    os.rename(work, self._layout.path(volume))
            except BaseException:   # nothing half-made: the snapshot goes with the failed volume
                self._layout.delete_subvolume(target)
                raise
        log.info("received %s@%s (%s)", volume, snapshot, "incremental" if base else "full")


def snapshot_info(volume: str, snapshot: str, path: Path) -> SnapshotInfo:
    """The snapshot at *path*: its otime, UUID and (when it was received) received UUID."""
    sub = btrfsutil.subvolume_info(path)
    received = sub.received_uuid.hex().strip("0") and sub.received_uuid.hex()
    return SnapshotInfo(volume, snapshot, datetime.fromtimestamp(sub.otime, tz=timezone.utc),
                        sub.uuid.hex(), received)
