"""Btrfs specifics on a real loop-mounted filesystem: options, quotas, ownership, crashes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import btrfsutil
import pytest

from plugin.backends.btrfs import BtrfsBackend
from plugin.backends.btrfs_layout import OWNER_XATTR
from plugin.errors import BackendError, BackendUnavailable
from tests.conftest import assert_refuses_foreign, write_until_refused


@pytest.fixture
def backend(btrfs_mount: Path) -> BtrfsBackend:
    b = BtrfsBackend(btrfs_mount / "snapvol")
    b.root.mkdir()
    b.check()
    return b


def sh(*argv: str) -> str:
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


def test_each_volume_is_a_subvolume_marked_ours(backend):
    info = backend.create_volume("v1", {})
    assert btrfsutil.is_subvolume(info.mountpoint)
    assert b'"format": 1' in os.getxattr(info.mountpoint, OWNER_XATTR)
    listed = sh("btrfs", "subvolume", "list", "-o", str(backend.root))
    assert listed.split()[-1].endswith("snapvol/volumes/v1")


def test_owner_mode_and_ids(backend):
    info = backend.create_volume("v1", {"uid": "1234", "gid": "5678", "mode": "2770"})
    st = os.stat(info.mountpoint)
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (1234, 5678, "0o2770")


def test_default_mode_is_755(backend):
    assert oct(os.stat(backend.create_volume("v1", {}).mountpoint).st_mode & 0o7777) == "0o755"


def test_compression_and_nocow(backend):
    z = backend.create_volume("z", {"compression": "zstd"})
    assert sh("btrfs", "property", "get", str(z.mountpoint), "compression").strip() == "compression=zstd"
    n = backend.create_volume("n", {"nocow": "true"})
    (n.mountpoint / "db").write_bytes(b"x")
    assert "C" in sh("lsattr", "-d", str(n.mountpoint)).split()[0]
    assert "C" in sh("lsattr", str(n.mountpoint / "db")).split()[0]


def test_size_enables_quotas_and_limits_writes(backend, btrfs_mount):
    assert backend.usage(backend.create_volume("free", {}).name).quota_bytes is None
    info = backend.create_volume("small", {"size": "8M"})
    assert backend.describe()["quotas"] is True
    assert write_until_refused(info.mountpoint / "big", 16).errno == 122   # EDQUOT
    subprocess.run(["sync"], check=True)
    usage = backend.usage("small")
    assert usage.quota_bytes == 8 << 20
    assert 1 << 20 < usage.used_bytes <= 8 << 20


def test_foreign_subvolume_is_invisible_and_untouched(backend):
    foreign = backend.volumes_dir / "theirs"
    btrfsutil.create_subvolume(foreign)
    (foreign / "keep").write_text("mine")
    assert_refuses_foreign(backend, "theirs")
    assert (foreign / "keep").read_text() == "mine"


def test_failed_create_leaves_nothing(backend, monkeypatch):
    def refuse(*args, **kwargs):
        raise BackendError("qgroup limit refused")
    monkeypatch.setattr("plugin.backends.btrfs.process.run", refuse)
    with pytest.raises(BackendError):
        backend.create_volume("v1", {"nocow": "true"})
    assert backend.volumes() == []
    assert list(backend.volumes_dir.iterdir()) == [] and list(backend.staging_dir.iterdir()) == []


def test_a_failed_cleanup_never_hides_the_failure(backend, monkeypatch):
    """The cleanup after a failed create fails too: the caller hears why the create failed,
    and what is left in staging is a leftover the next start removes."""
    import errno as errnos

    def full(*args, **kwargs):
        raise OSError(errnos.ENOSPC, "No space left on device")

    def stuck(path):
        raise BackendError(f"cannot delete subvolume {path}: busy")
    monkeypatch.setattr(backend._layout, "write_owner", full)
    monkeypatch.setattr(backend._layout, "delete_subvolume", stuck)
    with pytest.raises(BackendError, match="No space left on device") as caught:
        backend.create_volume("v1", {})
    assert caught.value.errno == errnos.ENOSPC
    monkeypatch.undo()
    assert len(list(backend.staging_dir.iterdir())) == 1
    BtrfsBackend(backend.root).finish_interrupted()
    assert list(backend.staging_dir.iterdir()) == [] and backend.volumes() == []


def test_start_finishes_interrupted_work(backend):
    """A crash mid-create or mid-remove leaves a marked subvolume in staging: check() removes it."""
    half = backend.staging_dir / "create.v9.0000"
    btrfsutil.create_subvolume(half)
    os.setxattr(half, OWNER_XATTR, b'{"format": 1, "options": {}}')
    unknown = backend.staging_dir / "not-ours"
    unknown.mkdir()
    backend.check()
    assert sorted(p.name for p in backend.staging_dir.iterdir()) == ["not-ours"]


def test_an_unreadable_mark_is_an_error_never_a_missing_volume(backend, tmp_path, monkeypatch):
    """EIO on a volume's owner mark must not read as "no such volume": dockerd forgets a
    volume whose Get answers that. Get answers with the problem in its Status instead."""
    import errno as errnos

    from plugin.domain import Domain
    from plugin.locks import VolumeLocks
    from plugin.mounts import MountTable

    path = backend.create_volume("v1", {}).mountpoint
    domain = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2))
    domain.volumes.open()
    real = os.getxattr

    def failing(target, attribute, *args, **kwargs):
        if Path(target) == path and attribute == OWNER_XATTR:
            raise OSError(errnos.EIO, "Input/output error")
        return real(target, attribute, *args, **kwargs)
    monkeypatch.setattr(os, "getxattr", failing)
    for call in (lambda: backend.volume("v1"), lambda: backend.snapshots("v1"),
                 lambda: backend.attach("v1")):
        with pytest.raises(BackendError, match="Input/output error") as caught:
            call()
        assert caught.value.errno == errnos.EIO
    view = domain.status.get("v1")
    assert view.status["state"] == "unavailable" and "Input/output error" in view.status["error"]


def test_destroy_removes_nested_subvolumes(backend):
    info = backend.create_volume("v1", {})
    btrfsutil.create_subvolume(info.mountpoint / "inner")
    backend.destroy_volume("v1")
    assert not info.mountpoint.exists()


def test_not_btrfs_root_is_unavailable(tmp_path):
    with pytest.raises(BackendUnavailable, match="is not on a Btrfs filesystem"):
        BtrfsBackend(tmp_path).check()
    with pytest.raises(BackendUnavailable, match="does not exist"):
        BtrfsBackend(tmp_path / "missing").check()


def test_root_gone_is_unavailable_not_missing(backend, btrfs_mount):
    backend.create_volume("v1", {})
    subprocess.run(["umount", str(btrfs_mount)], check=True)
    try:
        with pytest.raises(BackendUnavailable):
            backend.volume("v1")
    finally:
        subprocess.run(["mount", "-o", "loop", str(btrfs_mount.parent / "btrfs.img"),
                        str(btrfs_mount)], check=True)


def test_snapshot_listing_tolerates_a_snapshot_removed_meanwhile(backend, monkeypatch):
    """A prune (or another caller) deleting a snapshot between the directory scan and the
    subvolume lookup must not fail the listing: the snapshot is simply gone."""
    backend.create_volume("v1", {})
    for name in ("s1", "s2", "s3"):
        backend.create_snapshot("v1", name)
    real = btrfsutil.subvolume_info
    doomed = backend.snapshots_dir / "v1" / "s2"

    def pruned_meanwhile(path, *args, **kwargs):
        if Path(path) == doomed and btrfsutil.is_subvolume(doomed):
            btrfsutil.delete_subvolume(doomed)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(btrfsutil, "subvolume_info", pruned_meanwhile)
    assert [s.name for s in backend.snapshots("v1")] == ["s1", "s3"]


CRASH_AT = """
import os, sys
from pathlib import Path
import btrfsutil
from plugin.backends.btrfs import BtrfsBackend
backend = BtrfsBackend(Path(sys.argv[1]))
backend.check()
real, calls, stop_after = getattr(btrfsutil, sys.argv[2]), [], int(sys.argv[3])
def dies_like_kill_9(*args, **kwargs):
    calls.append(args)
    if len(calls) > stop_after:
        os._exit(137)            # no finally, no cleanup: as SIGKILL
    return real(*args, **kwargs)
