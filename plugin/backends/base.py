"""The contract every storage backend implements, and the values it returns.

Backends are storage primitives: no locks, no mount refcounts, no HTTP. Names arrive
validated, options arrive validated and normalised (:mod:`plugin.options`), and callers hold
the volume lock for mutations. Every method raises only :class:`~plugin.errors.PluginError`
subclasses.
"""

from __future__ import annotations

from collections.abc import Mapping
from contextlib import AbstractContextManager
import os
import sys
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO, ClassVar, Protocol


_NO_OPTIONS: Mapping[str, str] = MappingProxyType({})


class VolumeInfo:
    """A volume as the filesystem describes it. Immutable; equal when all four parts are.

    Compact on purpose: a backend's listing memo keeps one per volume (10,000 and more), so
    the mountpoint is kept as its directory, one string shared by all the volumes there,
    and the volume's name; :attr:`path` joins them (what Docker is given), :attr:`mountpoint`
    makes a :class:`~pathlib.Path` (about 350 bytes a volume if it were kept). The volumes
    without options share one empty mapping."""

    __slots__ = ("name", "_where", "_named", "created", "options")
    name: str
    created: datetime                  # timezone-aware UTC, from the filesystem
    options: Mapping[str, str]

    def __init__(self, name: str, mountpoint: Path | str, created: datetime,
                 options: Mapping[str, str] | None = None) -> None:
        path = os.fspath(mountpoint)
        directory, _, base = path.rpartition("/")
        named = base == name and bool(directory)   # true of every backend's mountpoint
        for attr, value in (("name", name), ("_where", sys.intern(directory) if named else path),
                            ("_named", named), ("created", created),
                            ("options", options or _NO_OPTIONS)):
            object.__setattr__(self, attr, value)

    @property
    def path(self) -> str:
        """The mountpoint, as text."""
        return f"{self._where}/{self.name}" if self._named else self._where

    @property
    def mountpoint(self) -> Path:
        return Path(self.path)

    def __setattr__(self, attr: str, value: object) -> None:
        raise AttributeError(f"VolumeInfo is immutable (setting {attr})")

    def _parts(self) -> tuple[object, ...]:
        return (self.name, self.path, self.created, dict(self.options))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, VolumeInfo) and self._parts() == other._parts()

    def __hash__(self) -> int:
        return hash((self.name, self.path, self.created))

    def __repr__(self) -> str:
        return (f"VolumeInfo(name={self.name!r}, mountpoint={self.path!r}, "
                f"created={self.created!r}, options={dict(self.options)!r})")


@dataclass(frozen=True)
class SnapshotInfo:
    """A read-only point-in-time copy of a volume."""

    volume: str
    name: str
    created: datetime                  # timezone-aware UTC, from the filesystem
    identity: str                      # btrfs subvolume UUID or ZFS guid, hex
    received: str = ""                 # identity of the snapshot this one was received from
                                       # (btrfs received UUID; ZFS: the guid, kept by receive)

    def matches(self, other_identity: str) -> bool:
        """Whether this snapshot is, or was received from, the one with *other_identity*."""
        return other_identity in (self.identity, self.received)



@dataclass(frozen=True)
class Leftover:
    """Something an interrupted operation left: the volume name it concerns, what it is,
    and what :meth:`Backend.finish_interrupted` does to it."""

    volume: str
    what: str
    repair: str

@dataclass(frozen=True)
class Usage:
    """Space accounting of one volume; ``None`` where the filesystem cannot tell cheaply."""

    used_bytes: int | None
    quota_bytes: int | None


@dataclass(frozen=True)
class Capacity:
    """Space of the storage that holds every volume: its size and what can still be written."""

    size_bytes: int
    available_bytes: int


