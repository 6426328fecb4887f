"""Which Docker mounts use which volume, persisted so a plugin restart forgets nothing.

Docker sends one Mount per container start with an opaque ``ID`` and exactly one Unmount with
the same ID later; the same ID can be mounted twice (a running container plus ``docker cp``),
so each volume has a *multiset* of IDs. dockerd never replays Mounts after a plugin restart
(PROTOCOL.md section 6), so the table is written to disk, atomically, before each answer.
"""

from __future__ import annotations

import threading
from pathlib import Path

from .statefile import read_json, write_json_atomically


class MountTable:
    """A persisted multiset of mount IDs per volume. Thread-safe; callers hold the volume lock."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._guard = threading.Lock()
        raw = read_json(path, {})
        self._ids: dict[str, list[str]] = {
            str(name): [str(i) for i in ids] for name, ids in raw.items()
            if isinstance(ids, list) and ids}

    def users(self, name: str) -> list[str]:
        """The mount IDs currently using *name* (with repetitions)."""
        with self._guard:
            return list(self._ids.get(name, ()))

    def in_use(self) -> dict[str, int]:
        """Volume name -> number of active mounts, for every volume in use."""
        with self._guard:
            return {name: len(ids) for name, ids in self._ids.items()}

    def add(self, name: str, mount_id: str) -> None:
        with self._guard:
            self._ids.setdefault(name, []).append(mount_id)
            self._save()

    def discard(self, name: str, mount_id: str) -> bool | None:
        """Remove one use of *mount_id*.

        :returns: ``None`` if the ID was unknown, else whether the volume is now unused.
        """
        with self._guard:
            ids = self._ids.get(name)
            if not ids or mount_id not in ids:
                return None
            ids.remove(mount_id)
            if not ids:
                del self._ids[name]
            self._save()
            return name not in self._ids

    def forget(self, name: str) -> list[str]:
        """Drop every ID of *name* (the volume is gone); return them."""
        with self._guard:
            ids = self._ids.pop(name, [])
            if ids:
                self._save()
            return ids

    def _save(self) -> None:
        write_json_atomically(self._path, self._ids)
