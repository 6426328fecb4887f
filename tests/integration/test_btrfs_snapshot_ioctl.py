"""Btrfs snapshots through ``fcntl.ioctl`` (plugin.backends.btrfs_ioctl): the same snapshot
btrfsutil makes, taken without holding the interpreter lock, so Docker's calls go on while
the scheduler takes a thousand of them (issue 17)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import btrfsutil
import pytest

from plugin.backends import btrfs_ioctl
from plugin.backends.btrfs import BtrfsBackend


@pytest.fixture
def backend(btrfs_mount: Path) -> BtrfsBackend:
    b = BtrfsBackend(btrfs_mount / "snapvol")
    b.root.mkdir()
    b.check()
    return b


def test_the_snapshot_is_read_only_ours_and_holds_the_data(backend):
    path = backend.attach(backend.create_volume("v1", {}).name)
    (path / "f").write_text("data")
    info = backend.create_snapshot("v1", "auto-20261204T000000Z")
    snap = backend.snapshots_dir / "v1" / "auto-20261204T000000Z"
    assert btrfsutil.get_subvolume_read_only(snap)
    assert btrfsutil.subvolume_info(snap).parent_uuid == btrfsutil.subvolume_info(path).uuid
    assert (snap / "f").read_text() == "data"
    assert [s.name for s in backend.snapshots("v1")] == [info.name]   # the mark came along
    with pytest.raises(OSError) as exc:
        btrfs_ioctl.create_snapshot(path, snap, read_only=True)
    assert exc.value.errno == 17                                      # EEXIST, as btrfsutil


def test_other_threads_run_while_snapshots_are_taken(backend):
    """A thread that only counts keeps counting while another takes snapshots in a loop:
    with btrfsutil.create_snapshot (the GIL held through each commit) it stalls."""
    path = backend.attach(backend.create_volume("v1", {}).name)
    target = backend.snapshots_dir / "v1"
    target.mkdir()
    gaps: list[float] = []
    stop = threading.Event()

    def count() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            time.sleep(0.0002)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    counter = threading.Thread(target=count)
    counter.start()
    started = time.perf_counter()
    for i in range(60):
        btrfs_ioctl.create_snapshot(path, target / f"s{i}", read_only=True)
    took = time.perf_counter() - started
    stop.set()
    counter.join()
    assert len(os.listdir(target)) == 60
    # the counter ran all along: its ticks cover most of the time the snapshots took
    assert sum(g for g in gaps if g < 0.002) > 0.5 * took, (took, max(gaps))
