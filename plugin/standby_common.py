"""What the standby modules share: how hosts recognise each other (:func:`same_host`), read
an epoch or a time from a peer's answer or a stream header, and how a role shows in Status
(:func:`describe_role`). No state here.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from .backends.base import Backend
from .errors import PluginError
from .history import ReplicationLog
from .roles import Role
from .targets import Target
from .units import parse_duration, rfc3339


def describe_role(role: Role | None, volume: str, replications: ReplicationLog | None,
                  backend: Backend, now: datetime) -> dict[str, Any] | None:
    """A role as Status shows it: role, epoch, and per standby its last synced snapshot, lag
    in seconds (now minus when that snapshot was taken) and last error."""
    if role is None:
        return None
    out: dict[str, Any] = {"role": role.role, "epoch": role.epoch, "since": rfc3339(role.since)}
    if role.fenced:
        out["fenced"] = role.fenced
    if not role.is_primary:
        out["primary"] = role.primary
        if role.synced:
            out["synced"] = role.synced
            if role.synced_at is not None:
                out["synced_at"] = rfc3339(role.synced_at)
                out["lag_seconds"] = round((now - role.synced_at).total_seconds())
        return out
    out["sync"] = role.sync
    created = {}
    try:
        created = {s.name: s.created for s in backend.snapshots(volume)}
    except PluginError:
        pass
    rows = []
    for target in role.standbys:
        base = replications.base(volume, target) if replications else None
        last = replications.last_to(volume, target) if replications else None
        synced_at = created.get(base) if base else None
        rows.append({"target": target, "synced": base,
                     "synced_at": rfc3339(synced_at) if synced_at else None,
                     "lag_seconds": round((now - synced_at).total_seconds()) if synced_at else None,
                     "last_error": last.error if last is not None else None})
    out["standbys"] = rows
    return out


def epoch_of(reply: dict[str, Any]) -> int:
    value = reply.get("epoch", reply.get("Epoch", 0))
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0


def time_of(text: object) -> datetime | None:
    """An RFC 3339 time from a stream header (None: missing or not a time)."""
    try:
        when = datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def seconds_of(text: str) -> float:
    try:
        return float(parse_duration(text))
    except ValueError:
        return 60.0


def same_host(a: str | None, b: str | None) -> bool:
    """Two targets that name the same snapvol: same host and port, and the same socket when
    both spell one out (one host may run several snapvols, e.g. managed plugins, each with
    its socket; a socket left out is found by discovery there, so it may be any of them)."""
    if not a or not b:
        return False
    try:
        x, y = Target.parse(a), Target.parse(b)
    except ValueError:
        return False
    if x.kind == "unix" or y.kind == "unix":
        return x == y
    if x.socket and y.socket and x.socket != y.socket:
        return False
    return (x.host, x.port or 22) == (y.host, y.port or 22)
