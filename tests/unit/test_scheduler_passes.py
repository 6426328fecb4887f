"""The scheduler at scale (issue 17: a thousand volumes every minute): one pass takes every
due snapshot first, oldest slot first, then prunes; the listing and the history file are
shared by the whole pass; slots keep their phase however late a run was."""

from __future__ import annotations

import time
from datetime import timedelta

import plugin.history
from plugin.errors import BackendError
from plugin.history import AutoHistory, AutoRun
from plugin.scheduler import Scheduler
from tests.unit.test_retention_scheduler import START, World

MINUTE = timedelta(minutes=1)


def test_a_pass_takes_every_due_snapshot_oldest_slot_first_and_prunes_after(tmp_path, monkeypatch):
    world = World(tmp_path)
    for i in range(40):                   # created a second apart, the last first in name order
        world.domain.volumes.create(f"v{39 - i:02d}", {"schedule": "1m", "keep": "last=1"})
        world.now += timedelta(seconds=1)
    for _ in range(2):
        world.tick(MINUTE)                # two runs each: the next one has something to prune
    calls: list[tuple[str, str]] = []
    taken, destroyed = world.backend.create_snapshot, world.backend.destroy_snapshot
    monkeypatch.setattr(world.backend, "create_snapshot",
                        lambda v, s: calls.append(("take", v)) or taken(v, s))
    monkeypatch.setattr(world.backend, "destroy_snapshot",
                        lambda v, s: calls.append(("prune", v)) or destroyed(v, s))
    listings = []
    for name in ("volumes", "listing"):
        real = getattr(world.backend, name)
        monkeypatch.setattr(world.backend, name,
                            lambda real=real, name=name: listings.append(name) or real())
    saves = []
    real_write = plugin.history.write_json_atomically
    monkeypatch.setattr(plugin.history, "write_json_atomically",
                        lambda *a, **k: saves.append(a[0]) or real_write(*a, **k))
    world.scheduler = Scheduler(world.domain.schedules, world.domain.volumes,
                                clock=lambda: world.now, workers=1)   # an order to check

    done = world.tick(MINUTE)

    assert len(done) == 40 and all(isinstance(r, AutoRun) and r.pruned == 1 for r in done.values())
    takes = [v for kind, v in calls if kind == "take"]
    assert takes == [f"v{39 - i:02d}" for i in range(40)]        # by slot: first made, first due
    assert [kind for kind, _ in calls] == ["take"] * 40 + ["prune"] * 40
    assert len(listings) <= 2                                    # not one (or two) per volume
    assert saves == [tmp_path / "schedule.json"]                 # once for the pass
    fresh = AutoHistory(tmp_path / "schedule.json")              # ... holding every run
    assert all(fresh.last(v) == run for v, run in done.items())
    assert all(len(world.names(f"v{i:02d}")) == 1 for i in range(40))


def test_a_late_run_does_not_move_the_next_slot(tmp_path):
    world = World(tmp_path)
    world.domain.volumes.create("db", {"schedule": "1h"})
    late = world.tick(timedelta(hours=1, minutes=20))["db"]      # due 01:30, ran 01:50
    assert late.due == START + timedelta(hours=1) and late.at == world.now
    assert world.domain.status.get("db").status["schedule"]["next"] == "2026-01-01T02:30:00Z"
    assert set(world.tick(timedelta(minutes=40))) == {"db"}      # 02:30 as promised, not 02:50
    world.start()                                                # the slot survives a restart
    assert world.tick(timedelta(minutes=59)) == {}
    assert set(world.tick(timedelta(minutes=1))) == {"db"}       # 03:30


def test_after_a_long_stop_one_run_for_the_newest_slot_then_the_cadence_resumes(tmp_path):
    world = World(tmp_path)
    world.domain.volumes.create("db", {"schedule": "1h"})
    world.tick()                                                 # 01:30
    run = world.tick(timedelta(hours=5, minutes=10))["db"]       # 06:40: 02:30..06:30 missed
    assert run.due == START + timedelta(hours=6)                 # the newest missed slot
    assert world.tick(timedelta(minutes=49)) == {}               # 07:29
    assert set(world.tick(timedelta(minutes=1))) == {"db"}       # 07:30
    assert len(world.names("db")) == 3


def test_each_snapshot_is_stamped_with_the_time_it_was_taken(tmp_path):
    """The clock moves while a pass works: each run records (and is named after) its own
    time, and the lateness reported is that time minus its slot."""
    world = World(tmp_path)
    for name in ("aa", "bb", "cc"):
        world.domain.volumes.create(name, {"schedule": "1m"})
    seen = []
    clock = {"now": START + MINUTE}

    def ticking():
        clock["now"] += timedelta(seconds=2)
        return clock["now"]

    scheduler = Scheduler(world.domain.schedules, world.domain.volumes, clock=ticking,
                          lateness=seen.append, workers=1)
    world.now = START + MINUTE
    done = scheduler.run_once(START + MINUTE)
    ats = [done[n].at for n in ("aa", "bb", "cc")]
    assert ats == [START + MINUTE + timedelta(seconds=2 * k) for k in (1, 2, 3)]
    assert all(done[n].due == START + MINUTE for n in done)
    assert seen == [2.0, 4.0, 6.0]
    assert world.names("cc") == ["auto-20260101T003106Z"]


