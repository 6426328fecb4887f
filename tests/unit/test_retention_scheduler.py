"""Retention (a pure function) and the scheduler's tick, with an injected clock.

The storage here is the fake backend (snapshots are directories); the same domain code runs
on real Btrfs and ZFS in the integration and e2e tiers, where a real schedule is taken by a
running plugin.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from plugin.backends.base import SnapshotInfo
from plugin.errors import BackendError, InvalidName, VolumeNotFound
from plugin.history import AutoHistory
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.retention import Policy, plan
from plugin.scheduler import Scheduler
from plugin.domain import Domain
from tests.fakes import FakeBackend

START = datetime(2026, 1, 1, 0, 30, tzinfo=timezone.utc)
HOUR = timedelta(hours=1)


def snaps(*times: datetime) -> list[SnapshotInfo]:
    return [SnapshotInfo("v", "auto-" + t.strftime("%Y%m%dT%H%M%SZ"), t, str(i))
            for i, t in enumerate(times)]


def kept(decisions) -> list[str]:
    return [d.snapshot.name for d in decisions if d.keep]


# ---------------------------------------------------------------------- the policy language

def test_policy_parse_and_text_round_trip():
    policy = Policy.parse("last=3 within=2d, 24h 7d 4w 12m 2y")
    assert policy.keep_last == 3 and policy.keep_within == timedelta(days=2)
    assert policy.per_period == {"h": 24, "d": 7, "w": 4, "m": 12, "y": 2}
    assert Policy.parse(str(policy)) == policy


@pytest.mark.parametrize("text", ["", "7", "7x", "last=", "last=-1", "within=2", "h24", "7d 8d",
                                  "last=1 last=2", "1000000d", "within=0s", "7d;rm -rf /"])
def test_policy_refuses_with_the_grammar(text):
    with pytest.raises(ValueError, match="last=N, within=DURATION"):
        Policy.parse(text)


# ---------------------------------------------------------------------- plan()

def test_first_snapshot_of_each_period_is_kept_and_the_newest_always():
    times = [START.replace(minute=0) + i * timedelta(minutes=20) for i in range(9)]  # 3 per hour
    decisions = plan(snaps(*times), Policy.parse("2h"), now=times[-1])
    assert [d.keep for d in decisions] == [False, False, False,         # hour 00 is the 3rd newest
                                           True, False, False,
                                           True, False, True]           # ...and the newest
    assert decisions[3].reasons == ("h:2026-01-01T01",)
    assert decisions[-1].reasons == ("newest",)


def test_last_within_and_protected():
    times = [START + i * HOUR for i in range(10)]
    decisions = plan(snaps(*times), Policy.parse("last=2 within=3h"), now=times[-1],
                     protected=frozenset({snaps(*times)[0].name}))
    assert [d.reasons for d in decisions] == [
        ("protected",), (), (), (), (), (), (), ("within",), ("last", "within"),
        ("newest", "last", "within")]


def test_periods_follow_the_given_time_zone_across_dst():
    paris = ZoneInfo("Europe/Paris")
    # 2026-03-29: clocks go from 02:00 to 03:00 in Paris; hourly UTC snapshots around it
    times = [datetime(2026, 3, 28, 20, 0, tzinfo=timezone.utc) + i * HOUR for i in range(8)]
    utc_days = kept(plan(snaps(*times), Policy.parse("2d"), now=times[-1]))
    paris_days = kept(plan(snaps(*times), Policy.parse("2d"), now=times[-1], tz=paris))
    assert utc_days[0] == "auto-20260328T200000Z"           # 28th in UTC; 29th starts at 00:00Z
    assert "auto-20260329T000000Z" in utc_days
    assert "auto-20260328T230000Z" in paris_days             # 00:00 on the 29th in Paris (UTC+1)
    assert "auto-20260329T000000Z" not in paris_days


def test_no_snapshots_no_decisions():
    assert plan([], Policy.parse("7d"), now=START) == []


# ---------------------------------------------------------------------- the scheduler

class World:
    """A domain on the fake backend with a movable clock, restartable like the plugin."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.backend = FakeBackend(tmp / "storage")
        self.backend.check()
        self.now = START
        self.backend.clock = lambda: self.now
        self.start()

    def start(self) -> None:
        self.domain = Domain.assemble(self.backend, MountTable(self.tmp / "mounts.json"),
                                      VolumeLocks(2.0),
                                      history=AutoHistory(self.tmp / "schedule.json"))
        self.scheduler = Scheduler(self.domain.schedules, self.domain.volumes,
                                   clock=lambda: self.now)

    def tick(self, step: timedelta = HOUR) -> dict:
        self.now += step
        return self.scheduler.run_once(self.now)

    def names(self, volume: str) -> list[str]:
        return [s.name for s in self.domain.volumes.snapshots(volume)]