setattr(btrfsutil, sys.argv[2], dies_like_kill_9)   # the backend modules call btrfsutil.<name>
{action}
"""


def crash_in_child(root: Path, call: str, after: int, action: str, stdin: bytes = b"") -> None:
    """Run *action* on a backend over *root* in a child process that dies (as with kill -9)
    at the (*after*+1)-th call of ``btrfsutil.<call>``."""
    import sys
    child = subprocess.run([sys.executable, "-c", CRASH_AT.format(action=action), str(root),
                            call, str(after)], input=stdin, capture_output=True,
                           cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert child.returncode == 137, child.stderr.decode()[-2000:]


def native_stream(backend: BtrfsBackend, volume: str, snapshot: str) -> bytes:
    return subprocess.run(backend.send_argv(volume, snapshot, None), capture_output=True,
                          check=True).stdout


@pytest.mark.parametrize("call", ["create_snapshot", "set_subvolume_read_only"])
def test_an_incremental_receive_killed_midway_never_shows_its_snapshot_over_old_data(backend, call):
    """kill -9 while an incremental receive updates a replica: its snapshot must never be
    there while the volume still holds the old data (the source would take it as
    replicated, found by scripts/torture); and the same stream, sent again, completes."""
    source = backend.attach(backend.create_volume("v1", {}).name)
    (source / "f").write_text("old")
    backend.create_snapshot("v1", "s1")
    (source / "f").write_text("new")
    backend.create_snapshot("v1", "s2")
    full = native_stream(backend, "v1", "s1")
    inc = subprocess.run(backend.send_argv("v1", "s2", "s1"), capture_output=True, check=True).stdout
    with backend.receiving("r1", "s1", None, {}) as pipe:
        pipe.write(full)
    crash_in_child(backend.root, call, 0, """
