"""The names of the volumes there were when the storage last answered (see
:class:`KnownVolumes`); kept by :class:`plugin.volumes.VolumeService`, read by the status view."""

from __future__ import annotations

import threading
from collections.abc import Iterable


class KnownVolumes:
    """The names of the volumes there were when the storage last answered.

    While the storage is unavailable, Get answers for these, with the problem in Status
    (dockerd drops a volume's options and labels when its Get fails), and for no other name:
    dockerd asks every driver about a name it does not know, and an answer claims the name.
    """

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._names: set[str] = set()

    def reset(self, names: Iterable[str]) -> None:
        with self._guard:
            self._names = set(names)

    def update(self, names: Iterable[str]) -> None:
        with self._guard:
            self._names.update(names)

    def add(self, name: str) -> None:
        with self._guard:
            self._names.add(name)

    def discard(self, name: str) -> None:
        with self._guard:
            self._names.discard(name)

    def __len__(self) -> int:
        with self._guard:
            return len(self._names)

    def __contains__(self, name: object) -> bool:
        with self._guard:
            return name in self._names