def year_of_hourly_ticks(tmp: Path, restart_at: int | None) -> tuple[World, list[datetime]]:
    world = World(tmp)
    world.domain.volumes.create("db", {"schedule": "1h", "keep": "24h,7d,4w,12m"})
    world.domain.volumes.create("plain", {})
    ticks = []
    for hour in range(1, 365 * 24 + 1):
        if hour == restart_at:
            world.start()               # a new process: the history comes from the file
        done = world.tick()
        assert set(done) == {"db"}, (hour, done)
        ticks.append(world.now)
        if hour == 100 * 24:
            world.domain.volumes.snapshot(["db"], "before-upgrade")
    return world, ticks


def test_a_year_of_hourly_ticks_keeps_exactly_what_the_policy_promises(tmp_path):
    world, ticks = year_of_hourly_ticks(tmp_path / "a", restart_at=None)
    names = world.names("db")
    autos = {n for n in names if n.startswith("auto-")}

    def first_of(key, count):
        firsts: dict = {}
        for t in ticks:
            firsts.setdefault(key(t), t)
        return [firsts[k] for k in sorted(firsts)[-count:]]

    hours = ticks[-24:]
    days = first_of(lambda t: t.date(), 7)
    weeks = first_of(lambda t: t.isocalendar()[:2], 4)
    months = first_of(lambda t: (t.year, t.month), 12)
    expected = {"auto-" + t.strftime("%Y%m%dT%H%M%SZ") for t in hours + days + weeks + months}
    assert autos == expected
    assert len(hours) == 24 and len(days) == 7 and len(weeks) == 4 and len(months) == 12
    assert "auto-20260201T003000Z" in autos and "auto-20260101T013000Z" not in autos
    assert "before-upgrade" in names                              # manual: never pruned
    assert world.names("plain") == []                             # no schedule, no snapshots
    status = world.domain.status.get("db").status["schedule"]
    assert status["last"]["snapshot"] == "auto-20270101T003000Z"
    assert status["last"]["result"] == "ok" and status["next"] == "2027-01-01T01:30:00Z"

    restarted, _ = year_of_hourly_ticks(tmp_path / "b", restart_at=180 * 24 + 7)
    assert restarted.names("db") == names                          # a restart changes nothing


def test_a_restart_neither_skips_nor_fires_everything(tmp_path):
    world = World(tmp_path)
    world.domain.volumes.create("db", {"schedule": "6h"})
    assert world.tick(timedelta(hours=5)) == {}                    # due 6 h after creation
    assert set(world.tick()) == {"db"}
    world.start()                                                  # restart 1 h later
    assert world.tick() == {} and world.tick(timedelta(hours=4)) == {}
    assert set(world.tick()) == {"db"}                             # 6 h after the last run
    world.start()
    assert set(world.tick(timedelta(days=3))) == {"db"}            # down for 3 days: one run
    assert world.tick(timedelta(minutes=1)) == {}
    assert len(world.names("db")) == 3


def test_a_damaged_history_keeps_the_cadence_from_the_snapshots(tmp_path):
    """schedule.json truncated (or lost): the plugin starts, and the last run is read back
    from the newest automatic snapshot, so it neither fires at once nor loses the cadence."""
    world = World(tmp_path)
    world.domain.volumes.create("db", {"schedule": "6h"})
    world.tick(timedelta(hours=6))                                  # auto- at 06:30
    (tmp_path / "schedule.json").write_text('{"db": {"at": "2026-')  # cut short
    world.start()
    assert world.tick() == {} and world.tick(timedelta(hours=4)) == {}
    assert set(world.tick()) == {"db"}                               # 6 h after the last run
    assert world.domain.status.get("db").status["schedule"]["next"] == "2026-01-01T18:30:00Z"
    assert list(tmp_path.glob("schedule.json.corrupt-*"))


