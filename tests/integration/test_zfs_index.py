"""The ZFS backend's index (plugin/backends/zfs_index.py) on a real pool: answers without a
``zfs`` process, follows snapvol's own operations, and sees what the ``zfs`` CLI changes
behind its back — never serving a volume that is gone (issue 17)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from plugin import process
from plugin.backends import zfs_index
from plugin.backends.zfs import ZfsBackend
from plugin.backends.zfs_commands import load_libzfs_core
from plugin.backends.zfs_layout import OPTIONS, OWNER
from plugin.domain import Domain
from plugin.errors import VolumeNotFound
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable


@pytest.fixture
def backend(zfs_pool: str, tmp_path: Path):
    b = ZfsBackend(f"{zfs_pool}/snapvol", tmp_path / "mnt", load_libzfs_core())
    b.check()
    yield b
    for volume in b.volumes() + b.internal_volumes():   # unmount before the pool goes
        b.destroy_volume(volume.name)


@pytest.fixture
def commands(monkeypatch):
    """Every command the plugin runs from here on (argv tuples)."""
    ran: list[tuple[str, ...]] = []
    real = process.run

    def counting(argv, **kwargs):
        ran.append(tuple(str(a) for a in argv))
        return real(argv, **kwargs)
    monkeypatch.setattr(process, "run", counting)
    return ran


def zfs(*argv: str) -> None:
    """The ``zfs`` CLI, behind the plugin's back."""
    result = subprocess.run(["zfs", *argv], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def zfs_busy_ok(*argv: str) -> None:
    """As :func:`zfs`, retried while zfs-fuse calls the dataset busy after an unmount."""
    import time
    for _ in range(50):
        result = subprocess.run(["zfs", *argv], capture_output=True, text=True, timeout=120)
        if result.returncode == 0:
            return
        assert "busy" in result.stderr, result.stderr
        time.sleep(0.2)
    raise AssertionError(result.stderr)


def listed(backend) -> list[str]:
    return sorted(v.name for v in backend.listing())


def test_get_path_mount_and_list_of_mounted_volumes_run_no_zfs_process(backend, commands):
    for name in ("a", "b", "c"):
        backend.create_volume(name, {"size": "64M"})
    commands.clear()
    assert backend.volume("a").name == "a"
    assert backend.attach("b") == backend.volume("b").mountpoint
    assert listed(backend) == ["a", "b", "c"]
    assert backend.usage("a").quota_bytes == 64 << 20
    assert backend.clone_origins() == {}
    assert commands == []


def test_every_own_operation_shows_at_once(backend):
    path = backend.create_volume("a", {})
    (path.mountpoint / "f").write_text("one")
    assert listed(backend) == ["a"]
    backend.create_snapshot("a", "s1")
    backend.clone("a", "s1", "c", {"from": "a@s1"})
    assert listed(backend) == ["a", "c"]
    assert backend.clone_origins() == {"a": {"s1": "c"}}
    assert (backend.attach("c") / "f").read_text() == "one"
    backend.rename_volume("c", "d")
    assert listed(backend) == ["a", "d"]
    assert backend.clone_origins() == {"a": {"s1": "d"}}
    with pytest.raises(VolumeNotFound):
        backend.volume("c")
    backend.attach("d")
    (path.mountpoint / "f").write_text("two")
    backend.create_snapshot("a", "s2")
    backend.rollback("a", "s1")
    assert [s.name for s in backend.snapshots("a")] == ["s1"]
    assert backend.volume("a").name == "a" and (backend.attach("a") / "f").read_text() == "one"
    backend.destroy_volume("d")
    assert listed(backend) == ["a"] and backend.clone_origins() == {}
    with pytest.raises(VolumeNotFound):
        backend.volume("d")


def test_a_volume_destroyed_behind_our_back_is_never_served(backend):
    backend.create_volume("a", {})
    backend.create_volume("b", {})
    assert backend.volume("a").name == "a" and listed(backend) == ["a", "b"]
    zfs_busy_ok("destroy", "-r", f"{backend.root}/a")
    with pytest.raises(VolumeNotFound):
        backend.volume("a")
    assert listed(backend) == ["b"]
    assert [v.name for v in backend.volumes()] == ["b"]


def test_a_volume_destroyed_behind_our_back_is_not_listed_even_unasked(backend):
    """No Get in between: the listing itself must not serve it."""
    backend.create_volume("a", {})
    backend.create_volume("b", {})
    assert listed(backend) == ["a", "b"]
    zfs_busy_ok("destroy", "-r", f"{backend.root}/b")
    assert listed(backend) == ["a"]


def test_a_volume_renamed_behind_our_back_is_seen_under_its_new_name(backend):
    backend.create_volume("a", {})
    assert listed(backend) == ["a"]
    zfs_busy_ok("unmount", f"{backend.root}/a")      # zfs-fuse refuses to rename a mounted one
    zfs_busy_ok("rename", f"{backend.root}/a", f"{backend.root}/z")
    with pytest.raises(VolumeNotFound):
        backend.volume("a")
    assert backend.volume("z").name == "z"
    assert listed(backend) == ["z"]


def test_a_volume_created_behind_our_back_is_seen(backend, monkeypatch):
    backend.create_volume("a", {})
    assert listed(backend) == ["a"]
    # mounted where snapvol mounts its volumes: the mount table shows it at once
    zfs("create", "-o", f"{OWNER}=snapvol", "-o", f"{OPTIONS}={json.dumps({})}",
        "-o", "canmount=noauto", "-o", f"mountpoint={backend.mount_base}/m", f"{backend.root}/m")
    zfs("mount", f"{backend.root}/m")
    assert listed(backend) == ["a", "m"]
    # not mounted: a Get finds it by name; a listing at the latest after MAX_AGE
    zfs("create", "-o", f"{OWNER}=snapvol", "-o", "canmount=noauto",
        "-o", f"mountpoint={backend.mount_base}/u", f"{backend.root}/u")
    zfs("create", "-o", f"{OWNER}=snapvol", "-o", "canmount=noauto",
        "-o", f"mountpoint={backend.mount_base}/v", f"{backend.root}/v")
    assert backend.volume("u").name == "u"
    assert listed(backend) == ["a", "m", "u", "v"]
    backend.attach("u")
    backend.attach("v")
    zfs("create", "-o", f"{OWNER}=snapvol", "-o", "canmount=noauto",
        "-o", f"mountpoint={backend.mount_base}/w", f"{backend.root}/w")
    assert listed(backend) == ["a", "m", "u", "v"]          # made unmounted: not yet...
    now = zfs_index.time.monotonic() + zfs_index.MAX_AGE + 1
    monkeypatch.setattr(backend._index, "_clock", lambda: now)
    listed(backend)                     # ...but once MAX_AGE has passed, it re-syncs
    backend._index.settle(60)           # (in the background: this List did not wait)
    assert listed(backend) == ["a", "m", "u", "v", "w"]


def test_snapshots_made_or_destroyed_behind_our_back_are_seen(backend):
    backend.create_volume("a", {})
    backend.create_snapshot("a", "s1")
    assert [s.name for s in backend.snapshots("a")] == ["s1"]
    zfs("snapshot", f"{backend.root}/a@theirs")
    assert [s.name for s in backend.snapshots("a")] == ["s1", "theirs"]
    zfs("destroy", f"{backend.root}/a@s1")
    assert [s.name for s in backend.snapshots("a")] == ["theirs"]
    zfs("clone", "-o", f"{OWNER}=snapvol", "-o", "canmount=noauto",
        "-o", f"mountpoint={backend.mount_base}/c", f"{backend.root}/a@theirs", f"{backend.root}/c")
    assert backend.volume("c").name == "c"
    assert backend.clone_origins() == {"a": {"theirs": "c"}}


def test_removing_a_clone_origin_promotes_from_the_index_without_listing_all(backend, commands):
    path = backend.create_volume("a", {}).mountpoint
    (path / "f").write_text("data")
    backend.create_snapshot("a", "s1")
    backend.clone("a", "s1", "c1", {"from": "a@s1"})
    backend.clone("a", "s1", "c2", {"from": "a@s1"})
    for name in ("x", "y"):
        backend.create_volume(name, {})
    commands.clear()
    backend.destroy_volume("a")
    assert [c for c in commands if "-r" in c and backend.root in c] == [], commands
    assert listed(backend) == ["c1", "c2", "x", "y"]
    for clone in ("c1", "c2"):
        assert (backend.attach(clone) / "f").read_text() == "data"
    # c1 (promoted first) took s1 over; c2 is a clone of it now, as the filesystem says
    origins = backend.clone_origins()
    assert origins == {"c1": {"s1": "c2"}}
    fresh = ZfsBackend(backend.root, backend.mount_base, load_libzfs_core())
    fresh.check()
    assert fresh.clone_origins() == origins


def test_removing_an_origin_whose_clone_was_made_behind_our_back_still_promotes_it(backend):
    path = backend.create_volume("a", {}).mountpoint
    (path / "f").write_text("data")
    backend.create_snapshot("a", "s1")
    zfs("clone", "-o", f"{OWNER}=snapvol", "-o", "canmount=noauto",
        "-o", f"mountpoint={backend.mount_base}/theirs", f"{backend.root}/a@s1", f"{backend.root}/theirs")
    backend.destroy_volume("a")
    assert listed(backend) == ["theirs"]
    assert (backend.attach("theirs") / "f").read_text() == "data"


def test_remove_through_the_service_runs_as_many_commands_at_3_as_at_13_volumes(backend, commands, tmp_path):
    """Issue 17: Remove constant in N (it listed every dataset, up to three times)."""
    domain = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2))
    domain.volumes.open()

    def remove_cost() -> int:
        domain.volumes.create("gone", {})
        commands.clear()
        domain.volumes.remove("gone")
        return len(commands)
    for i in range(2):
        domain.volumes.create(f"v{i}", {})
    few = remove_cost()
    for i in range(2, 12):
        domain.volumes.create(f"v{i}", {})
    assert remove_cost() == few
    assert not [c for c in commands if "-r" in c and backend.root in c], commands


def test_a_listing_with_an_unmounted_volume_asks_about_that_one_alone(backend, commands):
    """zfs-fuse mounts no more than 999 datasets here: the 1,000th volume stays unmounted,
    and a listing must not fall back to listing every dataset for it."""
    for name in ("a", "b", "c"):
        backend.create_volume(name, {})
    zfs_busy_ok("unmount", f"{backend.root}/b")
    commands.clear()
    assert listed(backend) == ["a", "b", "c"]
    if backend.describe()["libzfs_core"]:
        assert commands == []                       # lzc_exists
    else:
        assert commands == [("zfs", "get", "-H", "-o", "name", "type", f"{backend.root}/b")]
