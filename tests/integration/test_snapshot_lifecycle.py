"""Every snapshot snapvol takes for itself goes when nothing needs it (issue 13, defect 6):
clone origins, send snapshots, and what a crash left of them, on the fake, Btrfs and ZFS."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from plugin.domain import Domain
from plugin.history import Replication, ReplicationLog
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from tests.fakes import FakeBackend
from tests.integration.receiving import receive_incremental


@pytest.fixture
def domain(backend, tmp_path: Path) -> Domain:
    d = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2),
                        replications=ReplicationLog(tmp_path / "replication.json"))
    d.volumes.open()
    return d


def rows(domain: Domain, volume: str) -> list[tuple[str, str, str | None]]:
    """(name, owner, kept for) of each snapshot, by name (several are taken in one second)."""
    return sorted((r["name"], r["owner"], r["kept_for"]) for r in domain.status.snapshots(volume))


def test_a_clone_of_a_volume_keeps_its_origin_snapshot_only_while_it_needs_it(domain, backend):
    domain.volumes.create("v1", {})
    (domain.volumes.mount("v1", "m1") / "f").write_text("data")
    domain.volumes.create("c1", {"from": "v1"})
    listed = rows(domain, "v1")
    if backend.clones_need_origin:          # ZFS: the clone depends on it
        assert len(listed) == 1 and listed[0][0].startswith("clone-c1-"), listed
        assert listed[0][1:] == ("clone c1", "origin of clone c1")
    else:                                   # Btrfs: a clone shares nothing with its origin
        assert listed == []
    assert domain.checker.check()["problems"] == []
    domain.volumes.remove("c1")
    assert rows(domain, "v1") == []
    domain.volumes.create("c1", {"from": "v1"})        # the name again: a fresh origin
    assert (domain.volumes.mount("c1", "m2") / "f").read_text() == "data"
    domain.volumes.unmount("c1", "m2")
    domain.volumes.remove("c1")
    assert rows(domain, "v1") == []


def test_a_clone_of_a_named_snapshot_leaves_that_snapshot_to_its_user(domain):
    domain.volumes.create("v1", {})
    domain.volumes.snapshot(["v1"], "s1")
    domain.volumes.create("c1", {"from": "v1@s1"})
    assert rows(domain, "v1") == [("s1", "user", "origin of clone c1")]
    domain.volumes.remove("c1")
    assert rows(domain, "v1") == [("s1", "user", None)]


def test_send_keeps_only_the_newest_snapshot_it_took(domain):
    domain.volumes.create("v1", {})
    domain.volumes.snapshot(["v1"], "mine")
    first = domain.transfers.send("v1")
    assert b"".join(first)                              # the whole stream: complete
    taken = first.header["snapshot"]
    assert rows(domain, "v1") == [("mine", "user", None), (taken, "send", None)]
    second = domain.transfers.send("v1", since=taken)
    assert rows(domain, "v1")[1][1:] == ("send", "being sent")   # its base, pinned
    b"".join(second)
    newest = second.header["snapshot"]
    assert [r[0] for r in rows(domain, "v1")] == ["mine", newest]  # the older one went
    failed = domain.transfers.send("v1")
    failed.close()                                      # the client went away: not complete
    assert [r[0] for r in rows(domain, "v1")] == ["mine", newest]
    b"".join(domain.transfers.send("v1", "mine"))      # a named snapshot: nothing retired
    assert [r[0] for r in rows(domain, "v1")] == ["mine", newest]
    assert domain.checker.check()["problems"] == []


def test_a_refused_send_leaves_no_snapshot(domain):
    domain.volumes.create("v1", {})
    with pytest.raises(Exception, match="no such snapshot: v1@ghost"):
        domain.transfers.send("v1", since="ghost")
    assert rows(domain, "v1") == []


def test_check_reports_and_repairs_what_a_crash_left_of_the_lifecycle(domain, backend):
    """A kill between an operation and the removal of the snapshot it no longer needs leaves
    that snapshot: check names it, --repair removes it, and nothing that is needed."""
    domain.volumes.create("v1", {})
    # repl-…0102 and …0103: taken by replications that failed after the last recorded base
    # (…0101), so kept: a target may hold one all the same
    for snapshot in ("keep-me", "send-20260101T000000Z-aaaa", "send-20260102T000000Z-bbbb",
                     "repl-20260101T000000Z-aaaa", "repl-20260102T000000Z-bbbb",
                     "repl-20260103T000000Z-cccc", "clone-gone-20260101T000000Z"):
        backend.create_snapshot("v1", snapshot)
    domain.replications.record("v1", Replication("ssh://b", datetime.now(timezone.utc),
                                                 "repl-20260101T000000Z-aaaa"))
    problems = domain.checker.check()["problems"]
    assert sorted((p["kind"], p["what"], p["repair"]) for p in problems) == [
        ("unneeded snapshot", "v1@clone-gone-20260101T000000Z, taken for clone gone: no clone "
         "needs it", "remove it"),
        ("unneeded snapshot", "v1@send-20260101T000000Z-aaaa, taken for send: a newer one "
         "replaces it", "remove it")]
    result = domain.checker.check(repair=True)
    assert result["problems"] == [] and len(result["repaired"]) == 2
    assert rows(domain, "v1") == [
        ("keep-me", "user", None), ("repl-20260101T000000Z-aaaa", "replication",
                                    "base of replication to ssh://b"),
        ("repl-20260102T000000Z-bbbb", "replication", None),
        ("repl-20260103T000000Z-cccc", "replication", None),
        ("send-20260102T000000Z-bbbb", "send", None)]


def test_a_rollback_that_destroys_a_replication_base_forgets_it(domain, backend):
    domain.volumes.create("v1", {})
    for snapshot in ("s1", "s2"):
        domain.volumes.snapshot(["v1"], snapshot)
    domain.replications.record("v1", Replication("ssh://b", datetime.now(timezone.utc), "s2"))
    domain.volumes.rollback("v1", "s1", destroy_newer=True)
    kept = domain.replications.base("v1", "ssh://b")
    assert kept == (None if not backend.rollback_keeps_newer else "s2")
    assert domain.checker.check()["problems"] == []


def test_the_next_start_forgets_the_records_of_what_a_kill_left_gone(domain, backend, tmp_path):
    """A Remove killed after its destroy, a rollback killed after zfs destroyed newer
    snapshots: their records outlive what they describe, until the next start."""
    from plugin.history import AutoHistory, AutoRun

    history = AutoHistory(tmp_path / "schedule.json")
    domain.volumes.create("v1", {})
    domain.volumes.snapshot(["v1"], "s1")
    for left in ("send-20260101T000000Z-000000aa", "send-20260102T000000Z-000000bb",
                 "clone-gone-20260101T000000Z"):
        backend.create_snapshot("v1", left)        # a send, a clone's Remove, killed midway
    now = datetime.now(timezone.utc)
    domain.replications.record("v1", Replication("ssh://b", now, "gone-since"))
    domain.replications.record("v2", Replication("ssh://b", now, "s1"))
    history.record("v2", AutoRun(now, "auto-x"))
    assert len(domain.checker.check()["problems"]) == 4
    restarted = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2),
                                history=AutoHistory(tmp_path / "schedule.json"),
                                replications=ReplicationLog(tmp_path / "replication.json"))
    restarted.volumes.open()
    assert restarted.checker.check()["problems"] == []
    assert rows(restarted, "v1") == [("s1", "user", None),
                                     ("send-20260102T000000Z-000000bb", "send", None)]
    assert ReplicationLog(tmp_path / "replication.json").volumes() == {"v1"}
    assert AutoHistory(tmp_path / "schedule.json").volumes() == set()


def test_a_replica_keeps_only_the_newest_replication_snapshot(domain, backend):
    """Each replication sends a new repl- snapshot: the source keeps only the newest, and so
    does the replica that receives them."""
    import io

    domain.volumes.create("v1", {})
    for snapshot in ("repl-20260101T000000Z-000000aa", "repl-20260102T000000Z-000000bb"):
        domain.volumes.snapshot(["v1"], snapshot)
    first = b"".join(domain.transfers.send("v1", "repl-20260101T000000Z-000000aa"))
    domain.transfers.receive("copy", io.BytesIO(first))
    if isinstance(backend, FakeBackend):   # its tar streams carry no identity: tell it
        from dataclasses import replace
        got = backend._snapshots["copy"]["repl-20260101T000000Z-000000aa"]
        backend._snapshots["copy"][got.name] = replace(
            got, received=domain.volumes.snapshots("v1")[0].identity)
    second = b"".join(domain.transfers.send("v1", "repl-20260102T000000Z-000000bb",
                                            "repl-20260101T000000Z-000000aa"))
    receive_incremental(domain, backend, "copy", second)
    assert [r[0] for r in rows(domain, "copy")] == ["repl-20260102T000000Z-000000bb"]


def test_removing_the_origin_of_a_clone_leaves_the_clone_nothing_to_carry(domain):
    """On ZFS, removing v1 promotes its clone c1, which takes over the snapshot it was made
    from: a snapshot of c1 now, that nothing needs."""
    domain.volumes.create("v1", {})
    (domain.volumes.mount("v1", "m1") / "f").write_text("data")
    domain.volumes.unmount("v1", "m1")
    domain.volumes.create("c1", {"from": "v1"})
    domain.volumes.remove("v1")
    assert rows(domain, "c1") == []
    assert (domain.volumes.mount("c1", "m2") / "f").read_text() == "data"
    assert domain.checker.check()["problems"] == []


def test_the_last_clone_of_an_unneeded_snapshot_takes_it_along(domain, backend):
    """A clone keeps a superseded send- snapshot it was made from; removing the clone lets
    it go (check would otherwise report it until --repair)."""
    domain.volumes.create("v1", {})
    for snapshot in ("send-20260101T000000Z-000000aa", "send-20260102T000000Z-000000bb"):
        backend.create_snapshot("v1", snapshot)
    domain.volumes.create("c1", {"from": "v1@send-20260101T000000Z-000000aa"})
    assert domain.checker.check()["problems"] == []          # needed by c1
    domain.volumes.remove("c1")
    assert [r[0] for r in rows(domain, "v1")] == ["send-20260102T000000Z-000000bb"]
    assert domain.checker.check()["problems"] == []


def test_a_promoted_clone_keeps_the_origin_another_clone_still_needs(domain):
    """Two clones of v1 (from=v1); removing v1 makes ZFS promote one, which takes over the
    other's origin snapshot too: that one is still needed, though from= names v1 (found by
    scripts/torture)."""
    domain.volumes.create("v1", {})
    (domain.volumes.mount("v1", "m1") / "f").write_text("data")
    domain.volumes.unmount("v1", "m1")
    domain.volumes.create("c3", {"from": "v1"})
    domain.volumes.create("c15", {"from": "v1"})       # promoted first: it sorts first
    domain.volumes.remove("v1")
    assert domain.checker.check()["problems"] == []
    for clone in ("c3", "c15"):
        assert (domain.volumes.mount(clone, "m-" + clone) / "f").read_text() == "data"
        domain.volumes.unmount(clone, "m-" + clone)
    domain.volumes.remove("c3")
    domain.volumes.remove("c15")
    assert domain.checker.check()["problems"] == []


def test_a_clone_of_a_clone_keeps_what_it_depends_on_after_promotion(domain):
    """v1 <- c1 (from=v1) <- c2 (from=c1); removing c1 promotes c2, which then depends on
    the snapshot taken for c1 on v1, though its from= names c1 and c1 is gone (ZFS moves
    origins on promotion; found by scripts/torture). When c2 goes too, v1 is left clean."""
    domain.volumes.create("v1", {})
    (domain.volumes.mount("v1", "m1") / "f").write_text("data")
    domain.volumes.unmount("v1", "m1")
    domain.volumes.create("c1", {"from": "v1"})
    domain.volumes.create("c2", {"from": "c1"})
    domain.volumes.remove("c1")
    assert domain.checker.check()["problems"] == []
    assert (domain.volumes.mount("c2", "m2") / "f").read_text() == "data"
    domain.volumes.unmount("c2", "m2")
    domain.volumes.remove("c2")
    assert rows(domain, "v1") == [] and domain.checker.check()["problems"] == []


def test_removing_the_first_of_a_chain_of_clones_leaves_the_last_nothing_to_carry(domain):
    """v1 <- c1 (from=v1) <- c2 (from=c1); c1 goes (c2 is promoted over it and hangs on v1
    now), then v1 goes: c2 is promoted over v1 and takes v1's snapshot taken for c1, which
    nothing needs any more. Its from= names c1, not v1, so only the filesystem's view finds
    it (found by the crash torture's CI slice on zfs-fuse)."""
    domain.volumes.create("v1", {})
    (domain.volumes.mount("v1", "m1") / "f").write_text("data")
    domain.volumes.unmount("v1", "m1")
    domain.volumes.create("c1", {"from": "v1"})
    domain.volumes.create("c2", {"from": "c1"})
    domain.volumes.remove("c1")
    domain.volumes.remove("v1")
    assert rows(domain, "c2") == [] and domain.checker.check()["problems"] == []
    assert (domain.volumes.mount("c2", "m2") / "f").read_text() == "data"
    domain.volumes.unmount("c2", "m2")


def test_removing_a_snapshot_a_clone_depends_on_is_a_clear_conflict(domain, backend):
    from plugin.errors import Conflict

    domain.volumes.create("v1", {})
    domain.volumes.snapshot(["v1"], "s1")
    domain.volumes.create("c1", {"from": "v1@s1"})
    if backend.clones_need_origin:
        with pytest.raises(Conflict, match="snapshot v1@s1 is the origin of volume c1, which "
                                           "depends on it; remove that volume first"):
            domain.volumes.remove_snapshot("v1", "s1")
        domain.volumes.remove("c1")
    domain.volumes.remove_snapshot("v1", "s1")          # Btrfs: a clone never depends on it
    assert rows(domain, "v1") == []


def test_a_refused_clone_leaves_no_snapshot_behind(domain, backend, monkeypatch):
    """A Create from=VOLUME the filesystem refuses (a full pool, seen with scripts/torture)
    takes its origin snapshot away again."""
    from plugin.errors import BackendError

    domain.volumes.create("v1", {})

    def refused(*args, **kwargs):
        raise BackendError("cannot clone: out of space")
    monkeypatch.setattr(backend, "clone", refused)
    with pytest.raises(BackendError, match="out of space"):
        domain.volumes.create("c1", {"from": "v1"})
    assert rows(domain, "v1") == [] and domain.checker.check()["problems"] == []
