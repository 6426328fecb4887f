"""Where snapvol's volumes live in a ZFS pool, how they are marked, and how they read back.

One dataset per volume, ``<root>/<name>``, with ``canmount=noauto`` and an explicit
``mountpoint`` below the plugin's mount directory. Ownership and options are user properties:

    snapvol:owner    "snapvol" for a finished volume; "creating"/"removing" while in flux
    snapvol:options  the volume's options as JSON

A dataset without ``snapvol:owner=snapvol`` is not a volume: :meth:`Layout.owned` refuses it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path

from .. import names
from ..errors import BackendError, BackendUnavailable, CommandFailed, SnapshotNotFound, VolumeNotFound
from ..mountinfo import mounted_filesystem
from ..units import parse_size
from .base import SnapshotInfo, VolumeInfo
from .zfs_commands import ZfsCommands

log = logging.getLogger(__name__)

OWNER = "snapvol:owner"
OPTIONS = "snapvol:options"


class Layout:
    """The volumes below the parent dataset *root*, mounted below *mount_base*."""

    def __init__(self, zfs: ZfsCommands, root: str, mount_base: Path) -> None:
        self._zfs = zfs
        self.root = root
        self.mount_base = mount_base

    def dataset(self, name: str) -> str:
        return f"{self.root}/{names.stored_volume_name(name)}"

    def mountpoint(self, name: str) -> Path:
        return names.under(self.mount_base, names.stored_volume_name(name))

    def owned(self, name: str) -> str:
        """The dataset of volume *name*.

        :raises VolumeNotFound: no such dataset, or not a finished volume of snapvol's.
        :raises BackendUnavailable: the parent dataset is gone or unusable.
        """
        dataset = self.dataset(name)
        props = self._zfs.get(dataset, [OWNER], missing_ok=True)
        if props is None or props.get(OWNER) != "snapvol":
            self.require_healthy()
            raise VolumeNotFound(name)
        return dataset

    def owned_snapshot(self, volume: str, snapshot: str) -> str:
        """``dataset@snapshot`` of a snapshot of volume *volume*.

        :raises VolumeNotFound: as :meth:`owned`.
        :raises SnapshotNotFound: the volume has no such snapshot.
        """
        dataset = self.owned(volume)
        if names.snapshot_name(snapshot) not in self.snapshots(dataset, volume):
            raise SnapshotNotFound(volume, snapshot)
        return f"{dataset}@{snapshot}"

    def snapshots(self, dataset: str, volume: str) -> dict[str, SnapshotInfo]:
        """The snapshots of *dataset* (the volume *volume*) by name, oldest first."""
        # a received snapshot keeps its guid: it is its own "received" identity
        return {snap: SnapshotInfo(volume, snap,
                                   datetime.fromtimestamp(int(p["creation"]), tz=timezone.utc),
                                   format(int(p["guid"]), "x"), format(int(p["guid"]), "x"))
                for snap, p in self._zfs.snapshots(dataset).items()}

    def snapshots_below(self) -> list[SnapshotInfo]:
        """The snapshots of every dataset directly below the root, in one query (whose
        they are is the caller's to check)."""
        prefix = self.root + "/"
        return [SnapshotInfo(volume, snap, datetime.fromtimestamp(int(p["creation"]), tz=timezone.utc),
                             format(int(p["guid"]), "x"), format(int(p["guid"]), "x"))
                for name, p in self._zfs.get_below(self.root, ["creation", "guid"], depth=2).items()
                if name.startswith(prefix) and "@" in name
                for volume, _, snap in [name[len(prefix):].partition("@")] if "/" not in volume]

    def children(self) -> dict[str, dict[str, str]]:
        """Volume-like datasets directly below the root, with the properties we list by."""
        try:
            found = self._zfs.get_with_children(self.root, ["type", "creation", "mounted", "origin",
                                                            OWNER, OPTIONS])
        except CommandFailed as exc:
            raise BackendUnavailable(f"cannot list {self.root}: {exc}") from None
        prefix = self.root + "/"
        return {dataset[len(prefix):]: props for dataset, props in found.items()
                if dataset.startswith(prefix) and "/" not in dataset[len(prefix):]
                and "@" not in dataset and props.get("type") == "filesystem"}

    def info(self, name: str, props: Mapping[str, str]) -> VolumeInfo:
        """The volume *name* from its properties (``creation``, ``snapvol:options``)."""
        try:
            opts = json.loads(props.get(OPTIONS, "{}"))
        except ValueError:
            opts = {}
        return VolumeInfo(name=name, mountpoint=self.mountpoint(name),
                          created=datetime.fromtimestamp(int(props["creation"]), tz=timezone.utc),
                          options=opts if isinstance(opts, dict) else {})

    def properties(self, name: str, options: Mapping[str, str]) -> dict[str, str]:
        """The properties of a new volume's dataset (owner "creating" until it is complete)."""
        props = {OWNER: "creating", OPTIONS: json.dumps(dict(sorted(options.items()))),
                 "canmount": "noauto", "mountpoint": str(self.mountpoint(name))}
        if "size" in options:
            props["refquota"] = str(parse_size(options["size"]))
        for key in ("compression", "recordsize", "atime"):
            if key in options:
                props[key] = options[key]
        return props

    def destroy(self, dataset: str, *, mounted: bool) -> None:
        """Destroy a dataset of ours with its snapshots, and its mount directory."""
        self._zfs.destroy(dataset, mounted=mounted)
        try:
            (self.mount_base / dataset.rsplit("/", 1)[1]).rmdir()
        except OSError:
            pass

    def remove_half_made(self, dataset: str, what: str) -> None:
        """After a failed create, clone or receive: destroy *dataset* if it is still marked
        "creating". A failure here is logged, not raised (start-up retries), so that the
        caller reports the cause rather than the cleanup."""
        try:
            if (self._zfs.get(dataset, [OWNER], missing_ok=True) or {}).get(OWNER) == "creating":
                self.destroy(dataset, mounted=True)
        except BackendError as cleanup:
            log.error("could not remove %s %s (removed at next start): %s", what, dataset, cleanup)

    def require_healthy(self) -> None:
        """Tell "no such volume" apart from "the storage is gone".

        :raises BackendUnavailable: the parent dataset is gone or unusable.
        """
        try:
            if self._zfs.get(self.root, ["type"], missing_ok=True) is None:
                raise BackendUnavailable(f"parent dataset {self.root} is gone")
        except CommandFailed as exc:
            raise BackendUnavailable(f"zfs root {self.root} is not usable: {exc}") from None

    @staticmethod
    def is_mounted(mountpoint: Path) -> bool:
        return mounted_filesystem(mountpoint) is not None