class Backend(Protocol):
    """Storage primitives for volumes.

    :raises VolumeNotFound: (any method taking a name) no such volume owned by snapvol.
    :raises BackendUnavailable: the storage root is gone or is not the expected filesystem.
    :raises BackendError: the filesystem refused; the message says why.
    """

    kind: ClassVar[str]                      # "btrfs" | "zfs"
    compressions: frozenset[str]             # values the ``compression`` option accepts
    rollback_keeps_newer: ClassVar[bool]     # btrfs: True; zfs rollback destroys newer ones
    clones_need_origin: ClassVar[bool]       # zfs: a clone depends on its origin snapshot
    atomic_snapshots: bool                   # several volumes in one atomic call (OpenZFS)
    resumable: bool                          # an interrupted receive can resume (OpenZFS -s)
    # its native receiver checks a stream (every byte it uses) before it keeps any of it, and
    # :meth:`receiving` publishes nothing unless the block ends without error: stream format 3
    # (no check of ours) is safe
    checked_streams: bool

    def leftovers(self) -> list[Leftover]:
        """What :meth:`finish_interrupted` would finish or remove, found without changing
        anything (``snapvol check``). While the plugin runs this includes the temporaries of
        operations in flight: the caller tells them apart by their volume."""

    def finish_interrupted(self) -> None:
        """Finish or undo what crashed operations left (idempotent; part of :meth:`check`)."""

    def preflight(self) -> None:
        """Decide quickly, changing nothing, whether the storage can work at all (gunicorn's
        master calls this before it binds the socket, within dockerd's start window).

        :raises BackendUnavailable: it cannot, and why.
        """

    def check(self) -> None:
        """:meth:`preflight`, then prepare the storage and finish interrupted work (crash
        leftovers)."""

    def describe(self) -> dict[str, Any]:
        """Facts for ``snapvol status``: root, filesystem, quotas... (cheap)."""

    def capacity(self) -> Capacity:
        """Size and free space of the storage (cheap: one statvfs or one ``zfs get``)."""

    def volumes(self) -> list[VolumeInfo]:
        """Every volume snapvol owns, in one bulk pass (no subprocess per volume)."""

    def listing(self) -> list[VolumeInfo]:
        """:meth:`volumes` for Docker's List, which must stay fast at thousands of volumes:
        the same answer (a volume created or removed shows at once), where a backend can give
        it more cheaply by remembering what cannot change (Btrfs: each subvolume's mark; ZFS:
        its index, whose one exception is a dataset made unmounted with the ``zfs`` CLI
        behind snapvol's back: listed within ``zfs_index.MAX_AGE`` seconds and a listing)."""

    def internal_volumes(self) -> list[VolumeInfo]:
        """snapvol's own volumes (``plugin.names.is_internal``: the trash), which
        :meth:`volumes` never lists."""

    def volume(self, name: str) -> VolumeInfo:
        """One volume."""

    def usage(self, name: str) -> Usage:
        """Used bytes and quota of one volume (cheap: no subprocess)."""

    def usages(self) -> dict[str, Usage]:
        """:meth:`usage` of every volume in one pass (metrics read it at every scrape; ZFS:
        one ``zfs get`` for all of them, never one per volume)."""

    def create_volume(self, name: str, options: Mapping[str, str]) -> VolumeInfo:
        """Create a volume with its options applied, all or nothing.

        :raises VolumeExists: the name is taken (by snapvol or by something else).
        """

    def destroy_volume(self, name: str) -> None:
        """Destroy the volume and its data; it disappears from listings at once."""

    def rename_volume(self, name: str, new_name: str) -> None:
        """Give the unmounted volume *name*, with its snapshots, the name *new_name*. Called
        again after an interruption, it finishes the rename (the caller keeps the intent).

        :raises VolumeExists: both names exist. :raises VolumeNotFound: neither does.
        """

    def attach(self, name: str) -> Path:
        """Make the volume reachable and return the directory to hand to Docker (idempotent)."""

    def detach(self, name: str) -> None:
        """Undo :meth:`attach` once no container uses the volume (idempotent)."""

    def snapshots(self, volume: str) -> list[SnapshotInfo]:
        """The volume's snapshots, oldest first (one bulk query)."""

    def clone_origins(self) -> dict[str, dict[str, str]]:
        """volume -> {snapshot: the volume cloned from it} for every snapshot a clone
        depends on (``clones_need_origin`` backends; empty where clones never depend)."""

    def all_snapshots(self) -> dict[str, list[SnapshotInfo]]:
        """Every volume's snapshots, oldest first, as cheaply as the filesystem allows (ZFS:
        one query); a volume removed meanwhile is simply left out."""

    def create_snapshot(self, volume: str, snapshot: str) -> SnapshotInfo:
        """Take a read-only snapshot, in constant time.

        :raises SnapshotExists: the volume already has a snapshot of that name.
        """

    def create_snapshots(self, volumes: list[str], snapshot: str) -> list[SnapshotInfo]:
        """Snapshot several volumes under one name, all or none; one point in time where the
        filesystem can do it (``atomic_snapshots``).

        :raises SnapshotExists: a volume already has a snapshot of that name (none taken).
        """

    def destroy_snapshot(self, volume: str, snapshot: str) -> None:
        """:raises SnapshotNotFound: no such snapshot."""

    def clone(self, volume: str, snapshot: str, new_volume: str,
              options: Mapping[str, str]) -> VolumeInfo:
        """A new, independent, writable volume with the snapshot's content, in constant time.

        :raises VolumeExists: *new_volume* is taken.
        :raises SnapshotNotFound: no such snapshot.
        """

    def hold(self, volume: str, snapshot: str) -> None:
        """Protect a replication base from being destroyed where the filesystem can (OpenZFS
        user hold); elsewhere a no-op (snapvol's replication record protects it)."""

    def release(self, volume: str, snapshot: str) -> None:
        """Undo :meth:`hold` (idempotent); destroying the volume releases its holds too."""

    def resume_token(self, volume: str) -> str | None:
        """The token of an interrupted receive into *volume* (``resumable`` backends)."""

    def send_argv(self, volume: str, snapshot: str, base: str | None, *,
                  resume_token: str | None = None) -> list[str]:
        """The command whose stdout is the native stream of *snapshot*, incremental from
        *base* when given, or the rest of an interrupted one given its *resume_token*.

        :raises SnapshotNotFound: either snapshot is missing.
        """

    def receiving(self, volume: str, snapshot: str, base: str | None,
                  options: Mapping[str, str], *,
                  resume: bool = False) -> AbstractContextManager[BinaryIO]:
        """A context whose value is a pipe for the native stream of *volume*@*snapshot*.

        A full stream (*base* None) makes a new volume with *options*; an incremental one
        adds the snapshot to the volume (which must hold *base*) and makes the volume's
        content that of the snapshot. Only when the block ends normally is anything
        published; if it raises, everything received is removed (nothing half-made) or, on
        ``resumable`` backends, when the stream was cut short (not refused by the native
        receiver), kept out of sight for a *resume* stream to complete. A native receiver
        that stops reading raises its own failure (its stderr), not the broken pipe.

        :raises VolumeExists: a full stream for a volume that exists.
        :raises SnapshotExists: the volume already has a snapshot of that name.
        """

    def rollback(self, volume: str, snapshot: str) -> None:
        """Make the volume's content that of the snapshot (caller: the volume is unmounted,
        and on backends that destroy newer snapshots, the caller agreed to that)."""


def snapshot_each(backend: Backend, volumes: list[str], snapshot: str) -> list[SnapshotInfo]:
    """:meth:`Backend.create_snapshots` for filesystems without an atomic multi-snapshot:
    one after another (the caller pauses writers for one point in time), undone on failure."""
    taken: list[SnapshotInfo] = []
    try:
        for volume in volumes:
            taken.append(backend.create_snapshot(volume, snapshot))
    except BaseException:
        for info in taken:
            backend.destroy_snapshot(info.volume, info.name)
        raise
    return taken