def test_one_failing_volume_never_stops_the_others(tmp_path, monkeypatch):
    world = World(tmp_path)
    for name in ("aa", "bb", "cc"):
        world.domain.volumes.create(name, {"schedule": "1h"})
    real = world.backend.create_snapshot

    def broken(volume, snapshot):
        if volume == "bb":
            raise BackendError("cannot snapshot bb: disk on fire")
        return real(volume, snapshot)

    monkeypatch.setattr(world.backend, "create_snapshot", broken)
    done = world.tick()
    assert isinstance(done["bb"], BackendError)
    assert world.names("aa") and world.names("cc") and world.names("bb") == []
    last = world.domain.status.get("bb").status["schedule"]["last"]
    assert last["result"] == "failed" and "disk on fire" in last["error"]
    assert world.tick(timedelta(minutes=30)) == {}                 # no hammering: next in 1 h


def test_prune_reports_each_decision_and_dry_run_deletes_nothing(tmp_path):
    world = World(tmp_path)
    world.domain.volumes.create("db", {"schedule": "1h", "keep": "last=2"})
    world.domain.volumes.create("nosched", {})
    world.tick()
    first = world.names("db")[0]
    world.domain.volumes.create("copy", {"from": f"db@{first}"})   # a clone protects its origin
    for _ in range(4):
        world.tick()
    names = world.names("db")
    assert len(names) == 3 and names[0] == first              # the runs pruned the others
    now, world.now = world.now, datetime(2020, 1, 1, tzinfo=timezone.utc)
    world.backend.create_snapshot("db", "auto-20200101T000000Z")   # an old one to drop
    world.backend.create_snapshot("db", "manual-x")                # never considered
    world.now = now
    dry = world.domain.schedules.prune("db", now=world.now, dry_run=True)
    assert [(d["snapshot"], d["keep"], d["reasons"]) for d in dry] == [
        ("auto-20200101T000000Z", False, []), (first, True, ["protected"]),
        (names[1], True, ["last"]), (names[2], True, ["newest", "last"])]
    assert len(world.names("db")) == 5
    done = world.domain.schedules.prune(now=world.now)
    assert [d["snapshot"] for d in done if not d["keep"]] == ["auto-20200101T000000Z"]
    assert world.names("db") == ["manual-x", *names]
    assert world.domain.schedules.prune("nosched", now=world.now) == []
    with pytest.raises(VolumeNotFound):
        world.domain.schedules.prune("ghost", now=world.now)


def test_automatic_names_are_reserved(tmp_path):
    world = World(tmp_path)
    world.domain.volumes.create("db", {})
    with pytest.raises(InvalidName, match="reserved"):
        world.domain.volumes.snapshot(["db"], "auto-20260101T000000Z")


def test_a_replicated_volume_is_pruned_after_its_replication_and_never_loses_the_base(tmp_path):
    """Pruning waits for the replication, so the snapshot the target now holds is recorded
    first; when replication.json is lost and the target is down, nothing is pruned (the
    target's newest snapshot may be any of them) until a replication succeeds again."""
    from plugin.history import Replication, ReplicationLog

    class Target:
        """A replicator whose target is up or down; runs its jobs at once."""
        up = True

        def __init__(self, log: ReplicationLog) -> None:
            self.log = log

        def submit(self, volume, target, snapshot, then=None):
            if self.up:
                self.log.record(volume, Replication(target, world.now, snapshot))
            if then is not None:       # (before this change, pruning came first)
                then(self.up)

        def base_known(self, volume, target):
            return self.log.base(volume, target) is not None

    world = World(tmp_path)
    target = Target(ReplicationLog(tmp_path / "replication.json"))

    def start(log: ReplicationLog) -> None:
        target.log = log
        world.domain = Domain.assemble(world.backend, MountTable(tmp_path / "mounts.json"),
                                       VolumeLocks(2.0), replications=log,
                                       history=AutoHistory(tmp_path / "schedule.json"))
        world.scheduler = Scheduler(world.domain.schedules, world.domain.volumes,
                                    clock=lambda: world.now, replicator=target)
    start(target.log)
    world.domain.volumes.create("db", {"schedule": "1h", "keep": "last=1",
                                       "replicate": "unix:///run/b.sock"})
    world.tick(), world.tick()
    base = target.log.base("db", "unix:///run/b.sock")
    assert world.names("db") == [base]                     # the older one went, after

    (tmp_path / "replication.json").unlink()                       # the record is lost
    start(ReplicationLog(tmp_path / "replication.json"))
    target.up = False
    world.tick(), world.tick()
    assert world.names("db")[0] == base and len(world.names("db")) == 3   # nothing pruned
    assert world.domain.status.get("db").status["schedule"]["last"]["pruned"] == 0
    target.up = True
    world.tick()
    assert world.names("db") == [target.log.base("db", "unix:///run/b.sock")]
