"""Retention of automatic snapshots: a pure function of (snapshots, policy, now, protected).

Policy text (volume option ``keep``): tokens separated by commas or spaces,

* ``last=N``     always keep the newest N,
* ``within=DUR`` keep everything younger than DUR (``36h``, ``2d``, ``1w``),
* ``Nh Nd Nw Nm Ny`` keep the *first* snapshot of each of the last N hours, days, ISO weeks,
  months or years that contain a snapshot.

The first snapshot of a period is the one kept for it (btrbk's choice), so a decision never
changes as newer snapshots arrive; N counts periods that hold a snapshot (borg's choice), so a
week of downtime does not erase older history. The newest snapshot is always kept (btrbk does
the same): it is the latest restore point and the likely base of the next replication.
Periods are calendar periods in UTC unless another ``tz`` is given.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo

from .backends.base import SnapshotInfo
from .units import parse_duration

PERIODS: dict[str, Callable[[datetime], str]] = {     # unit -> calendar bucket of a time
    "h": lambda t: t.strftime("%Y-%m-%dT%H"),
    "d": lambda t: t.strftime("%Y-%m-%d"),
    "w": lambda t: t.strftime("%G-W%V"),               # ISO week, Monday start
    "m": lambda t: t.strftime("%Y-%m"),
    "y": lambda t: t.strftime("%Y"),
}
GRAMMAR = ("last=N, within=DURATION (e.g. 2d) and Nh Nd Nw Nm Ny (first snapshot of each of the "
           "last N hours/days/weeks/months/years), separated by commas or spaces, "
           "e.g. keep=24h,7d,4w,12m")
MAX_COUNT = 100_000
_PERIOD_TOKEN = re.compile(r"(\d+)([hdwmy])")


@dataclass(frozen=True)
class Policy:
    keep_last: int = 0
    keep_within: timedelta = timedelta(0)
    per_period: dict[str, int] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> Policy:
        """:raises ValueError: an unknown or repeated token, or a count out of range; the
        message carries the grammar."""
        tokens = [t for t in re.split(r"[\s,]+", text.strip()) if t]
        if not tokens:
            raise ValueError(f"empty policy; use {GRAMMAR}")
        last, within, periods = 0, timedelta(0), {}
        seen: set[str] = set()
        for token in tokens:
            key = token.partition("=")[0] if "=" in token else token[-1:]
            if key in seen:
                raise ValueError(f"{token!r:.40} repeats {key!r}; use {GRAMMAR}")
            seen.add(key)
            try:
                if token.startswith("last="):
                    last = _count(token[5:])
                elif token.startswith("within="):
                    within = timedelta(seconds=parse_duration(token[7:]))
                    if not within:
                        raise ValueError("zero")
                elif match := _PERIOD_TOKEN.fullmatch(token):
                    periods[match.group(2)] = _count(match.group(1))
                else:
                    raise ValueError("unknown")
            except ValueError:
                raise ValueError(f"bad token {token!r:.40}; use {GRAMMAR}") from None
        return cls(last, within, periods)

    def __str__(self) -> str:
        parts = [f"last={self.keep_last}"] if self.keep_last else []
        if self.keep_within:
            parts.append(f"within={_duration_text(self.keep_within)}")
        parts += [f"{count}{unit}" for unit, count in self.per_period.items()]
        return ",".join(parts)


def _count(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_COUNT:
        raise ValueError("count")
    return int(text)


def _duration_text(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    for unit, size in (("w", 604800), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


@dataclass(frozen=True)
class Decision:
    snapshot: SnapshotInfo
    keep: bool
    reasons: tuple[str, ...]            # e.g. ("newest",), ("d:2026-03-09", "w:2026-W10")


def plan(snapshots: Iterable[SnapshotInfo], policy: Policy, *, now: datetime,
         tz: tzinfo = timezone.utc, protected: frozenset[str] = frozenset()) -> list[Decision]:
    """Keep or delete each snapshot, oldest first, with every reason that keeps it.

    Callers feed only automatic snapshots; *protected* names (a clone's origin, a
    replication base, a snapshot being sent) are always kept.
    """
    ordered = sorted(snapshots, key=lambda s: s.created)
    why: dict[str, list[str]] = {s.name: [] for s in ordered}
    if ordered:
        why[ordered[-1].name].append("newest")
    for s in ordered[len(ordered) - policy.keep_last:] if policy.keep_last else ():
        why[s.name].append("last")
    for s in ordered:
        if policy.keep_within and now - s.created < policy.keep_within:
            why[s.name].append("within")
        if s.name in protected:
            why[s.name].append("protected")
    for unit, count in policy.per_period.items():
        firsts: dict[str, SnapshotInfo] = {}
        for s in ordered:
            firsts.setdefault(PERIODS[unit](s.created.astimezone(tz)), s)
        for bucket in sorted(firsts)[-count:]:
            why[firsts[bucket].name].append(f"{unit}:{bucket}")
    return [Decision(s, bool(why[s.name]), tuple(why[s.name])) for s in ordered]
