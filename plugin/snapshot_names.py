"""The names snapvol gives the snapshots it takes itself, which say why each was taken.

A prefix per purpose, then the UTC time (sortable, no ``:``, which is awkward in paths and
``-v`` specs), so a name alone tells who took a snapshot, even after the state files are lost:

    auto-<time>               the scheduler (the only ones retention prunes)
    manual-<time>             ``snapvol snapshot create`` without ``--name``
    send-<time>-<µs><hex>     ``snapvol send`` without ``@SNAPSHOT``
    repl-<time>-<µs><hex>     a replication (replaced by the next one)
    clone-<clone>-<time>      ``from=VOLUME`` without ``@SNAPSHOT``: the clone's origin

``auto-`` is reserved: a user cannot name a snapshot so.
"""

from __future__ import annotations

import secrets
from datetime import datetime, timezone

AUTO_PREFIX = "auto-"
MANUAL_PREFIX = "manual-"
SEND_PREFIX = "send-"
REPL_PREFIX = "repl-"
CLONE_PREFIX = "clone-"


def utc_stamp(now: datetime | None = None) -> str:
    """20261129T101500Z: sorts by time."""
    return (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def unique_name(prefix: str) -> str:
    """prefix + UTC time + microseconds and 2 hex digits: sorts by time, also within one
    second (the lifecycle keeps the newest by name), and never collides."""
    now = datetime.now(timezone.utc)
    return f"{prefix}{utc_stamp(now)}-{now.microsecond:06d}{secrets.token_hex(1)}"


def automatic(now: datetime) -> str:
    return AUTO_PREFIX + utc_stamp(now)


def is_automatic(snapshot: str) -> bool:
    return snapshot.startswith(AUTO_PREFIX)


def clone_origin(clone: str) -> str:
    """The snapshot taken for ``from=VOLUME`` (no ``@``) when *clone* is created."""
    return f"{CLONE_PREFIX}{clone}-{utc_stamp()}"
