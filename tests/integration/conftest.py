"""The ``backend`` fixture: each test once on the fake, on a real loop-mounted Btrfs and on a
real ZFS pool (test modules of one backend define their own ``backend``).

A test that applies to some of them says so with ``@pytest.mark.backends("btrfs", "zfs")``:
the others are deselected at collection, never run and skipped, so that a skip in this tier
always means something was missing (and fails under scripts/test)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fakes import FakeBackend


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    kept, dropped = [], []
    for item in items:
        marker = item.get_closest_marker("backends")
        param = getattr(getattr(item, "callspec", None), "params", {}).get("backend")
        (dropped if marker and param and param not in marker.args else kept).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


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
