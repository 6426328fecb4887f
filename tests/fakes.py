"""An in-memory backend with the same contract as the real ones (for the HTTP-layer tests).

It is run through the same contract tests as :class:`BtrfsBackend`
(``tests/integration/test_backend_contract.py``), which keeps it honest. It is never the
proof that a storage feature works.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, ClassVar

from plugin import names
from plugin.backends.base import Usage, VolumeInfo
from plugin.errors import VolumeExists, VolumeNotFound


class FakeBackend:
    kind: ClassVar[str] = "btrfs"     # accepts the Btrfs options
    compressions = frozenset({"zstd", "lzo", "zlib", "none"})

    def __init__(self, root: Path) -> None:
        self.root = root
        self._volumes: dict[str, VolumeInfo] = {}
        self.attached: set[str] = set()
        self.calls: list[tuple[str, str]] = []

    def check(self) -> None:
        (self.root / "volumes").mkdir(parents=True, exist_ok=True)

    def describe(self) -> dict[str, Any]:
        return {"root": str(self.root), "filesystem": "fake"}

    def volumes(self) -> list[VolumeInfo]:
        return list(self._volumes.values())

    def volume(self, name: str) -> VolumeInfo:
        try:
            return self._volumes[name]
        except KeyError:
            raise VolumeNotFound(name) from None

    def usage(self, name: str) -> Usage:
        self.volume(name)
        return Usage(0, None)

    def create_volume(self, name: str, options: Mapping[str, str]) -> VolumeInfo:
        if name in self._volumes:
            raise VolumeExists(f"volume {name} already exists (made by snapvol)")
        path = names.under(self.root / "volumes", name)
        path.mkdir()
        path.chmod(int(options.get("mode", "755"), 8))
        info = VolumeInfo(name, path, datetime.now(timezone.utc).replace(microsecond=0),
                          dict(options))
        self._volumes[name] = info
        self.calls.append(("create", name))
        return info

    def destroy_volume(self, name: str) -> None:
        info = self.volume(name)
        info.mountpoint.rmdir()
        del self._volumes[name]
        self.calls.append(("destroy", name))

    def attach(self, name: str) -> Path:
        self.attached.add(name)
        self.calls.append(("attach", name))
        return self.volume(name).mountpoint

    def detach(self, name: str) -> None:
        self.attached.discard(name)
        self.calls.append(("detach", name))
