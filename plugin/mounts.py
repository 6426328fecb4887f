"""Which Docker mounts use which volume, persisted so a plugin restart forgets nothing.

Docker sends one Mount per container start with an opaque ``ID`` and exactly one Unmount with
the same ID later; the same ID can be mounted twice (a running container plus ``docker cp``),
so each volume has a *multiset* of IDs. dockerd never replays Mounts after a plugin restart
(PROTOCOL.md section 6), so the table is written to disk, atomically, before each answer.

After a reboot no container can still be using a volume, and stale IDs would keep volumes
"in use" forever. So the table lives in ``/run`` by default (tmpfs, cleared at boot, and fast:
on ext4 every rename over an existing file forces a data flush), and it is tagged with the
kernel's boot ID so a table from an earlier boot is discarded wherever it is kept. It only has
to survive a crash of the plugin, not a power loss, so it is written without fsync.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

from .statefile import read_json, write_json_atomically

log = logging.getLogger(__name__)

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def current_boot_id() -> str:
    return BOOT_ID.read_text().strip()


class MountTable:
    """A persisted multiset of mount IDs per volume. Thread-safe; callers hold the volume lock."""

    def __init__(self, path: Path, boot_id: str | None = None) -> None:
        self._path = path
        self._boot_id = boot_id or current_boot_id()
        self._guard = threading.Lock()
        raw = read_json(path, {})
        mounts = raw.get("mounts", {}) if isinstance(raw, dict) else {}
        if mounts and raw.get("boot_id") != self._boot_id:
            log.info("the host rebooted since %s was written: no container can still use "
                     "a volume, forgetting %d volume(s) in use", path, len(mounts))
            mounts = {}
        self._ids: dict[str, list[str]] = {
            str(name): [str(i) for i in ids] for name, ids in mounts.items()
            if isinstance(ids, list) and ids}

    @property
    def path(self) -> Path:
        """The state file."""
        return self._path

    def users(self, name: str) -> list[str]:
        """The mount IDs currently using *name* (with repetitions)."""
        with self._guard:
            return list(self._ids.get(name, ()))

    def in_use(self) -> dict[str, int]:
        """Volume name -> number of active mounts, for every volume in use."""
        with self._guard:
            return {name: len(ids) for name, ids in self._ids.items()}

    def add(self, name: str, mount_id: str) -> None:
        """Record one more use of *mount_id* (saved before it counts).

        :raises OSError: the table could not be saved; nothing changed.
        """
        with self._guard:
            self._commit(name, [*self._ids.get(name, ()), mount_id])

    def discard(self, name: str, mount_id: str) -> bool | None:
        """Remove one use of *mount_id* (saved before it counts).

        :returns: ``None`` if the ID was unknown, else whether the volume is now unused.
        :raises OSError: the table could not be saved; nothing changed.
        """
        with self._guard:
            ids = list(self._ids.get(name, ()))
            if mount_id not in ids:
                return None
            ids.remove(mount_id)
            self._commit(name, ids)
            return not ids

    def forget(self, name: str) -> list[str]:
        """Drop every ID of *name* (the volume is gone); return them."""
        with self._guard:
            ids = list(self._ids.get(name, ()))
            if ids:
                self._commit(name, [])
            return ids

    def _commit(self, name: str, ids: list[str]) -> None:
        """Save the table with *name* using *ids* (none: not in use), then adopt it: memory
        never runs ahead of the disk, so a failed save changes nothing."""
        table = {**self._ids, name: ids}
        if not ids:
            del table[name]
        # one line (indent=None): json's C encoder, 4x faster with 1,000 volumes mounted,
        # where the indented file cost every Mount 1.8 ms (scale bench: Mount 3.0 ms)
        write_json_atomically(self._path, {"boot_id": self._boot_id, "mounts": table},
                              durable=False, indent=None)
        self._ids = table
