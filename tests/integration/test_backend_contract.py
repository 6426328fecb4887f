"""The backend contract, run unchanged against the fake, a real loop-mounted Btrfs and a real
ZFS pool (the ``backend`` fixture of ``conftest.py``)."""

from __future__ import annotations

import os
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from plugin.errors import Conflict, SnapshotExists, SnapshotNotFound, VolumeExists, VolumeNotFound


def test_create_list_get_destroy(backend):
    before = datetime.now(timezone.utc) - timedelta(seconds=2)
    info = backend.create_volume("v1", {"mode": "750"})
    assert info.name == "v1" and info.options == {"mode": "750"}
    assert backend.attach("v1") == info.mountpoint and info.mountpoint.is_dir()
    assert oct(os.stat(info.mountpoint).st_mode & 0o777) == "0o750"
    assert before <= info.created <= datetime.now(timezone.utc) + timedelta(seconds=2)
    assert [v.name for v in backend.volumes()] == ["v1"]
    assert backend.volume("v1") == info
    backend.destroy_volume("v1")
    assert backend.volumes() == []
    assert not (info.mountpoint / "anything").exists()
    with pytest.raises(VolumeNotFound, match="no such volume: v1"):
        backend.volume("v1")


def test_create_twice_is_refused(backend):
    backend.create_volume("v1", {})
    with pytest.raises(VolumeExists, match="volume v1 already exists"):
        backend.create_volume("v1", {})


def test_data_survives_attach_detach(backend):
    backend.create_volume("v1", {})
    path = backend.attach("v1")
    (path / "file").write_text("hello")
    backend.detach("v1")
    assert (backend.attach("v1") / "file").read_text() == "hello"


def test_missing_volume_everywhere(backend):
    for call in (backend.volume, backend.destroy_volume, backend.attach, backend.usage):
        with pytest.raises(VolumeNotFound):
            call("ghost")


def test_many_volumes_listed_in_one_pass(backend):
    for i in range(20):
        backend.create_volume(f"v{i:02d}", {})
    assert sorted(v.name for v in backend.volumes()) == [f"v{i:02d}" for i in range(20)]


def test_usages_in_one_pass_agree_with_usage_and_capacity_is_the_pool(backend):
    backend.create_volume("a", {})
    backend.create_volume("b", {"size": "64M"})
    usages = backend.usages()
    assert set(usages) == {"a", "b"}
    one_by_one = {name: backend.usage(name) for name in ("a", "b")}
    if backend.kind == "zfs":
        # usage() (Get's Status) is statvfs of the mount point, which needs no zfs process;
        # ZFS counts it in units of the record size on OpenZFS (128 KiB; 512 B on zfs-fuse),
        # so it is within one unit of usages()'s `zfs get referenced`
        unit = os.statvfs(backend.volume("a").mountpoint).f_frsize
        assert {n: u.quota_bytes for n, u in usages.items()} == \
            {n: u.quota_bytes for n, u in one_by_one.items()}
        assert all(abs(usages[n].used_bytes - one_by_one[n].used_bytes) < unit for n in usages), \
            (usages, one_by_one, unit)
    else:
        assert usages == one_by_one
    capacity = backend.capacity()
    assert 0 < capacity.available_bytes < capacity.size_bytes
    if backend.kind == "zfs" or usages["b"].quota_bytes is not None:
        assert usages["b"].quota_bytes == 64 << 20


def write(path: Path, text: str) -> None:
    path.write_text(text)
    with open(path) as f:
        os.fsync(f.fileno())


def test_snapshots_in_the_same_second_keep_their_order(backend):
    backend.create_volume("v1", {})
    for name in ("zz", "aa", "mm"):        # names sort otherwise than creation
        backend.create_snapshot("v1", name)
    assert [s.name for s in backend.snapshots("v1")] == ["zz", "aa", "mm"]


def test_snapshots_listed_oldest_first_and_destroyed(backend):
    backend.create_volume("v1", {})
    first = backend.create_snapshot("v1", "s1")
    second = backend.create_snapshot("v1", "s2")
    assert [s.name for s in backend.snapshots("v1")] == ["s1", "s2"]
    assert first.volume == "v1" and first.identity != second.identity
    assert first.created <= second.created
    with pytest.raises(SnapshotExists, match="snapshot v1@s1 already exists"):
        backend.create_snapshot("v1", "s1")
    backend.destroy_snapshot("v1", "s1")
    assert [s.name for s in backend.snapshots("v1")] == ["s2"]
    with pytest.raises(SnapshotNotFound, match="no such snapshot: v1@s1"):
        backend.destroy_snapshot("v1", "s1")
    with pytest.raises(VolumeNotFound):
        backend.snapshots("ghost")