def test_history_batched_saves_once_and_keeps_the_slot(tmp_path, monkeypatch):
    history = AutoHistory(tmp_path / "schedule.json")
    saves = []
    real_write = plugin.history.write_json_atomically
    monkeypatch.setattr(plugin.history, "write_json_atomically",
                        lambda *a, **k: saves.append(1) or real_write(*a, **k))
    with history.batched(every=3600):
        for i in range(100):
            history.record(f"v{i}", AutoRun(START + MINUTE, f"auto-{i}", due=START))
        assert saves == []
    assert len(saves) == 1                                        # at the end of the block
    history.record("v0", AutoRun(START, "auto-x"))                # outside: saved at once
    assert len(saves) == 2
    again = AutoHistory(tmp_path / "schedule.json")
    assert again.last("v99") == AutoRun(START + MINUTE, "auto-99", due=START)
    assert again.last("v0") == AutoRun(START, "auto-x")           # no slot: old records too


def test_snapshots_are_taken_several_at_once_all_before_the_prunes(tmp_path, monkeypatch):
    """A pass's snapshots run on a few threads (Btrfs commits concurrent ones together);
    every one is taken, each once, before any prune; a failing one is that volume's error."""
    import threading
    world = World(tmp_path)
    for i in range(30):
        world.domain.volumes.create(f"v{i:02d}", {"schedule": "1m", "keep": "last=1"})
    world.tick(MINUTE)
    calls, threads = [], set()
    taken, destroyed = world.backend.create_snapshot, world.backend.destroy_snapshot

    def take(volume, snapshot):
        threads.add(threading.current_thread().name)
        calls.append(("take", volume))
        time.sleep(0.005)                       # as a commit would: the others start meanwhile
        if volume == "v07":
            raise BackendError("cannot snapshot v07: disk on fire")
        return taken(volume, snapshot)

    monkeypatch.setattr(world.backend, "create_snapshot", take)
    monkeypatch.setattr(world.backend, "destroy_snapshot",
                        lambda v, s: calls.append(("prune", v)) or destroyed(v, s))
    done = world.tick(MINUTE)
    assert sorted(v for kind, v in calls if kind == "take") == [f"v{i:02d}" for i in range(30)]
    assert [kind for kind, _ in calls] == ["take"] * 30 + ["prune"] * 29
    assert len(threads) > 1 and all(t.startswith("snapvol-snapshot") for t in threads)
    assert isinstance(done["v07"], BackendError) and done["v08"].pruned == 1
    last = world.domain.status.get("v07").status["schedule"]["last"]
    assert last["result"] == "failed" and "disk on fire" in last["error"]


def test_a_volume_removed_while_a_pass_runs_is_not_recorded_again(tmp_path, monkeypatch):
    """Removed between the pass's listing and its snapshot: the run fails, and the history
    (which Remove cleared) does not get the volume back."""
    world = World(tmp_path)
    for name in ("aa", "bb"):
        world.domain.volumes.create(name, {"schedule": "1m"})
    schedules = world.domain.schedules
    listed = schedules.schedules

    def listing_then_remove(survey=None):
        found = listed(survey)
        world.domain.volumes.remove("bb")
        return found

    monkeypatch.setattr(schedules, "schedules", listing_then_remove)
    done = world.tick(MINUTE)
    assert isinstance(done["aa"], AutoRun) and isinstance(done["bb"], Exception)
    assert schedules.history.volumes() == {"aa"}


def test_a_volume_removed_between_its_snapshot_and_its_prune_is_not_recorded_again(tmp_path,
                                                                                   monkeypatch):
    world = World(tmp_path)
    for name in ("aa", "bb"):
        world.domain.volumes.create(name, {"schedule": "1m", "keep": "last=1"})
    schedules = world.domain.schedules
    prune_after = schedules.prune_after

    def remove_then_prune(volume, run, **kwargs):
        if volume == "bb":
            world.domain.volumes.remove("bb")
        return prune_after(volume, run, **kwargs)

    monkeypatch.setattr(schedules, "prune_after", remove_then_prune)
    world.tick(MINUTE)
    assert schedules.history.volumes() == {"aa"}


def test_a_burst_of_changes_makes_few_passes_not_one_per_change(tmp_path, monkeypatch):
    """Each Create of a scheduled volume wakes the loop; 200 of them over ~1 s used to run a
    pass (a listing of every volume) after nearly each one. Now the loop waits until the
    changes stop (or MAX_SETTLE), and a pass comes at most every MAX_SETTLE seconds."""
    monkeypatch.setattr("plugin.scheduler.MAX_SETTLE", 0.5)
    world = World(tmp_path)
    passes = []
    real = world.scheduler.run_once
    monkeypatch.setattr(world.scheduler, "run_once", lambda now: passes.append(time.monotonic()) or real(now))
    world.scheduler.start()
    try:
        deadline = time.monotonic() + 5
        while not passes and time.monotonic() < deadline:      # the first pass, at start
            time.sleep(0.01)
        started = time.monotonic()
        for i in range(200):
            world.domain.volumes.create(f"v{i:03d}", {"schedule": "1h"})
            time.sleep(0.005)
        ended = time.monotonic()
        deadline = ended + 5
        while not any(t > ended for t in passes) and time.monotonic() < deadline:
            time.sleep(0.01)                                    # the last change is seen
        during = [t for t in passes if started < t <= ended]
        assert any(t > ended for t in passes)
        assert len(during) <= (ended - started) / 0.5 + 2, (len(during), ended - started)
    finally:
        world.scheduler.stop()
