"""An in-memory backend with the same contract as the real ones (for the HTTP-layer tests).

It is run through the same contract tests as :class:`BtrfsBackend`
(``tests/integration/test_backend_contract.py``), which keeps it honest. It is never the
proof that a storage feature works.
"""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, BinaryIO, ClassVar

from plugin import names, process
from plugin.backends.base import Capacity, SnapshotInfo, Usage, VolumeInfo, snapshot_each
from plugin.errors import SnapshotExists, SnapshotNotFound, VolumeExists, VolumeNotFound


class FakeBackend:
    kind: ClassVar[str] = "btrfs"     # accepts the Btrfs options
    compressions = frozenset({"zstd", "lzo", "zlib", "none"})
    rollback_keeps_newer: ClassVar[bool] = True
    clones_need_origin: ClassVar[bool] = False     # copies: a clone shares nothing
    atomic_snapshots: ClassVar[bool] = False

    def __init__(self, root: Path) -> None:
        self.root = root
        self._volumes: dict[str, VolumeInfo] = {}
        self.attached: set[str] = set()
        self.calls: list[tuple[str, str]] = []
        self._snapshots: dict[str, dict[str, SnapshotInfo]] = {}
        self.clock = lambda: datetime.now(timezone.utc)   # the scheduler tests move time

    def preflight(self) -> None:
        pass

    def leftovers(self) -> list:
        return []

    def finish_interrupted(self) -> None:
        pass

    def check(self) -> None:
        (self.root / "volumes").mkdir(parents=True, exist_ok=True)

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "filesystem": "fake"}

    def capacity(self) -> Capacity:
        return Capacity(10 << 30, 9 << 30)

    def volumes(self) -> list[VolumeInfo]:
        return [v for n, v in self._volumes.items() if not names.is_internal(n)]

    def listing(self) -> list[VolumeInfo]:
        return self.volumes()

    def internal_volumes(self) -> list[VolumeInfo]:
        return [v for n, v in self._volumes.items() if names.is_internal(n)]

    def volume(self, name: str) -> VolumeInfo:
        try:
            return self._volumes[name]
        except KeyError:
            raise VolumeNotFound(name) from None

    def usage(self, name: str) -> Usage:
        self.volume(name)
        return Usage(0, None)

    def usages(self) -> dict[str, Usage]:
        return {name: Usage(0, None) for name in self._volumes if not names.is_internal(name)}

    def create_volume(self, name: str, options: Mapping[str, str]) -> VolumeInfo:
        if name in self._volumes:
            raise VolumeExists(f"volume {name} already exists (made by snapvol)")
        path = names.under(self.root / "volumes", name)
        path.mkdir()
        path.chmod(int(options.get("mode", "755"), 8))
        info = VolumeInfo(name, path, self.clock().replace(microsecond=0),
                          dict(options))
        self._volumes[name] = info
        self.calls.append(("create", name))
        return info

    def destroy_volume(self, name: str) -> None:
        info = self.volume(name)
        shutil.rmtree(info.mountpoint)
        shutil.rmtree(self.root / "snapshots" / name, ignore_errors=True)
        self._snapshots.pop(name, None)
        del self._volumes[name]
        self.calls.append(("destroy", name))

    def rename_volume(self, name: str, new_name: str) -> None:
        if new_name in self._volumes:
            if name not in self._volumes:
                return                          # done already (the contract: repeatable)
            raise VolumeExists(new_name)
        info = self.volume(name)
        path = info.mountpoint.parent / new_name
        info.mountpoint.rename(path)
        old = self._volumes.pop(name)
        self._volumes[new_name] = VolumeInfo(new_name, path, old.created, old.options)
        if name in self._snapshots:
            self._snapshots[new_name] = {k: replace(s, volume=new_name)
                                         for k, s in self._snapshots.pop(name).items()}
        self.calls.append(("rename", name, new_name))

    def attach(self, name: str) -> Path:
        self.attached.add(name)
        self.calls.append(("attach", name))
        return self.volume(name).mountpoint

    def detach(self, name: str) -> None:
        self.attached.discard(name)
        self.calls.append(("detach", name))

    # Snapshots are copies here (the real backends are O(1)); good enough for the HTTP layer.
    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        self.volume(volume)
        return sorted(self._snapshots.get(volume, {}).values(), key=lambda s: (s.created, s.name))

    def clone_origins(self) -> dict[str, dict[str, str]]:
        return {}

    def all_snapshots(self) -> dict[str, list[SnapshotInfo]]:
        return {name: self.snapshots(name) for name in self._volumes}

    def create_snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        source = self.volume(volume).mountpoint
        taken = self._snapshots.setdefault(volume, {})
        if snapshot in taken:
            raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
        shutil.copytree(source, self.root / "snapshots" / volume / snapshot)
        taken[snapshot] = SnapshotInfo(volume, snapshot, self.clock(), uuid.uuid4().hex)
        return taken[snapshot]

    def create_snapshots(self, volumes: list[str], snapshot: str) -> list[SnapshotInfo]:
        return snapshot_each(self, volumes, snapshot)

    def hold(self, volume: str, snapshot: str) -> None:
        self._snapshot(volume, snapshot)

    def release(self, volume: str, snapshot: str) -> None:
        pass

    def destroy_snapshot(self, volume: str, snapshot: str) -> None:
        self._snapshot(volume, snapshot)
        shutil.rmtree(self.root / "snapshots" / volume / snapshot)
        del self._snapshots[volume][snapshot]

    def clone(self, volume: str, snapshot: str, new_volume: str,
              options: Mapping[str, str]) -> VolumeInfo:
        self._snapshot(volume, snapshot)
        if new_volume in self._volumes:
            raise VolumeExists(f"volume {new_volume} already exists")
        path = names.under(self.root / "volumes", new_volume)
        shutil.copytree(self.root / "snapshots" / volume / snapshot, path)
        info = VolumeInfo(new_volume, path, datetime.now(timezone.utc).replace(microsecond=0),
                          dict(options))
        self._volumes[new_volume] = info
        return info

    def rollback(self, volume: str, snapshot: str) -> None:
        self._snapshot(volume, snapshot)
        target = self.volume(volume).mountpoint
        shutil.rmtree(target)
        shutil.copytree(self.root / "snapshots" / volume / snapshot, target)

    def _snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        self.volume(volume)
        try:
            return self._snapshots[volume][snapshot]
        except KeyError:
            raise SnapshotNotFound(volume, snapshot) from None

    # Streams are tar archives of the snapshot directory here (the real ones: btrfs/zfs send).
    resumable: ClassVar[bool] = False
    checked_streams: ClassVar[bool] = False   # its "native" streams carry no check of their own

    def resume_token(self, volume: str) -> str | None:
        return None

    def send_argv(self, volume: str, snapshot: str, base: str | None, *,
                  resume_token: str | None = None) -> list[str]:
        self._snapshot(volume, snapshot)
        if base is not None:
            self._snapshot(volume, base)
        return ["tar", "-cf", "-", "-C", str(self.root / "snapshots" / volume / snapshot), "."]

    @contextmanager
    def receiving(self, volume: str, snapshot: str, base: str | None,
                  options: Mapping[str, str], *, resume: bool = False) -> Iterator[BinaryIO]:
        if base is None and volume in self._volumes:
            raise VolumeExists(f"volume {volume} already exists")
        if base is not None:
            self._snapshot(volume, base)
            if snapshot in self._snapshots.get(volume, {}):
                raise SnapshotExists(f"snapshot {volume}@{snapshot} already exists")
        inbox = self.root / f"inbox-{uuid.uuid4().hex}"
        inbox.mkdir(parents=True)
        try:
            with process.Streaming(["tar", "-xf", "-", "-C", str(inbox)], feed=True) as child:
                yield child.proc.stdin   # type: ignore[misc]
                child.finish()
            if base is None:
                self.create_volume(volume, options)
            self._snapshots.setdefault(volume, {})
            shutil.copytree(inbox, self.root / "snapshots" / volume / snapshot)
            self._snapshots[volume][snapshot] = SnapshotInfo(volume, snapshot, self.clock(),
                                                             uuid.uuid4().hex, "received")
            self.rollback(volume, snapshot)
        finally:
            shutil.rmtree(inbox)
