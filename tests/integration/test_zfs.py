"""ZFS specifics on a real pool (zfs-fuse here; OpenZFS in the VM lane): options, ownership,
crash leftovers, mounting."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from plugin.backends.zfs import OWNER, ZfsBackend, load_libzfs_core
from plugin.errors import BackendError, BackendUnavailable, InvalidOption
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.mountinfo import mounted_filesystem
from plugin.volumes import VolumeService
from tests.conftest import assert_refuses_foreign, write_until_refused


@pytest.fixture
def backend(zfs_pool: str, tmp_path: Path):
    b = ZfsBackend(f"{zfs_pool}/parent/snapvol", tmp_path / "mnt", load_libzfs_core())
    b.check()
    yield b
    for volume in b.volumes():
        b.destroy_volume(volume.name)
    for extra in ("theirs",):
        subprocess.run(["zfs", "destroy", f"{b.root}/{extra}"], capture_output=True)


def zget(dataset: str, prop: str) -> str:
    return subprocess.run(["zfs", "get", "-H", "-p", "-o", "value", prop, dataset],
                          capture_output=True, text=True, check=True).stdout.strip()


def test_libzfs_core_is_used_where_openzfs_is_present(backend):
    """The lane on real OpenZFS must exercise pyzfs, not quietly fall back to the CLI."""
    uses_lzc = backend.describe()["libzfs_core"]
    assert uses_lzc == (load_libzfs_core() is not None)
    if os.environ.get("SNAPVOL_REQUIRE_LIBZFS_CORE") == "1":
        assert uses_lzc, "OpenZFS lane without libzfs_core"
        assert backend.describe()["implementation"].startswith("OpenZFS")


def test_parent_created_and_volume_is_a_marked_dataset(backend):
    assert zget(backend.root, "type") == "filesystem"
    info = backend.create_volume("v1", {})
    dataset = f"{backend.root}/v1"
    assert zget(dataset, OWNER) == "snapvol"
    assert zget(dataset, "canmount") == "noauto"          # a host `zfs mount -a` skips it
    assert zget(dataset, "mountpoint") == str(info.mountpoint)
    assert mounted_filesystem(info.mountpoint) is not None


def test_options_become_properties(backend):
    compression = "lz4" if "lz4" in backend.compressions else "gzip-3"
    info = backend.create_volume("v1", {"size": "64M", "compression": compression,
                                        "recordsize": "16K", "atime": "off", "uid": "1234",
                                        "gid": "5678", "mode": "750"})
    dataset = f"{backend.root}/v1"
    assert zget(dataset, "refquota") == str(64 << 20)
    assert zget(dataset, "compression") == compression
    assert zget(dataset, "recordsize") == str(16 << 10)
    assert zget(dataset, "atime") == "off"
    st = os.stat(info.mountpoint)
    assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o7777)) == (1234, 5678, "0o750")
    assert backend.usage("v1").quota_bytes == 64 << 20


def test_refquota_stops_writes(backend):
    info = backend.create_volume("small", {"size": "8M"})
    assert write_until_refused(info.mountpoint / "big", 32).errno == 122   # EDQUOT


def test_service_refuses_btrfs_options_and_unsupported_compression(backend, tmp_path):
    service = VolumeService(backend, MountTable(tmp_path / "m.json"), VolumeLocks(5))
    with pytest.raises(InvalidOption, match="option nocow is for btrfs volumes only; this plugin "
                                            "stores volumes on zfs"):
        service.create("v1", {"nocow": "true"})
    if "lz4" not in backend.compressions:
        with pytest.raises(InvalidOption, match="this ZFS .zfs-fuse, pool version 23. has no lz4"):
            service.create("v1", {"compression": "lz4"})
    with pytest.raises(InvalidOption, match="must be a power of 2 from 512 to 1M"):
        service.create("v1", {"recordsize": "3K"})
    assert backend.volumes() == []


def test_foreign_dataset_is_invisible_and_untouched(backend):
    foreign = f"{backend.root}/theirs"
    subprocess.run(["zfs", "create", "-o", "canmount=noauto", "-o", "mountpoint=none", foreign],
                   check=True)
    assert_refuses_foreign(backend, "theirs")
    assert zget(foreign, "type") == "filesystem"


def test_start_destroys_datasets_left_half_made(backend):
    half = f"{backend.root}/v9"
    subprocess.run(["zfs", "create", "-o", f"{OWNER}=creating", "-o", "canmount=noauto",
                    "-o", "mountpoint=none", half], check=True)
    assert backend.volumes() == []
    backend.check()
    assert subprocess.run(["zfs", "list", half], capture_output=True).returncode != 0


def test_attach_remounts_a_volume_that_lost_its_mount(backend):
    info = backend.create_volume("v1", {})
    (info.mountpoint / "f").write_text("kept")
    subprocess.run(["zfs", "unmount", f"{backend.root}/v1"], check=True)
    assert not (info.mountpoint / "f").exists()
    assert (backend.attach("v1") / "f").read_text() == "kept"


def test_missing_pool_is_refused_clearly(zfs_service, tmp_path):
    with pytest.raises(BackendUnavailable, match="ZFS pool nosuchpool-x does not exist"):
        ZfsBackend("nosuchpool-x/snapvol", tmp_path).check()


def test_a_refused_snapshot_destroy_says_why_and_keeps_errno(backend):
    """libzfs_core's errors for several snapshots only say "one or more reasons": the error
    must carry each one's reason and the errno (EEXIST: the snapshot has a clone)."""
    backend.create_volume("v1", {})
    backend.create_snapshot("v1", "s1")
    backend.clone("v1", "s1", "c1", {})
    with pytest.raises(BackendError) as caught:
        backend.destroy_snapshot("v1", "s1")
    if backend.describe()["libzfs_core"]:
        assert caught.value.errno == errno.EEXIST and "EEXIST" in str(caught.value), caught.value
    else:                                        # zfs-fuse: the zfs CLI's stderr says it
        assert "dependent clones" in str(caught.value), caught.value
    assert [s.name for s in backend.snapshots("v1")] == ["s1"]