def test_clone_is_writable_and_independent(backend):
    path = backend.attach(backend.create_volume("v1", {}).name)
    write(path / "f", "before")
    backend.create_snapshot("v1", "s1")
    write(path / "f", "after")
    clone = backend.clone("v1", "s1", "c1", {"mode": "700"})
    assert clone.options == {"mode": "700"}
    cpath = backend.attach("c1")
    assert (cpath / "f").read_text() == "before"
    write(cpath / "f", "changed in clone")
    assert (path / "f").read_text() == "after"
    assert sorted(v.name for v in backend.volumes()) == ["c1", "v1"]
    with pytest.raises(VolumeExists):
        backend.clone("v1", "s1", "c1", {})
    with pytest.raises(SnapshotNotFound):
        backend.clone("v1", "nope", "c2", {})
    backend.destroy_volume("c1")


def test_rollback_restores_the_snapshot(backend):
    path = backend.attach(backend.create_volume("v1", {"size": "64M"}).name)
    write(path / "f", "old")
    backend.create_snapshot("v1", "s1")
    write(path / "f", "new")
    write(path / "extra", "x")
    backend.detach("v1")
    backend.rollback("v1", "s1")
    path = backend.attach("v1")
    assert (path / "f").read_text() == "old" and not (path / "extra").exists()
    assert backend.volume("v1").options == {"size": "64M"}
    assert [s.name for s in backend.snapshots("v1")] == ["s1"]


def test_rollback_and_newer_snapshots(backend):
    backend.create_volume("v1", {})
    backend.create_snapshot("v1", "s1")
    backend.create_snapshot("v1", "s2")
    backend.rollback("v1", "s1")
    expected = ["s1", "s2"] if backend.rollback_keeps_newer else ["s1"]
    assert [s.name for s in backend.snapshots("v1")] == expected


def test_destroy_volume_takes_its_snapshots(backend):
    backend.create_volume("v1", {})
    backend.create_snapshot("v1", "s1")
    backend.destroy_volume("v1")
    backend.create_volume("v1", {})
    assert backend.snapshots("v1") == []


def test_snapshot_of_several_volumes_is_all_or_none(backend):
    for name in ("v1", "v2"):
        write(backend.attach(backend.create_volume(name, {}).name) / "f", name)
    backend.create_snapshot("v2", "s1")
    with pytest.raises(SnapshotExists, match="v2@s1"):
        backend.create_snapshots(["v1", "v2"], "s1")
    assert backend.snapshots("v1") == []
    taken = backend.create_snapshots(["v1", "v2"], "s2")
    assert [(s.volume, s.name) for s in taken] == [("v1", "s2"), ("v2", "s2")]
    for name in ("v1", "v2"):
        clone = backend.clone(name, "s2", f"c-{name}", {})
        assert (backend.attach(clone.name) / "f").read_text() == name
    if os.environ.get("SNAPVOL_REQUIRE_LIBZFS_CORE") and backend.kind == "zfs":
        assert backend.atomic_snapshots                 # one lzc_snapshot call on OpenZFS


@pytest.mark.parametrize("order", [("c1", "c2"), ("c2", "c1")])
def test_removing_a_volume_never_breaks_its_clones(backend, order):
    path = backend.attach(backend.create_volume("v1", {}).name)
    write(path / "f", "one")
    backend.create_snapshot("v1", "s1")
    write(path / "f", "two")
    backend.create_snapshot("v1", "s2")
    backend.create_snapshot("v1", "s3")
    backend.clone("v1", "s1", "c1", {})
    backend.clone("v1", "s2", "c2", {})
    backend.detach("v1")
    backend.destroy_volume("v1")               # ZFS: the clones are promoted first
    assert sorted(v.name for v in backend.volumes()) == ["c1", "c2"]
    assert (backend.attach("c1") / "f").read_text() == "one"
    assert (backend.attach("c2") / "f").read_text() == "two"
    write(backend.attach("c1") / "g", "still writable")
    for name in order:
        backend.detach(name)
        backend.destroy_volume(name)
    assert backend.volumes() == []


def transfer(backend, volume, snapshot, base, target, target_base, options=None, *, cut=None):
    """The native stream of volume@snapshot into target (as the plugin does, minus framing);
    with *cut*, the receiving side fails after that many bytes."""
    from plugin import process
    with process.Streaming(backend.send_argv(volume, snapshot, base), feed=False) as sender, \
            backend.receiving(target, snapshot, target_base, options or {}) as pipe:
        data = sender.proc.stdout.read()
        sender.finish()
        if cut is not None:
            pipe.write(data[:cut])
            raise RuntimeError("the connection dropped")
        pipe.write(data)
    return len(data)


