"""The trash (plugin.trash): Remove keeps a volume with its snapshots and records; restore,
purge, expiry, space pressure, and what a kill leaves; on the fake, a real Btrfs and ZFS."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from plugin import names
from plugin.backends.base import VolumeInfo
from plugin.domain import Domain
from plugin.errors import InvalidName, VolumeExists, VolumeNotFound
from plugin.history import AutoHistory, Replication, ReplicationLog
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.trash import TrashedNotFound
from plugin.trash_book import Trashed, TrashBook


def assemble(backend, tmp_path: Path, *, ttl: int = 3600, full: int = 90) -> Domain:
    d = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2),
                        history=AutoHistory(tmp_path / "schedule.json"),
                        replications=ReplicationLog(tmp_path / "replication.json"),
                        trash=TrashBook(tmp_path / "trash.journal"), trash_ttl=ttl, trash_full=full)
    d.volumes.open()
    return d


@pytest.fixture
def domain(backend, tmp_path: Path) -> Domain:
    return assemble(backend, tmp_path)


def write(domain: Domain, volume: str, name: str, data: bytes) -> None:
    path = domain.volumes.mount(volume, "writer")
    (path / name).write_bytes(data)
    os.sync()
    domain.volumes.unmount(volume, "writer")


def read(domain: Domain, volume: str, name: str) -> bytes:
    path = domain.volumes.mount(volume, "reader")
    try:
        return (path / name).read_bytes()
    finally:
        domain.volumes.unmount(volume, "reader")


def test_rm_keeps_the_volume_out_of_sight_and_restore_brings_all_of_it_back(domain, backend):
    domain.volumes.create("db", {"keep": "last=3", "schedule": "1h"})
    write(domain, "db", "f", b"precious")
    domain.volumes.snapshot(["db"], "s1")
    now = datetime.now(timezone.utc)
    domain.replications.record("db", Replication("ssh://b", now, "s1"))

    domain.volumes.remove("db")

    assert "db" not in [v.name for v in domain.volumes.list()]
    with pytest.raises(VolumeNotFound):
        domain.volumes.path("db")
    [entry] = domain.trash.entries()
    assert (entry.name, entry.state) == ("db", "trashed")
    assert names.is_internal(entry.internal)
    assert [v.name for v in backend.internal_volumes()] == [entry.internal]
    with pytest.raises(InvalidName):               # no client can reach it by its name
        domain.volumes.path(entry.internal)

    # the name is free, and a new volume of that name inherits nothing
    domain.volumes.create("db", {})
    assert domain.volumes.snapshots("db") == []
    assert domain.replications.records("db") == {}
    with pytest.raises(VolumeExists, match="--as NEW"):
        domain.trash.restore("db")

    assert domain.trash.restore("db", "db-old") == "db-old"
    assert read(domain, "db-old", "f") == b"precious"
    assert [s.name for s in domain.volumes.snapshots("db-old")] == ["s1"]
    assert domain.volumes.list() and {"db", "db-old"} <= {v.name for v in domain.volumes.list()}
    assert backend.volume("db-old").options == {"keep": "last=3", "schedule": "1h"}
    assert domain.replications.base("db-old", "ssh://b") == "s1"     # its records came back
    assert domain.trash.entries() == [] and backend.internal_volumes() == []


def test_restore_by_id_and_purge_by_name_or_all(domain, backend):
    for name in ("a", "b", "c"):
        domain.volumes.create(name, {})
        domain.volumes.remove(name)
    ids = {e.name: e.id for e in domain.trash.entries()}
    assert domain.trash.restore(ids["a"]) == "a"
    assert domain.trash.purge("b").name == "b"
    assert [e.name for e in domain.trash.entries()] == ["c"]
    with pytest.raises(TrashedNotFound):
        domain.trash.purge("b")
    with pytest.raises(TrashedNotFound):
        domain.trash.restore("nothing-like-it")
    with pytest.raises(InvalidName):
        domain.trash.restore("c", "../x")
    assert [e.name for e in domain.trash.purge_all()] == ["c"]
    assert backend.internal_volumes() == [] and {v.name for v in domain.volumes.list()} == {"a"}


def test_expiry_purges_what_is_older_than_the_ttl(domain, backend):
    domain.volumes.create("old", {})
    domain.volumes.snapshot(["old"], "s1")
    domain.volumes.remove("old")
    domain.volumes.create("young", {})
    domain.volumes.remove("young")
    by_name = {e.name: e for e in domain.trash.entries()}
    old, young = by_name["old"], by_name["young"]
    # neither expired one second before the older would (removed_at has whole seconds, and
    # on a slow pool "young" can be removed seconds after "old")
    assert domain.trash.tidy(old.removed_at + timedelta(seconds=3599)) == []
    # make "old" older than the TTL, as if removed an hour ago
    book = TrashBook(domain.trash._book.path)
    book.put(Trashed(old.id, old.name, old.removed_at - timedelta(hours=2)))
    restarted = assemble(backend, domain.trash._book.path.parent)
    purged = restarted.trash.tidy(young.removed_at + timedelta(seconds=1))
    assert [p.name for p in purged] == ["old"]
    assert [e.name for e in restarted.trash.entries()] == ["young"]
    assert [v.name for v in backend.internal_volumes()] == [young.internal]


def test_trash_off_and_a_ttl_of_zero_destroy_at_once(backend, tmp_path):
    domain = assemble(backend, tmp_path)
    domain.volumes.create("scratch", {"trash": "off"})
    domain.volumes.remove("scratch")
    assert domain.trash.entries() == [] and backend.internal_volumes() == []
    off = assemble(backend, tmp_path, ttl=0)
    off.volumes.create("x", {})
    off.volumes.remove("x")
    assert off.trash.entries() == [] and backend.internal_volumes() == []


def test_past_the_fill_threshold_rm_destroys_and_the_oldest_trashed_go_first(domain, backend,
                                                                              monkeypatch):
    domain.volumes.create("first", {})
    domain.volumes.create("second", {})
    domain.volumes.remove("first")
    [first] = domain.trash.entries()
    # one second later (entries are ordered by removal time, in whole seconds)
    monkeypatch.setattr(domain.trash, "_clock", lambda: first.removed_at + timedelta(seconds=1))
    domain.volumes.remove("second")
    assert [e.name for e in domain.trash.entries()] == ["first", "second"]
    fill = {"percent": 95.0}
    monkeypatch.setattr(domain.trash, "fill_percent", lambda: fill["percent"])
    domain.volumes.create("third", {})             # Create makes room first: oldest first
    left = [e.name for e in domain.trash.entries()]
    assert left in (["second"], [])                # Btrfs frees in the background: one a pass
    domain.volumes.remove("third")                 # past 90 %: destroyed, not kept
    assert "third" not in [e.name for e in domain.trash.entries()]
    purged = domain.trash.tidy()
    assert [p.name for p in purged] == left
    fill["percent"] = 10.0
    domain.volumes.create("fourth", {})
    domain.volumes.remove("fourth")
    assert domain.trash.tidy() == [] and [e.name for e in domain.trash.entries()] == ["fourth"]


def interrupted_move_and_restore(backend, tmp_path: Path) -> tuple[Trashed, Trashed]:
    """What a kill leaves in the journal: volume v (snapshot s1, a replication base) being
    moved into the trash, and trashed volume w being restored as w2; neither rename done.
    Returns the move's intent and w's trash entry."""
    domain = assemble(backend, tmp_path)
    domain.volumes.create("v", {})
    domain.volumes.snapshot(["v"], "s1")
    domain.replications.record("v", Replication("ssh://b", datetime.now(timezone.utc), "s1"))
    domain.volumes.create("w", {})
    domain.volumes.remove("w")
    [w] = domain.trash.entries()
    book = TrashBook(tmp_path / "trash.journal")
    moving = Trashed("0123456789ab", "v", datetime.now(timezone.utc).replace(microsecond=0),
                     state="moving")
    book.put(moving)
    book.put(Trashed(w.id, "w", w.removed_at, state="restoring", restore_as="w2"))
    return moving, w


def test_start_finishes_a_trashing_a_kill_interrupted(backend, tmp_path):
    """The intent was recorded, then the plugin died before the volume moved; and a restore
    killed the same way."""
    moving, w = interrupted_move_and_restore(backend, tmp_path)

    restarted = assemble(backend, tmp_path)
    assert {v.name for v in restarted.volumes.list()} == {"w2"}
    [entry] = restarted.trash.entries()
    assert (entry.id, entry.state) == (moving.id, "trashed")
    restarted.trash.restore("v")
    assert [s.name for s in restarted.volumes.snapshots("v")] == ["s1"]


def test_start_undoes_a_trashing_or_restore_it_cannot_finish(backend, tmp_path, monkeypatch):
    """An interrupted move into the trash, and an interrupted restore, whose rename the
    storage refuses at start (a dataset still busy after the kill: CI's ZFS torture saw it):
    both are undone, each volume stays where it was with its records, and no intent is left
    for a later start to finish behind the back of whoever uses the volume meanwhile."""
    from plugin.errors import BackendError

    moving, w = interrupted_move_and_restore(backend, tmp_path)
    original = backend.rename_volume
    refused = []

    def busy(name, new_name):
        backend.volume(name)                    # a name that is not there: VolumeNotFound
        refused.append((name, new_name))
        raise BackendError(f"cannot rename {name!r}: dataset is busy")

    monkeypatch.setattr(backend, "rename_volume", busy)
    restarted = assemble(backend, tmp_path)
    assert ("v", moving.internal) in refused and (w.internal, "w2") in refused
    monkeypatch.setattr(backend, "rename_volume", original)
    assert {v.name for v in restarted.volumes.list()} == {"v"}
    assert [(e.id, e.state, e.restore_as) for e in restarted.trash.entries()] == [(w.id, "trashed", "")]
    assert restarted.replications.recorded_bases() == {"v": {"ssh://b": "s1"}}
    again = assemble(backend, tmp_path)            # the next start has nothing to finish
    assert {v.name for v in again.volumes.list()} == {"v"}
    assert [s.name for s in again.volumes.snapshots("v")] == ["s1"]
    assert again.trash.restore(w.id) == "w"


def test_a_lost_trash_record_keeps_the_volume_under_an_unknown_name(backend, tmp_path):
    domain = assemble(backend, tmp_path)
    domain.volumes.create("v", {})
    write(domain, "v", "f", b"kept")
    domain.volumes.remove("v")
    (tmp_path / "trash.journal").write_text("{not json\n")
    restarted = assemble(backend, tmp_path)
    [entry] = restarted.trash.entries()
    assert entry.name == ""
    with pytest.raises(InvalidName, match="--as NAME"):
        restarted.trash.restore(entry.id)
    assert restarted.trash.restore(entry.id, "found") == "found"
    assert read(restarted, "found", "f") == b"kept"


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_remove_whose_move_fails_leaves_the_volume_where_it_was(domain, backend, monkeypatch,
                                                                   when):
    """The rename into the trash is refused (a busy dataset), before or after it moved the
    volume: Remove fails, the volume and its records stay, no intent is left for start-up to
    finish (it would lose a volume the user was told was not removed)."""
    from plugin.errors import BackendError

    domain.volumes.create("v", {})
    domain.volumes.snapshot(["v"], "s1")
    domain.replications.record("v", Replication("ssh://b", datetime.now(timezone.utc), "s1"))
    original = backend.rename_volume
    calls = []

    def refused(name, new_name):
        calls.append((name, new_name))
        if len(calls) == 1:
            if when == "after":
                original(name, new_name)
            raise BackendError("cannot rename: dataset is busy")
        return original(name, new_name)
    monkeypatch.setattr(backend, "rename_volume", refused)
    with pytest.raises(BackendError, match="busy"):
        domain.volumes.remove("v")
    assert [v.name for v in domain.volumes.list()] == ["v"]
    assert [s.name for s in domain.volumes.snapshots("v")] == ["s1"]
    assert domain.replications.base("v", "ssh://b") == "s1"
    assert domain.trash.entries() == [] and backend.internal_volumes() == []
    restarted = assemble(backend, domain.trash._book.path.parent)
    assert [v.name for v in restarted.volumes.list()] == ["v"]


def test_a_zfs_clone_is_destroyed_at_once_so_its_origin_stays_free(domain, backend):
    """On ZFS a clone depends on its origin's snapshot: kept in the trash, it would block
    that volume's rollback past the snapshot. Elsewhere a clone is independent, and kept."""
    domain.volumes.create("src", {})
    domain.volumes.snapshot(["src"], "s1")
    domain.volumes.create("copy", {"from": "src@s1"})
    domain.volumes.snapshot(["src"], "s2")
    domain.volumes.remove("copy")
    kept = [e.name for e in domain.trash.entries()]
    assert kept == ([] if backend.kind == "zfs" else ["copy"])
    domain.volumes.rollback("src", "s1", destroy_newer=True)
    assert [s.name for s in domain.volumes.snapshots("src")][:1] == ["s1"]


@pytest.mark.parametrize("backend", ["zfs"], indirect=True)     # only ZFS clones need their origin
def test_a_trashed_origin_zfs_cannot_purge_stays_whole_and_pressure_takes_it_last(
        domain, backend, monkeypatch):
    """ZFS must promote a clone before it destroys the clone's origin, and can refuse (here:
    the clone has a snapshot of the same name; in the crash torture: a full zfs-fuse pool).
    The refused purge changes nothing: the volume stays in the trash, whole, restorable, and
    check finds nothing left over. Space pressure takes volumes no clone needs first."""
    domain.volumes.create("origin", {})
    write(domain, "origin", "data", b"kept")
    domain.volumes.snapshot(["origin"], "s1")
    domain.volumes.create("copy", {"from": "origin@s1"})
    domain.volumes.snapshot(["copy"], "s1")        # `zfs promote copy` now refuses
    domain.volumes.create("plain", {})
    domain.volumes.remove("origin")
    [origin] = domain.trash.entries()
    monkeypatch.setattr(domain.trash, "_clock", lambda: origin.removed_at + timedelta(seconds=1))
    domain.volumes.remove("plain")
    assert [e.name for e in domain.trash.entries()] == ["origin", "plain"]
    monkeypatch.setattr(domain.trash, "fill_percent", lambda: 95.0)
    assert [p.name for p in domain.trash.tidy()] == ["plain"]      # the origin last, refused
    assert [(e.name, e.state) for e in domain.trash.entries()] == [("origin", "trashed")]
    assert domain.checker.check()["problems"] == []
    assert domain.trash.tidy() == []                               # not tried again at once
    monkeypatch.setattr(domain.trash, "fill_percent", lambda: 10.0)
    assert domain.trash.restore("origin") == "origin"
    assert read(domain, "origin", "data") == b"kept"
    assert [s.name for s in domain.volumes.snapshots("origin")] == ["s1"]
    assert read(domain, "copy", "data") == b"kept"


def test_list_shows_every_change_at_once_whatever_it_listed_before(domain, backend):
    """List answers from what it remembers of each volume (BtrfsBackend.listing): a name
    that now holds another volume (made again, rolled back, restored, renamed) must not be
    answered from the one it held before."""
    def listed() -> dict[str, VolumeInfo]:
        return {v.name: v for v in domain.volumes.list()}

    def assert_current() -> None:
        assert listed() == {v.name: v for v in backend.volumes()}

    domain.volumes.create("a", {"mode": "700"})
    domain.volumes.create("b", {})
    domain.volumes.snapshot(["b"], "s1")
    assert listed().keys() == {"a", "b"}

    domain.volumes.remove("a")                   # to the trash
    domain.volumes.create("a", {"mode": "750"})  # the same name, another volume
    assert listed()["a"].options == {"mode": "750"}
    assert_current()

    assert domain.trash.restore("a", "a-old") == "a-old"    # renamed on the way back
    assert listed()["a-old"].options == {"mode": "700"}
    assert_current()

    domain.volumes.remove("a")
    domain.trash.purge(domain.trash.entries()[-1].id)
    assert listed().keys() == {"a-old", "b"}
    domain.volumes.remove("a-old")
    assert domain.trash.restore("a-old", "a") == "a"        # the first one, back as "a"
    assert listed()["a"].options == {"mode": "700"}
    assert_current()

    domain.volumes.rollback("b", "s1")                       # another subvolume on Btrfs
    assert_current()
    domain.volumes.remove("b")
    domain.trash.purge_all()
    assert listed().keys() == {"a"}
