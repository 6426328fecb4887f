"""What monitoring needs to know, read in one pass: per volume its snapshots, usage, schedule
and replication targets, and the pool's fill. Read by the Prometheus collector
(:mod:`plugin.metrics`) at scrape time and by ``snapvol check --freshness`` (the
``Snapvol.Freshness`` endpoint; the thresholds are applied by :mod:`plugin.freshness`).

Takes no volume lock, like :mod:`plugin.status`: a snapshot pruned while we look costs a
detail, never the answer. One pass lists the volumes, their snapshots and their usage (a bulk
call each: no subprocess per volume); the answer is cached for a few seconds, so that scrapes from several Prometheus
servers (or a scrape and a check) cost one pass.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from .domain import Domain
from .errors import PluginError
from .roles import RoleBook
from .schedules import schedule_of
from .standby_common import seconds_of
from .targets import Target
from .units import parse_duration, rfc3339
from .verify_book import PASSED, VerifyResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TargetFacts:
    """One replication target of a volume (a ``replicate=`` target, a standby, or one that
    ``snapvol replicate`` was run against by hand)."""

    target: str
    kind: str                         # "replicate" | "standby" | "manual"
    interval: float | None            # seconds between runs expected (None: by hand)
    last_attempt: datetime | None
    last_success: datetime | None
    last_failed: bool
    last_bytes: int                   # of the last successful replication
    synced_created: datetime | None   # when the snapshot the target holds was taken

    def to_json(self) -> dict[str, Any]:
        return {"target": self.target, "kind": self.kind, "interval": self.interval,
                "last_attempt": rfc3339(self.last_attempt) if self.last_attempt else None,
                "last_success": rfc3339(self.last_success) if self.last_success else None,
                "last_failed": self.last_failed, "last_bytes": self.last_bytes,
                "synced_created": rfc3339(self.synced_created) if self.synced_created else None}


@dataclass(frozen=True)
class VerifyFacts:
    """A volume's validated restores (:mod:`plugin.verify`): when the last one ended and
    whether it passed, when the last one that passed ended."""

    interval: float | None            # verify=, in seconds (None: verified by hand only)
    last: datetime | None
    last_failed: bool                 # failed, or could not run
    last_success: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {"interval": self.interval, "last": rfc3339(self.last) if self.last else None,
                "last_failed": self.last_failed,
                "last_success": rfc3339(self.last_success) if self.last_success else None}


@dataclass(frozen=True)
class VolumeFacts:
    name: str
    created: datetime | None
    snapshots: int
    newest: datetime | None           # the newest snapshot's creation time
    used_bytes: int | None
    quota_bytes: int | None
    interval: float | None            # the schedule's, in seconds
    role: str | None                  # "primary" with standbys, "standby", or None
    targets: tuple[TargetFacts, ...] = ()
    verify: VerifyFacts | None = None  # with verify= or once verified

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "created": rfc3339(self.created) if self.created else None,
                "snapshots": self.snapshots,
                "newest": rfc3339(self.newest) if self.newest else None,
                "used_bytes": self.used_bytes, "quota_bytes": self.quota_bytes,
                "interval": self.interval, "role": self.role,
                "targets": [t.to_json() for t in self.targets],
                "verify": self.verify.to_json() if self.verify is not None else None}


@dataclass(frozen=True)
class Facts:
    """One pass over the storage. *error* says why the storage could not be read (then
    *volumes* is empty and the pool unknown)."""

    at: datetime
    volumes: tuple[VolumeFacts, ...] = ()
    pool_size: int | None = None
    pool_available: int | None = None
    error: str | None = None
    seconds: float = 0.0              # how long the pass took

    def to_json(self) -> dict[str, Any]:
        return {"at": rfc3339(self.at), "volumes": [v.to_json() for v in self.volumes],
                "pool": {"size_bytes": self.pool_size, "available_bytes": self.pool_available},
                "error": self.error}


def _now() -> datetime:
    return datetime.now(timezone.utc)


class Observer:
    """Reads :class:`Facts` from the domain; *roles* (when standbys exist) says which volumes
    are primaries with standbys (and how often they sync) or standbys."""

    def __init__(self, domain: Domain, roles: RoleBook | None = None, *,
                 clock: Callable[[], datetime] = _now) -> None:
        self._domain = domain
        self._roles = roles
        self._clock = clock
        self._guard = threading.Lock()
        self._cached: Facts | None = None
        self._cached_at = 0.0

    def facts(self, max_age: float = 5.0) -> Facts:
        """The facts, read again when the cached ones are older than *max_age* seconds.
        Never raises for the storage: a failure is in :attr:`Facts.error`."""
        with self._guard:       # concurrent scrapes wait for one pass instead of each doing one
            if self._cached is not None and time.monotonic() - self._cached_at <= max_age:
                return self._cached
            started = time.monotonic()
            try:
                facts = self._read()
            except (PluginError, OSError) as exc:
                log.warning("monitoring: cannot read the storage: %s", exc)
                facts = Facts(self._clock(), error=str(exc))
            self._cached = Facts(facts.at, facts.volumes, facts.pool_size, facts.pool_available,
                                 facts.error, time.monotonic() - started)
            self._cached_at = time.monotonic()
            return self._cached

    def _read(self) -> Facts:
        backend = self._domain.backend
        now = self._clock()
        capacity = backend.capacity()
        snapshots = backend.all_snapshots()
        usages = backend.usages()
        roles = self._roles.all() if self._roles is not None else {}
        volumes = []
        for info in sorted(backend.volumes(), key=lambda v: v.name):
            usage = usages.get(info.name)       # none: created while we looked
            used = usage.used_bytes if usage is not None else None
            quota = usage.quota_bytes if usage is not None else None
            listed = snapshots.get(info.name, [])
            created = {s.name: s.created for s in listed}
            schedule = schedule_of(info)
            interval = schedule[0].total_seconds() if schedule is not None else None
            role = roles.get(info.name)
            standbys: dict[str, float] = {}
            if role is not None and role.is_primary:
                standbys = {str(_normal(t)): seconds_of(role.sync) for t in role.standbys}
            replicate = _normal(info.options.get("replicate"))
            targets = []
            records = self._domain.replications.records(info.name) \
                if self._domain.replications is not None else {}
            for target in sorted(set(records) | set(standbys) | ({replicate} - {None})):
                last, ok = records.get(target, (None, None))
                if target in standbys:
                    kind, expected = "standby", standbys[target]
                elif target == replicate:
                    kind, expected = "replicate", interval
                else:
                    kind, expected = "manual", None
                synced = created.get(ok.snapshot) if ok is not None and ok.snapshot else None
                targets.append(TargetFacts(
                    target, kind, expected, last.at if last else None, ok.at if ok else None,
                    bool(last is not None and last.error), ok.bytes if ok else 0,
                    synced or (ok.at if ok else None)))
            volumes.append(VolumeFacts(
                info.name, info.created, len(listed),
                max((s.created for s in listed), default=None), used, quota, interval,
                None if role is None or (role.is_primary and not role.standbys) else role.role,
                tuple(targets), self._verify_facts(info)))
        return Facts(now, tuple(volumes), capacity.size_bytes, capacity.available_bytes)


    def _verify_facts(self, info) -> VerifyFacts | None:
        verifier = self._domain.verifier
        if verifier is None:
            return None
        last, passed = verifier.book.last(info.name), verifier.book.passed(info.name)
        every = info.options.get("verify")
        if every is None and last is None:
            return None
        return VerifyFacts(float(parse_duration(every)) if every else None,
                           _ended(last), last is not None and last.result != PASSED,
                           _ended(passed))


def _ended(result: VerifyResult | None) -> datetime | None:
    return result.started + timedelta(seconds=result.seconds) if result is not None else None


def _normal(target: str | None) -> str | None:
    """A target as the replication records name it (``Target`` normalises the spelling)."""
    if target is None:
        return None
    try:
        return str(Target.parse(target))
    except ValueError:
        return target