with backend.receiving("r1", "s2", "s1", {}) as pipe:
    pipe.write(sys.stdin.buffer.read())
""", stdin=inc)
    restarted = BtrfsBackend(backend.root)
    restarted.check()
    replica = restarted.attach("r1") / "f"
    if "s2" in [s.name for s in restarted.snapshots("r1")]:
        assert replica.read_text() == "new"
    else:
        with restarted.receiving("r1", "s2", "s1", {}) as pipe:
            pipe.write(inc)
        assert replica.read_text() == "new"
    assert restarted.leftovers() == []


def test_a_receive_killed_before_its_volume_was_made_leaves_nothing_at_next_start(backend):
    """kill -9 after the received snapshot was moved in, before the volume was made: the next
    start removes the orphan snapshot, the same stream is received again, and nothing of the
    dead attempt shows (it was never a volume)."""
    path = backend.attach(backend.create_volume("v1", {}).name)
    (path / "f").write_text("data")
    backend.create_snapshot("v1", "s1")
    raw = native_stream(backend, "v1", "s1")
    crash_in_child(backend.root, "create_snapshot", 0, """
with backend.receiving("r1", "s1", None, {}) as pipe:
    pipe.write(sys.stdin.buffer.read())
""", stdin=raw)
    assert (backend.snapshots_dir / "r1" / "s1").exists()      # the crash left it
    restarted = BtrfsBackend(backend.root)
    restarted.check()
    assert not (backend.snapshots_dir / "r1").exists()
    with restarted.receiving("r1", "s1", None, {}) as pipe:
        pipe.write(raw)
    assert (restarted.attach("r1") / "f").read_text() == "data"
    assert [s.name for s in restarted.snapshots("r1")] == ["s1"]


def test_a_remove_killed_midway_never_gives_its_snapshots_to_a_new_volume(backend):
    """kill -9 after the volume's subvolume was deleted, before its snapshots were: a new
    volume of the same name, after the restart, has no snapshots of the old one."""
    backend.create_volume("v1", {})
    backend.create_snapshot("v1", "old-1")
    backend.create_snapshot("v1", "old-2")
    crash_in_child(backend.root, "delete_subvolume", 1, 'backend.destroy_volume("v1")')
    restarted = BtrfsBackend(backend.root)
    restarted.check()
    assert [v.name for v in restarted.volumes()] == []
    restarted.create_volume("v1", {})
    assert restarted.snapshots("v1") == []
    assert not any((backend.snapshots_dir / "v1").glob("old-*"))


def test_orphan_snapshots_left_while_running_are_not_inherited_either(backend):
    """Snapshots of a removed volume that could not be deleted at the time (no restart since):
    a new volume of that name starts with none."""
    backend.create_volume("v1", {})
    backend.create_snapshot("v1", "old")
    orphan = backend.snapshots_dir / "v1" / "old"
    backend.destroy_volume("v1")
    orphan.parent.mkdir()
    # a snapshot of a volume of ours carries its mark, as the old volume's snapshots did
    btrfsutil.create_snapshot(backend.create_volume("tmp", {}).mountpoint, orphan, read_only=True)
    backend.create_volume("v1", {})
    assert backend.snapshots("v1") == []


def test_check_lists_crash_leftovers_and_the_next_start_removes_them(backend, tmp_path):
    """snapvol check on a running plugin: a crash (of another process on the same storage)
    left the removed volume in staging and its snapshots; check lists both with what the next
    start does, --repair leaves them (a temporary may belong to an operation just begun),
    the next start removes them, and then it is consistent."""
    from plugin.locks import VolumeLocks
    from plugin.mounts import MountTable
    from plugin.domain import Domain

    def running_service():
        domain = Domain.assemble(BtrfsBackend(backend.root), MountTable(tmp_path / "mounts.json"),
                                 VolumeLocks(2))
        domain.volumes.open()
        return domain

    domain = running_service()
    domain.volumes.create("v1", {})
    domain.volumes.snapshot(["v1"], "old")
    crash_in_child(backend.root, "delete_subvolume", 0, 'backend.destroy_volume("v1")')
    problems = sorted(domain.checker.check()["problems"], key=lambda p: p["what"])
    assert [(p["kind"], p["repair"], p["note"]) for p in problems] == [
        ("leftover", None, "the next start of the plugin will remove it"),
        ("leftover", None, "the next start of the plugin will delete them")], problems
    assert "/.snapvol-staging/remove.v1." in problems[0]["what"]     # the volume, renamed out
    assert "snapshot(s) old of a volume that no longer exists" in problems[1]["what"]
    with domain.locks.hold("v1"):                 # an operation on v1 in flight: not reported
        assert domain.checker.check()["problems"] == []
    assert len(domain.checker.check(repair=True)["problems"]) == 2
    assert running_service().checker.check() == {"problems": [], "repaired": []}
    assert not (backend.snapshots_dir / "v1").exists()


def test_a_rename_killed_between_its_two_renames_loses_no_snapshot(backend):
    """rename_volume moves snapshots/<name>/ first: killed before the volume follows, start-up
    must not take those snapshots for orphans (their volume is not at the new name yet), and
    repeating the rename (the trash's or the standby's intent) finishes it."""
    backend.create_volume("v", {})
    backend.create_snapshot("v", "s1")
    layout = backend._layout
    old_snaps, new_snaps = layout.snapshots_dir / "v", layout.snapshots_dir / "snapvol.trash.x1"
    layout.mark_renaming(old_snaps, "snapvol.trash.x1")
    os.rename(old_snaps, new_snaps)                       # ... and here the plugin died
    assert not [l for l in backend.leftovers() if "no longer exists" in l.what]
    backend.check()                                       # start-up: finish_interrupted
    assert (new_snaps / "s1").is_dir()
    backend.rename_volume("v", "snapvol.trash.x1")
    assert [s.name for s in backend.snapshots("snapvol.trash.x1")] == ["s1"]
    assert not (new_snaps / ".snapvol-renaming").exists()
    assert [v.name for v in backend.internal_volumes()] == ["snapvol.trash.x1"]
    assert backend.volumes() == []


def test_volumes_reads_each_subvolume_once_and_still_sees_every_change(backend, monkeypatch):
    """At 10,000 volumes a full read costs ~0.6 s, and the scheduler, Remove and start-up
    all ask (issue 17): volumes() shares listing()'s memo, which a change never escapes."""
    for name in ("a", "b", "c"):
        backend.create_volume(name, {})
    reads = []
    real = backend._layout.read_owner
    monkeypatch.setattr(backend._layout, "read_owner", lambda path: reads.append(path) or real(path))
    assert sorted(v.name for v in backend.volumes()) == ["a", "b", "c"]
    first = len(reads)
    assert sorted(v.name for v in backend.volumes()) == ["a", "b", "c"]
    assert len(reads) == first                      # nothing read again
    backend.create_snapshot("a", "s1")
    backend.rollback("a", "s1")                     # a new subvolume under the same name
    backend.destroy_volume("b")
    backend.create_volume("d", {"mode": "700"})
    reads.clear()
    listed = {v.name: v for v in backend.volumes()}
    assert sorted(listed) == ["a", "c", "d"] and listed["d"].options == {"mode": "700"}
    assert sorted(Path(p).name for p in reads) == ["a", "d"]   # the new subvolumes; c is known


def test_all_snapshots_reads_only_the_volumes_that_have_some(backend, monkeypatch):
    for name in ("a", "b", "c"):
        backend.create_volume(name, {})
    backend.create_snapshot("b", "s1")
    backend.create_snapshot("b", "s2")
    backend.volumes()
    asked = []
    real = backend.snapshots
    monkeypatch.setattr(backend, "snapshots", lambda volume: asked.append(volume) or real(volume))
    found = backend.all_snapshots()
    assert {k: [s.name for s in v] for k, v in found.items()} == {"a": [], "b": ["s1", "s2"], "c": []}
    assert asked == ["b"]
