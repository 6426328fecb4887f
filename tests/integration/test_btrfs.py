"""Btrfs specifics on a real loop-mounted filesystem: options, quotas, ownership, crashes."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import btrfsutil
import pytest

from plugin.backends.btrfs import OWNER_XATTR, BtrfsBackend
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


def test_start_finishes_interrupted_work(backend):
    """A crash mid-create or mid-remove leaves a marked subvolume in staging: check() removes it."""
    half = backend.staging_dir / "create.v9.0000"
    btrfsutil.create_subvolume(half)
    os.setxattr(half, OWNER_XATTR, b'{"format": 1, "options": {}}')
    unknown = backend.staging_dir / "not-ours"
    unknown.mkdir()
    backend.check()
    assert sorted(p.name for p in backend.staging_dir.iterdir()) == ["not-ours"]


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
