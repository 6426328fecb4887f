"""The record of validated restores, ``verify.json``: per volume the last result and the
last that passed (:mod:`plugin.verify` runs them and writes here).

The records move with the volume into the trash (:meth:`VerifyBook.rename`) and are forgotten
when it goes; the newest snapshot that passed is the one retention keeps.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from .statefile import read_json, write_json_atomically
from .units import rfc3339

log = logging.getLogger(__name__)

PASSED, FAILED, ERROR = "passed", "failed", "error"


@dataclass(frozen=True)
class VerifyResult:
    """One verification of one snapshot."""

    volume: str
    snapshot: str | None
    result: str                     # passed | failed | error (could not run)
    started: datetime
    seconds: float
    message: str = ""               # the check's last output lines, or why it could not run
    image: str | None = None
    command: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "started": rfc3339(self.started)}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> VerifyResult:
        return cls(**{**raw, "started": datetime.fromisoformat(raw["started"])})


class VerifyBook:
    """``verify.json``: per volume the last result and the last that passed (thread-safe)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._guard = threading.Lock()
        self._entries: dict[str, dict[str, VerifyResult]] = {}
        raw = read_json(path, {})
        for volume, kinds in raw.items() if isinstance(raw, dict) else ():
            for kind, entry in kinds.items() if isinstance(kinds, dict) else ():
                try:
                    self._entries.setdefault(volume, {})[kind] = VerifyResult.from_json(entry)
                except (KeyError, TypeError, ValueError):
                    log.error("verify.json: dropping the unreadable %s record of %s", kind, volume)

    @property
    def path(self) -> Path:
        return self._path

    def record(self, result: VerifyResult, older_than_passed: bool = False) -> None:
        """Record *result* as the volume's last; a pass also becomes its passed result,
        unless *older_than_passed* (a newer snapshot passed already and stays the one kept)."""
        with self._guard:
            kinds = self._entries.setdefault(result.volume, {})
            kinds["last"] = result
            if result.result == PASSED and not older_than_passed:
                kinds["passed"] = result
            self._save()

    def last(self, volume: str) -> VerifyResult | None:
        with self._guard:
            return self._entries.get(volume, {}).get("last")

    def passed(self, volume: str) -> VerifyResult | None:
        """The last verification of *volume* that passed."""
        with self._guard:
            return self._entries.get(volume, {}).get("passed")

    def forget(self, volume: str) -> None:
        with self._guard:
            if self._entries.pop(volume, None) is not None:
                self._save()

    def rename(self, volume: str, new_name: str) -> None:
        """The records of *volume* are now *new_name*'s (the trash)."""
        with self._guard:
            if volume in self._entries:
                self._entries[new_name] = {k: _renamed(r, new_name)
                                           for k, r in self._entries.pop(volume).items()}
                self._save()

    def volumes(self) -> set[str]:
        with self._guard:
            return set(self._entries)

    def _save(self) -> None:
        write_json_atomically(self._path, {v: {k: r.to_json() for k, r in kinds.items()}
                                           for v, kinds in self._entries.items()}, durable=False)


def _renamed(result: VerifyResult, volume: str) -> VerifyResult:
    return VerifyResult(**{**result.__dict__, "volume": volume})
