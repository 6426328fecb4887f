"""The ``backend`` fixture: each test once on the fake, on a real loop-mounted Btrfs and on a
real ZFS pool (test modules of one backend define their own ``backend``)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes import FakeBackend


@pytest.fixture(params=["fake", "btrfs", "zfs"])
def backend(request, tmp_path: Path):
    if request.param == "fake":
        b = FakeBackend(tmp_path / "fake")
    elif request.param == "btrfs":
        from plugin.backends.btrfs import BtrfsBackend
        b = BtrfsBackend(request.getfixturevalue("btrfs_mount"))
    else:
        from plugin.backends.zfs import ZfsBackend
        from plugin.backends.zfs_commands import load_libzfs_core
        pool = request.getfixturevalue("zfs_pool")
        b = ZfsBackend(f"{pool}/snapvol", tmp_path / "mnt", load_libzfs_core())
    b.check()
    yield b
    if request.param == "zfs":       # unmount before the pool goes (zfs-fuse keeps mounts busy)
        for volume in b.volumes() + b.internal_volumes():
            b.destroy_volume(volume.name)
