"""``snapvol check --freshness``: are the snapshots, replicas and the pool what a schedule
promises? Judged the way sanoid's ``--monitor-snapshots`` is for Nagios: OK (0), WARN (1) or
CRIT (2), one line per problem.

Pure (stdlib only): :func:`assess` takes the facts as the ``Snapvol.Freshness`` endpoint
answers them (:meth:`plugin.observe.Facts.to_json`) and the thresholds, and the CLI prints
what it finds. Ages are judged in multiples of each volume's own interval, so one set of
thresholds fits a ``schedule=30s`` and a ``schedule=1d`` alike.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime
from typing import Any


class Level(enum.IntEnum):
    """Nagios plugin exit codes."""

    OK = 0
    WARN = 1
    CRIT = 2
    UNKNOWN = 3


@dataclass(frozen=True)
class Thresholds:
    """*age*: a scheduled volume's newest snapshot older than this many intervals;
    *lag*: a replica (``replicate=`` target or standby) whose data is older than this many
    intervals (it is about one interval behind by design); *pool*: percent of the pool used."""

    warn_age: float = 1.5
    crit_age: float = 3.0
    warn_lag: float = 2.0
    crit_lag: float = 4.0
    warn_pool: float = 80.0
    crit_pool: float = 90.0

    def check(self) -> None:
        """:raises ValueError: a CRIT threshold below its WARN one, or out of range."""
        for name in ("age", "lag", "pool"):
            warn, crit = getattr(self, f"warn_{name}"), getattr(self, f"crit_{name}")
            if not 0 < warn <= crit:
                raise ValueError(f"--warn-{name} must be above 0 and at most --crit-{name}")
        if self.crit_pool > 100:
            raise ValueError("--crit-pool is a percentage (at most 100)")


@dataclass(frozen=True)
class Finding:
    level: Level
    kind: str          # "snapshot age" | "verification" | "replication lag" | "pool" | "storage"
    what: str

    def line(self) -> str:
        return f"{self.level.name} {self.kind}: {self.what}"


def human(seconds: float) -> str:
    """12s, 5m, 3h10m, 2d4h: a duration as people read it in an alert line."""
    seconds = int(round(seconds))
    for unit, size, sub, sub_size in (("d", 86400, "h", 3600), ("h", 3600, "m", 60)):
        if seconds >= size:
            rest = (seconds % size) // sub_size
            return f"{seconds // size}{unit}" + (f"{rest}{sub}" if rest else "")
    return f"{seconds // 60}m" if seconds >= 60 else f"{seconds}s"


def _time(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text.replace("Z", "+00:00")) if text else None


def _judge(age: float, interval: float, warn: float, crit: float) -> Level:
    if age > crit * interval:
        return Level.CRIT
    if age > warn * interval:
        return Level.WARN
    return Level.OK


def assess(facts: dict[str, Any], limits: Thresholds) -> list[Finding]:
    """Every problem in *facts* (``Facts.to_json()``), worst first.

    * a scheduled volume whose newest snapshot (or, without one, its creation) is older than
      ``warn_age``/``crit_age`` intervals; standbys are left out (their primary snapshots);
    * a volume whose last validated restore failed, or with ``verify=``, whose last passed
      one is older than ``warn_age``/``crit_age`` intervals;
    * a ``replicate=`` target or a standby whose copy was taken longer ago than
      ``warn_lag``/``crit_lag`` intervals (never synced: counted from the volume's creation);
      targets replicated to by hand have no cadence and are not judged;
    * the pool used beyond ``warn_pool``/``crit_pool`` percent;
    * storage that could not be read at all: CRIT.
    """
    found: list[Finding] = []
    if facts.get("error"):
        return [Finding(Level.CRIT, "storage", f"cannot be read: {facts['error']}")]
    now = _time(facts["at"])
    assert now is not None
    for volume in facts.get("volumes", []):
        name, created = volume["name"], _time(volume.get("created"))
        interval = volume.get("interval")
        if interval and volume.get("role") != "standby":
            what = "newest snapshot" if volume.get("newest") else "no snapshot yet, created"
            found += _age("snapshot age", f"volume {name}: {what}", "schedule every",
                          _time(volume.get("newest")) or created, now, interval, limits)
        found += _verification(name, created, volume.get("verify"), now, limits)
        for target in volume.get("targets", []):
            expected = target.get("interval")
            if not expected:
                continue
            since = _time(target.get("synced_created")) or created
            if since is None:
                continue
            lag = (now - since).total_seconds()
            level = _judge(lag, expected, limits.warn_lag, limits.crit_lag)
            if level:
                state = "never synced" if not target.get("last_success") else f"{human(lag)} behind"
                failing = ", its last attempt failed" if target.get("last_failed") else ""
                found.append(Finding(level, "replication lag", (
                    f"volume {name} -> {target['kind']} {target['target']}: {state}{failing} "
                    f"(every {human(expected)}; warn after {human(limits.warn_lag * expected)}, "
                    f"crit after {human(limits.crit_lag * expected)})")))
    pool = facts.get("pool") or {}
    size, available = pool.get("size_bytes"), pool.get("available_bytes")
    if size and available is not None:
        percent = 100.0 * (size - available) / size
        level = (Level.CRIT if percent >= limits.crit_pool
                 else Level.WARN if percent >= limits.warn_pool else Level.OK)
        if level:
            found.append(Finding(level, "pool", (
                f"{percent:.0f}% used, {available >> 20} MiB of {size >> 20} MiB free "
                f"(warn at {limits.warn_pool:g}%, crit at {limits.crit_pool:g}%)")))
    return sorted(found, key=lambda f: -f.level)


def _verification(name: str, created: datetime | None, verify: dict[str, Any] | None,
                  now: datetime, limits: Thresholds) -> list[Finding]:
    """A volume's validated restores: its last one failed (WARN: the newest restore point
    did not pass; the one kept is older), or with ``verify=``, none passed for longer than
    ``warn_age``/``crit_age`` intervals (never: counted from the volume's creation)."""
    if not verify:
        return []
    found = []
    if verify.get("last_failed"):
        found.append(Finding(Level.WARN, "verification", (
            f"volume {name}: its last validated restore did not pass (snapvol status and "
            f"docker volume inspect: Status.verify.last)")))
    if verify.get("interval"):
        what = "last passed" if verify.get("last_success") else "none passed yet, created"
        found += _age("verification", f"volume {name}: validated restore {what}", "verify every",
                      _time(verify.get("last_success")) or created, now, verify["interval"],
                      limits)
    return found


def _age(kind: str, subject: str, cadence: str, since: datetime | None, now: datetime,
         interval: float, limits: Thresholds) -> list[Finding]:
    """A finding when *since* lies more than ``warn_age``/``crit_age`` *interval*s back."""
    if since is None:
        return []
    age = (now - since).total_seconds()
    level = _judge(age, interval, limits.warn_age, limits.crit_age)
    if not level:
        return []
    return [Finding(level, kind, (
        f"{subject} {human(age)} ago, {cadence} {human(interval)} (warn after "
        f"{human(limits.warn_age * interval)}, crit after {human(limits.crit_age * interval)})"))]


def summary(facts: dict[str, Any], findings: list[Finding]) -> tuple[Level, list[str]]:
    """The exit level and the lines to print: one per problem, or one OK line."""
    if not findings:
        volumes = facts.get("volumes", [])
        scheduled = sum(1 for v in volumes if v.get("interval"))
        targets = sum(1 for v in volumes for t in v.get("targets", []) if t.get("interval"))
        return Level.OK, [f"OK: {scheduled} scheduled volume(s) fresh, {targets} replica(s) "
                          "within their lag, pool below its thresholds"]
    return max(f.level for f in findings), [f.line() for f in findings]