def test_send_and_receive_full_then_incremental(backend):
    path = backend.attach(backend.create_volume("v1", {"mode": "750"}).name)
    write(path / "f", "one")
    write(path / "big", "x" * 2_000_000)
    backend.create_snapshot("v1", "s1")
    write(path / "f", "two")
    backend.create_snapshot("v1", "s2")
    full = transfer(backend, "v1", "s1", None, "r1", None, {"mode": "750"})
    replica = backend.attach("r1")
    assert (replica / "f").read_text() == "one" and (replica / "big").stat().st_size == 2_000_000
    assert backend.volume("r1").options == {"mode": "750"}
    assert [s.name for s in backend.snapshots("r1")] == ["s1"]
    if backend.describe()["filesystem"] != "fake":
        assert backend.snapshots("r1")[0].matches(backend.snapshots("v1")[0].identity)
        incremental = transfer(backend, "v1", "s2", "s1", "r1", "s1")
        assert incremental < full / 10                  # only what changed travels
        assert (backend.attach("r1") / "f").read_text() == "two"
        assert [s.name for s in backend.snapshots("r1")] == ["s1", "s2"]
        assert backend.snapshots("r1")[1].matches(backend.snapshots("v1")[1].identity)


def test_a_failed_receive_leaves_nothing(backend):
    path = backend.attach(backend.create_volume("v1", {}).name)
    write(path / "big", "y" * 3_000_000)
    backend.create_snapshot("v1", "s1")
    with pytest.raises(RuntimeError, match="dropped"):
        transfer(backend, "v1", "s1", None, "r1", None, cut=1_000_000)
    assert [v.name for v in backend.volumes()] == ["v1"]
    with pytest.raises(VolumeNotFound):
        backend.snapshots("r1")
    transfer(backend, "v1", "s1", None, "r1", None)          # and a retry then works
    assert (backend.attach("r1") / "big").stat().st_size == 3_000_000


def test_receive_refuses_what_does_not_fit(backend):
    backend.create_volume("v1", {})
    backend.create_snapshot("v1", "s1")
    with pytest.raises(VolumeExists):
        with backend.receiving("v1", "s9", None, {}):
            pass
    with pytest.raises(SnapshotNotFound):
        with backend.receiving("v1", "s9", "nope", {}):
            pass
    with pytest.raises(SnapshotExists):
        with backend.receiving("v1", "s1", "s1", {}):
            pass
    with pytest.raises(SnapshotNotFound):
        backend.send_argv("v1", "nope", None)


def test_a_held_replication_base_survives_until_released(backend):
    backend.create_volume("v1", {})
    backend.create_snapshot("v1", "base")
    backend.hold("v1", "base")
    backend.hold("v1", "base")                     # twice: still one hold
    held_by_filesystem = backend.kind == "zfs" and backend.describe()["libzfs_core"]
    if os.environ.get("SNAPVOL_REQUIRE_LIBZFS_CORE") and backend.kind == "zfs":
        assert held_by_filesystem
    if held_by_filesystem:                         # OpenZFS: a user hold of snapvol's
        with pytest.raises(Conflict, match="is the base of a replication"):
            backend.destroy_snapshot("v1", "base")
        assert [s.name for s in backend.snapshots("v1")] == ["base"]
    backend.release("v1", "base")
    backend.release("v1", "base")                  # idempotent
    backend.destroy_snapshot("v1", "base")
    backend.create_snapshot("v1", "again")
    backend.hold("v1", "again")
    backend.destroy_volume("v1")                   # releases what it holds
    assert backend.volumes() == []


def test_an_interrupted_receive_resumes_where_the_backend_can(backend):
    """OpenZFS keeps an interrupted `receive -s` (out of sight) and sends only the rest;
    elsewhere the interrupted receive leaves nothing and the next one starts over."""
    from plugin import process
    if os.environ.get("SNAPVOL_REQUIRE_LIBZFS_CORE") and backend.kind == "zfs":
        assert backend.resumable
    path = backend.attach(backend.create_volume("v1", {}).name)
    write(path / "big", os.urandom(3_000_000).hex())
    backend.create_snapshot("v1", "s1")
    with pytest.raises(RuntimeError, match="dropped"):
        transfer(backend, "v1", "s1", None, "r1", None, cut=2_000_000)
    assert [v.name for v in backend.volumes()] == ["v1"]          # nothing visible either way
    token = backend.resume_token("r1")
    if not backend.resumable:
        assert token is None
        return
    assert token
    with process.Streaming(backend.send_argv("v1", "s1", None, resume_token=token),
                           feed=False) as sender, \
            backend.receiving("r1", "s1", None, {}, resume=True) as pipe:
        rest = sender.proc.stdout.read()
        sender.finish()
        pipe.write(rest)
    assert len(rest) < 5_000_000                                   # only what was missing
    assert (backend.attach("r1") / "big").read_text() == (path / "big").read_text()
    assert backend.resume_token("r1") is None
    # a new full stream for a volume with a stale interrupted receive drops that state
    backend.create_snapshot("v1", "s2")
    with pytest.raises(RuntimeError, match="dropped"):
        transfer(backend, "v1", "s2", None, "r2", None, cut=2_000_000)
    assert backend.resume_token("r2")
    transfer(backend, "v1", "s2", None, "r2", None)
    assert backend.resume_token("r2") is None and "r2" in [v.name for v in backend.volumes()]
