"""Standby roles, persisted: which volumes are primaries with standbys, which are standbys of
a primary elsewhere, and the epoch that orders their primaries.

One JSON file in the state directory (``roles.json``), replaced atomically and fsynced after
every change: the epoch is what keeps two hosts from both serving a volume, so a change of
role must survive a power loss before anyone is told about it. A volume without an entry is
an ordinary volume (a primary with no standbys, epoch 0).

An entry may carry an *intent* that a kill can interrupt, finished by the next start
(:meth:`plugin.standby.Standbys.recover`): ``aside`` (the volume is being renamed out of the
way after it lost its primary role) and ``handoff`` (this primary was handing the volume to
that standby and does not know yet whether the standby took it).
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .statefile import read_json, write_json_atomically

PRIMARY = "primary"
STANDBY = "standby"


@dataclass(frozen=True)
class Role:
    """A volume's role on this host.

    *primary* (for a standby) is how to reach the primary; *standbys* (for a primary) where
    its snapshots follow, every *sync*. *fenced* says why a primary accepts no new Mount for
    now (a hand-off under way or in doubt); *aside* names the volume this one is being
    renamed to; *handoff* the standby a hand-off was giving the volume to. *synced* (for a
    standby) is the last snapshot its primary synced here and *synced_at* when the primary
    took it (the stream's header: a received snapshot's own time is when it arrived).
    """

    role: str
    epoch: int
    primary: str | None = None
    standbys: tuple[str, ...] = ()
    sync: str = "1m"
    fenced: str | None = None
    aside: str | None = None
    handoff: str | None = None
    since: datetime = field(default_factory=lambda: datetime.now(timezone.utc))
    synced: str | None = None
    synced_at: datetime | None = None

    @property
    def is_primary(self) -> bool:
        return self.role == PRIMARY

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "standbys": list(self.standbys), "since": self.since.isoformat(),
                "synced_at": self.synced_at.isoformat() if self.synced_at else None}

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Role:
        """:raises (KeyError, TypeError, ValueError): not an entry of ours."""
        role = str(raw["role"])
        if role not in (PRIMARY, STANDBY):
            raise ValueError(role)
        return cls(role, int(raw["epoch"]), raw.get("primary"),
                   tuple(str(s) for s in raw.get("standbys") or ()), str(raw.get("sync") or "1m"),
                   raw.get("fenced"), raw.get("aside"), raw.get("handoff"),
                   datetime.fromisoformat(raw["since"]), raw.get("synced"),
                   datetime.fromisoformat(raw["synced_at"]) if raw.get("synced_at") else None)

    def but(self, **changes: Any) -> Role:
        """This role with *changes* (``since`` moves to now when the role or epoch changes)."""
        if ("role" in changes and changes["role"] != self.role) or \
                ("epoch" in changes and changes["epoch"] != self.epoch):
            changes.setdefault("since", datetime.now(timezone.utc))
        return replace(self, **changes)


class RoleBook:
    """The :class:`Role` of every volume that has one (thread-safe, durable)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._guard = threading.Lock()
        raw = read_json(path, {})
        self._roles: dict[str, Role] = {}
        for name, entry in raw.items() if isinstance(raw, dict) else ():
            try:
                self._roles[name] = Role.from_json(entry)
            except (KeyError, TypeError, ValueError):
                continue      # a foreign entry: that volume is an ordinary one until told

    @property
    def path(self) -> Path:
        return self._path

    def get(self, volume: str) -> Role | None:
        with self._guard:
            return self._roles.get(volume)

    def set(self, volume: str, role: Role) -> None:
        with self._guard:
            self._roles[volume] = role
            self._save()

    def forget(self, volume: str) -> None:
        with self._guard:
            if self._roles.pop(volume, None) is not None:
                self._save()

    def rename(self, volume: str, new_name: str) -> None:
        """The role of *volume* (its standbys, its epoch) is now *new_name*'s (the trash)."""
        with self._guard:
            if volume in self._roles:
                self._roles[new_name] = self._roles.pop(volume)
                self._save()

    def all(self) -> dict[str, Role]:
        with self._guard:
            return dict(self._roles)

    def volumes(self) -> set[str]:
        with self._guard:
            return set(self._roles)

    def _save(self) -> None:
        write_json_atomically(self._path, {n: r.to_json() for n, r in self._roles.items()},
                              durable=True)
