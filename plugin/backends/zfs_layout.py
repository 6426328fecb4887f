"""Where snapvol's volumes live in a ZFS pool, how they are marked, and how they read back.

One dataset per volume, ``<root>/<name>``, with ``canmount=noauto`` and an explicit
``mountpoint`` below the plugin's mount directory. Ownership and options are user properties:

    snapvol:owner    "snapvol" for a finished volume; "creating"/"removing" while in flux
    snapvol:options  the volume's options as JSON

A dataset without ``snapvol:owner=snapvol`` is not a volume: :meth:`Layout.owned` refuses it.
Which datasets there are, and these properties, come from :class:`.zfs_index.ZfsIndex`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import names
from ..errors import BackendError, BackendUnavailable, CommandFailed, SnapshotNotFound, VolumeNotFound
from ..mountinfo import mounted_filesystem
from ..units import parse_size
from .base import SnapshotInfo, VolumeInfo
from .zfs_commands import ZfsCommands
from .zfs_index import ZfsIndex

log = logging.getLogger(__name__)

OWNER = "snapvol:owner"
OPTIONS = "snapvol:options"
# what the index holds of each dataset below the root (``type`` comes with it)
LISTED = ["creation", "mounted", "origin", "refquota", OWNER, OPTIONS]


class Layout:
    """The volumes below the parent dataset *root*, mounted below *mount_base*; *exists* is
    libzfs_core's ``lzc_exists`` where it is loaded (see :class:`.zfs_index.ZfsIndex`)."""

    def __init__(self, zfs: ZfsCommands, root: str, mount_base: Path,
                 exists: Any | None = None) -> None:
        self._zfs = zfs
        self.root = root
        self.mount_base = mount_base
        self.index = ZfsIndex(zfs, root, mount_base, LISTED, exists)
        self._infos: dict[str, tuple[Mapping[str, str], VolumeInfo]] = {}
        # dataset -> (its index.snapshot_stamp when read, volume, snapshots)
        self._snapshots: dict[str, tuple[Any, str, dict[str, SnapshotInfo]]] = {}

    def dataset(self, name: str) -> str:
        return f"{self.root}/{names.stored_volume_name(name)}"

    def mountpoint(self, name: str) -> Path:
        return names.under(self.mount_base, names.stored_volume_name(name))

    def owned(self, name: str) -> str:
        """The dataset of volume *name*.

        :raises VolumeNotFound: no such dataset, or not a finished volume of snapvol's.
        :raises BackendUnavailable: the parent dataset is gone or unusable.
        """
        return self.owned_props(name)[0]

    def owned_props(self, name: str) -> tuple[str, Mapping[str, str]]:
        """The dataset of volume *name* and its indexed properties (``LISTED``), proven to
        exist (no ``zfs`` process when it is mounted).

        :raises VolumeNotFound: as :meth:`owned`.
        :raises BackendUnavailable: as :meth:`owned`.
        """
        dataset = self.dataset(name)
        props = self.index.props(names.stored_volume_name(name))
        if props is None or props.get(OWNER) != "snapvol":
            self.require_healthy()
            raise VolumeNotFound(name)
        return dataset, props

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
        """The snapshots of *dataset* (the volume *volume*) by name, oldest first: read again
        unless the index's stamp (OpenZFS, mounted) says none changed since the last read.
        The caller must not change the mapping."""
        stamp = self.index.snapshot_stamp(dataset.rsplit("/", 1)[1])
        cached = self._snapshots.get(dataset)
        if stamp is not None and cached is not None and cached[:2] == (stamp, volume):
            return cached[2]
        # a received snapshot keeps its guid: it is its own "received" identity
        found = {snap: SnapshotInfo(volume, snap,
                                    datetime.fromtimestamp(int(p["creation"]), tz=timezone.utc),
                                    format(int(p["guid"]), "x"), format(int(p["guid"]), "x"))
                 for snap, p in self._zfs.snapshots(dataset).items()}
        if stamp is not None:          # taken before the read: a change after it shows next time
            self._snapshots[dataset] = (stamp, volume, found)
        return found

    def snapshots_below(self) -> list[SnapshotInfo]:
        """The snapshots of every dataset directly below the root, in one query (whose
        they are is the caller's to check)."""
        prefix = self.root + "/"
        return [SnapshotInfo(volume, snap, datetime.fromtimestamp(int(p["creation"]), tz=timezone.utc),
                             format(int(p["guid"]), "x"), format(int(p["guid"]), "x"))
                for name, p in self._zfs.get_below(self.root, ["creation", "guid"], depth=2).items()
                if name.startswith(prefix) and "@" in name
                for volume, _, snap in [name[len(prefix):].partition("@")] if "/" not in volume]

    def children(self, *, fresh: bool = False) -> dict[str, dict[str, str]]:
        """Volume-like datasets directly below the root, with the properties we list by
        (``LISTED``), from the index (see :meth:`.zfs_index.ZfsIndex.children` for *fresh*);
        not each proven to exist.

        :raises BackendUnavailable: the root cannot be listed.
        """
        try:
            return self.index.children(fresh=fresh)
        except CommandFailed as exc:
            raise BackendUnavailable(f"cannot list {self.root}: {exc}") from None

    def info(self, name: str, props: Mapping[str, str]) -> VolumeInfo:
        """The volume *name* from its properties (``creation``, ``snapvol:options``); the
        same object again while the index holds the same properties."""
        cached = self._infos.get(name)
        if cached is not None and cached[0] is props:
            return cached[1]
        info = self._parse_info(name, props)
        self._infos[name] = (props, info)
        return info

    def _parse_info(self, name: str, props: Mapping[str, str]) -> VolumeInfo:
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
        self.index.forget(dataset.rsplit("/", 1)[1])
        self._infos.pop(dataset.rsplit("/", 1)[1], None)
        self._snapshots.pop(dataset, None)
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
