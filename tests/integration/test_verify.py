"""Validated restores on the fake, a real loop-mounted Btrfs and a real ZFS pool (the check
container faked: e2e runs real ones): the scratch clone holds the snapshot's data, is hidden,
and is always removed (check passes, fails, raises, times out); a killed verification's
clone is removed by the scheduler's first pass after a start; retention keeps the newest
snapshot that passed."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from plugin import names
from plugin.domain import Domain
from plugin.errors import VolumeBusy
from plugin.history import AutoHistory
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.scheduler import Scheduler
from plugin.trash_book import TrashBook
from plugin.verify import Outcome, Use
from plugin.verify_book import ERROR, FAILED, PASSED, VerifyBook
from plugin.verify_docker import CheckCannotRun

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


class Checks:
    """A stand-in for dockerd: the 'check' reads the clone as a container would see it."""

    def __init__(self, domain_ref: list) -> None:
        self.domain_ref = domain_ref
        self.answer: Outcome | Exception = Outcome(0, "ok")
        self.seen: list[tuple[str, bytes, list[str]]] = []
        self.leftovers = 0

    def usage(self, volume):
        return Use("app", "app:1", "/srv")

    def run(self, check):
        domain = self.domain_ref[0]
        self.seen.append((check.clone, (check.source / "f").read_bytes(),
                          [v.name for v in domain.backend.internal_volumes()]))
        if "db" in [v.name for v in domain.backend.volumes()]:
            with pytest.raises(VolumeBusy):         # the source stays while it is verified
                domain.volumes.remove("db")
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def remove_leftovers(self):
        return self.leftovers


def assemble(backend, tmp_path: Path, checks: Checks | None = None) -> Domain:
    ref: list = []
    checks = checks or Checks(ref)
    d = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2),
                        history=AutoHistory(tmp_path / "schedule.json"),
                        trash=TrashBook(tmp_path / "trash.journal"), trash_ttl=3600,
                        verify_book=VerifyBook(tmp_path / "verify.json"), checks=checks)
    checks.domain_ref[:] = [d]
    d.volumes.open()
    return d


def write(domain: Domain, volume: str, data: bytes) -> None:
    path = domain.volumes.mount(volume, "writer")
    (path / "f").write_bytes(data)
    os.sync()
    domain.volumes.unmount(volume, "writer")


@pytest.fixture
def domain(backend, tmp_path: Path) -> Domain:
    d = assemble(backend, tmp_path)
    d.volumes.create("db", {"verify-cmd": "check --all"})
    write(d, "db", b"at s1")
    d.volumes.snapshot(["db"], "s1")
    write(d, "db", b"after s1")
    return d


@pytest.mark.parametrize("answer,result", [
    (Outcome(0, "ok"), PASSED), (Outcome(2, "corrupt"), FAILED), (Outcome(None, "hung"), FAILED),
    (CheckCannotRun("image app:1 is not on this host"), ERROR)])
def test_the_clone_holds_the_snapshot_and_is_always_removed(domain, backend, answer, result):
    checks = domain.verifier._checks
    checks.answer = answer
    verified = domain.verifier.verify("db")
    assert verified.result == result
    [(clone, data, hidden)] = checks.seen
    assert data == b"at s1"                                  # the snapshot, not the volume
    assert hidden == [clone] and clone.startswith("snapvol.verify.")
    assert clone not in [v.name for v in backend.volumes()]  # never listed to Docker
    assert backend.internal_volumes() == []                  # gone, whatever happened
    assert [s.name for s in backend.snapshots("db")] == ["s1"]
    assert domain.lifecycle.needs("db") == ({"s1": "newest verified restore point"}
                                            if result == PASSED else {})


def test_a_check_that_raises_still_removes_the_clone(domain, backend):
    domain.verifier._checks.answer = RuntimeError("a bug in the Docker side")
    with pytest.raises(RuntimeError):
        domain.verifier.verify("db")
    assert backend.internal_volumes() == []
    domain.volumes.remove("db")                               # and nothing stays pinned


def test_a_killed_verification_is_cleaned_by_the_first_pass_after_a_start(domain, backend, tmp_path):
    scratch = names.internal_name("verify", "00112233aabb")
    backend.clone("db", "s1", scratch, {})                    # what a SIGKILL mid-check leaves
    restarted = assemble(backend, tmp_path)
    assert scratch in [v.name for v in backend.internal_volumes()]   # not yet: Docker first
    restarted.verifier._checks.leftovers = 1
    Scheduler(restarted.schedules, restarted.volumes, verifier=restarted.verifier).run_once(T0)
    assert backend.internal_volumes() == []
    assert [s.name for s in backend.snapshots("db")] == ["s1"]


def test_retention_keeps_the_newest_snapshot_that_passed(backend, tmp_path):
    d = assemble(backend, tmp_path)
    d.volumes.create("auto", {"schedule": "1h", "keep": "last=2", "verify-image": "app:1"})
    write(d, "auto", b"x")
    ticks = [T0 + timedelta(hours=h) for h in range(6)]
    d.schedules.run_automatic("auto", ticks[0])
    assert d.verifier.verify("auto").result == PASSED
    verified = d.verifier.book.passed("auto").snapshot
    for tick in ticks[1:]:
        d.schedules.run_automatic("auto", tick)
    left = [s.name for s in backend.snapshots("auto")]
    assert left[0] == verified and len(left) == 3             # last=2, plus the verified one
    decisions = {r["snapshot"]: r for r in d.schedules.prune("auto", now=ticks[-1], dry_run=True)}
    assert decisions[verified]["keep"] and "protected" in decisions[verified]["reasons"]


def test_a_pass_of_an_older_snapshot_keeps_the_newer_one_that_passed(domain):
    domain.volumes.snapshot(["db"], "s2")
    assert domain.verifier.verify("db", "s2").result == PASSED
    assert domain.verifier.verify("db", "s1").result == PASSED
    assert domain.verifier.book.last("db").snapshot == "s1"
    assert domain.verifier.book.passed("db").snapshot == "s2"      # the newest that passed
