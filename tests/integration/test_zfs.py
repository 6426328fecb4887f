"""ZFS specifics on a real pool (zfs-fuse here; OpenZFS in the VM lane): options, ownership,
crash leftovers, mounting."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest

from plugin.backends.zfs import ZfsBackend
from plugin.backends.zfs_commands import load_libzfs_core
from plugin.backends.zfs_layout import OWNER
from plugin.errors import BackendError, BackendUnavailable, InvalidOption
from plugin.locks import VolumeLocks
from plugin.mounts import MountTable
from plugin.mountinfo import mounted_filesystem
from plugin.domain import Domain
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
    domain = Domain.assemble(backend, MountTable(tmp_path / "m.json"), VolumeLocks(5))
    with pytest.raises(InvalidOption, match="option nocow is for btrfs volumes only; this plugin "
                                            "stores volumes on zfs"):
        domain.volumes.create("v1", {"nocow": "true"})
    if "lz4" not in backend.compressions:
        with pytest.raises(InvalidOption, match="this ZFS .zfs-fuse, pool version 23. has no lz4"):
            domain.volumes.create("v1", {"compression": "lz4"})
    with pytest.raises(InvalidOption, match="must be a power of 2 from 512 to 1M"):
        domain.volumes.create("v1", {"recordsize": "3K"})
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


ZFS_CRASH_AT = """
import os, sys
from pathlib import Path
from plugin import process
from plugin.backends.zfs import ZfsBackend
from plugin.backends.zfs_commands import load_libzfs_core
backend = ZfsBackend(sys.argv[1], Path(sys.argv[2]), load_libzfs_core())
backend.check()
real, sets, stop_after = process.run, [], int(sys.argv[3])
def dies_like_kill_9(argv, *args, **kwargs):
    if argv[:2] == ["zfs", "set"]:
        sets.append(argv)
        if len(sets) > stop_after:
            os._exit(137)          # no finally, no cleanup: as SIGKILL
    return real(argv, *args, **kwargs)
process.run = dies_like_kill_9   # every zfs command goes through it
with backend.receiving("r1", "s1", None, {"mode": "750"}) as pipe:
    pipe.write(sys.stdin.buffer.read())
"""


@pytest.mark.parametrize("sets_before_the_kill", [0, 1, 2])
def test_a_full_receive_killed_at_any_step_leaves_nothing_at_next_start(backend, sets_before_the_kill):
    """kill -9 after the stream was received: before the inbox was marked, after it was
    renamed, after a property was set. The next start removes what is left, the same stream is
    received again, and the name is free for a new volume too."""
    import sys
    path = backend.attach(backend.create_volume("v1", {}).name)
    (path / "f").write_text("data")
    backend.create_snapshot("v1", "s1")
    raw = subprocess.run(backend.send_argv("v1", "s1", None), capture_output=True, check=True).stdout
    child = subprocess.run([sys.executable, "-c", ZFS_CRASH_AT, backend.root, str(backend.mount_base),
                            str(sets_before_the_kill)], input=raw, capture_output=True,
                           cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert child.returncode == 137, child.stderr.decode()[-2000:]
    left = subprocess.run(["zfs", "list", "-H", "-o", "name", "-r", backend.root],
                          capture_output=True, text=True, check=True).stdout.split()
    assert any(name.endswith(("/recv:r1", "/r1")) for name in left), left   # the crash left it
    restarted = ZfsBackend(backend.root, backend.mount_base, load_libzfs_core())
    restarted.check()
    left = subprocess.run(["zfs", "list", "-H", "-o", "name", "-r", backend.root],
                          capture_output=True, text=True, check=True).stdout.split()
    assert not [n for n in left if "r1" in n], left
    with restarted.receiving("r1", "s1", None, {"mode": "750"}) as pipe:
        pipe.write(raw)
    assert (restarted.attach("r1") / "f").read_text() == "data"
    assert [s.name for s in restarted.snapshots("r1")] == ["s1"]
    restarted.destroy_volume("r1")
    restarted.create_volume("r1", {})
    assert restarted.snapshots("r1") == []


def test_check_lists_an_interrupted_receive_and_the_next_start_destroys_it(backend, tmp_path):
    """kill -9 of a receive before its inbox was marked: check names the inbox, not while a
    receive into that name runs, and the next start destroys it (the parent untouched)."""
    import sys
    path = backend.attach(backend.create_volume("v1", {}).name)
    (path / "f").write_text("data")
    backend.create_snapshot("v1", "s1")
    raw = subprocess.run(backend.send_argv("v1", "s1", None), capture_output=True, check=True).stdout
    domain = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2))
    child = subprocess.run([sys.executable, "-c", ZFS_CRASH_AT, backend.root, str(backend.mount_base),
                            "0"], input=raw, capture_output=True,
                           cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert child.returncode == 137, child.stderr.decode()[-2000:]
    problems = domain.checker.check()["problems"]     # a whole stream, so no resume token either
    assert [p["what"].split(":")[0] for p in problems] == [f"{backend.root}/recv"], problems
    assert problems[0]["note"] == "the next start of the plugin will destroy it"
    with domain.inflight.receiving_into("r1"):
        assert domain.checker.check()["problems"] == []
    restarted = ZfsBackend(backend.root, backend.mount_base, load_libzfs_core())
    restarted.check()
    assert Domain.assemble(restarted, MountTable(tmp_path / "mounts.json"),
                           VolumeLocks(2)).checker.check()["problems"] == []
    assert zget(backend.root, "type") == "filesystem"
    assert subprocess.run(["zfs", "list", f"{backend.root}/recv:r1"], capture_output=True).returncode != 0


def test_a_full_pool_refuses_a_rollback_before_it_destroys_anything(backend):
    """zfs rollback -r destroys the newer snapshots, then fails for lack of space: on a full
    pool the rollback is refused first, and removing a volume still frees space."""
    import errno as errnos

    path = backend.attach(backend.create_volume("v1", {}).name)
    (path / "f").write_text("one")
    backend.create_snapshot("v1", "s1")
    (path / "f").write_text("two")
    backend.create_snapshot("v1", "s2")
    filler = backend.attach(backend.create_volume("filler", {}).name)
    assert write_until_refused(filler / "big", 1024).errno in (errnos.ENOSPC, errnos.EDQUOT)
    with pytest.raises(BackendError, match="the pool is full") as caught:
        backend.rollback("v1", "s1")
    assert caught.value.errno == errnos.ENOSPC
    assert [s.name for s in backend.snapshots("v1")] == ["s1", "s2"]
    backend.destroy_volume("filler")          # the way out of a full pool
    backend.rollback("v1", "s1")
    assert (path / "f").read_text() == "one"


def test_a_failed_incremental_receive_leaves_no_snapshot_even_if_zfs_made_it(backend):
    """Our envelope failed (or zfs-fuse said "I/O error") after zfs had received the whole
    stream: the snapshot zfs made was never accepted, so it is removed, and the volume's
    content is the base's again (format 3 relays the native stream unheld, so zfs may well
    have taken all of it before the envelope's end mark is found bad)."""
    import time

    path = backend.attach(backend.create_volume("v1", {}).name)
    (path / "f").write_text("one")
    backend.create_snapshot("v1", "s1")
    full = subprocess.run(backend.send_argv("v1", "s1", None), capture_output=True, check=True).stdout
    (path / "f").write_text("two")
    backend.create_snapshot("v1", "s2")
    inc = subprocess.run(backend.send_argv("v1", "s2", "s1"), capture_output=True, check=True).stdout
    with backend.receiving("copy", "s1", None, {}) as pipe:
        pipe.write(full)
    with pytest.raises(RuntimeError, match="checksum"):
        with backend.receiving("copy", "s2", "s1", {}) as pipe:
            pipe.write(inc)
            pipe.close()                                 # zfs has it all and finishes
            deadline = time.monotonic() + 30
            while "s2" not in [s.name for s in backend.snapshots("copy")]:
                assert time.monotonic() < deadline, "zfs never finished the receive"
                time.sleep(0.1)
            raise RuntimeError("the envelope's checksum did not match")
    assert [s.name for s in backend.snapshots("copy")] == ["s1"]
    assert (backend.attach("copy") / "f").read_text() == "one"


KILLED_AT_PROMOTE = """
import os, sys
from pathlib import Path
from plugin import process
from plugin.backends.zfs import ZfsBackend
from plugin.backends.zfs_commands import load_libzfs_core
backend = ZfsBackend(sys.argv[1], Path(sys.argv[2]), load_libzfs_core())
real = process.run
def dies_like_kill_9(argv, *args, **kwargs):
    result = real(argv, *args, **kwargs)
    if argv[:2] == ["zfs", "promote"]:
        os._exit(137)              # right after the clone took the snapshots over
    return result
process.run = dies_like_kill_9
backend.destroy_volume("v1")
"""


def test_a_remove_killed_after_promoting_a_clone_is_finished_by_the_next_start(backend):
    """Promoting a clone moves the removed volume's older snapshots to it: a kill right
    after must not leave the volume visible without them; the next start finishes it."""
    import sys
    path = backend.attach(backend.create_volume("v1", {}).name)
    (path / "f").write_text("data")
    backend.create_snapshot("v1", "s1")
    backend.clone("v1", "s1", "c1", {"from": "v1@s1"})
    child = subprocess.run([sys.executable, "-c", KILLED_AT_PROMOTE, backend.root,
                            str(backend.mount_base)], capture_output=True,
                           cwd=Path(__file__).resolve().parents[2], timeout=300)
    assert child.returncode == 137, child.stderr.decode()[-2000:]
    # never v1 without s1, as a restarted plugin reads the pool before finishing the removal
    # (this object's index saw v1 before another process changed it; a kill -9 of the
    # plugin takes its index with it)
    assert [v.name for v in ZfsBackend(backend.root, backend.mount_base,
                                       load_libzfs_core()).volumes()] == ["c1"]
    restarted = ZfsBackend(backend.root, backend.mount_base, load_libzfs_core())
    restarted.check()
    assert restarted.leftovers() == []
    assert subprocess.run(["zfs", "list", f"{backend.root}/v1"], capture_output=True).returncode != 0
    assert (restarted.attach("c1") / "f").read_text() == "data"


def test_a_remove_the_filesystem_refuses_leaves_the_volume_visible_to_retry(backend, monkeypatch):
    """A promote refused for lack of space (seen with scripts/torture on a full pool) must not
    leave the volume marked for removal: invisible to Docker, yet never removed."""
    from plugin.errors import CommandFailed

    backend.attach(backend.create_volume("v1", {}).name)

    def refused(dataset):
        raise CommandFailed(["zfs", "promote", "x"], 1, "cannot promote 'x': out of space")
    monkeypatch.setattr(backend._remover, "promote_clones", refused)
    with pytest.raises(BackendError, match="out of space"):
        backend.destroy_volume("v1")
    assert [v.name for v in backend.volumes()] == ["v1"] and backend.leftovers() == []
    monkeypatch.undo()
    backend.destroy_volume("v1")
    assert backend.volumes() == []


def test_a_remove_refused_as_busy_leaves_the_volume_visible_and_a_retry_removes_it(backend, tmp_path):
    """Issue 17: a Remove that zfs refused with "dataset is busy" (a process outside Docker
    sits in the volume) must not leave a dataset marked as being removed, invisible, that a
    repeated Remove calls "no such volume". The volume stays listed and whole, its snapshots
    too (libzfs_core destroys those first); once the process has gone, Remove succeeds."""
    domain = Domain.assemble(backend, MountTable(tmp_path / "mounts.json"), VolumeLocks(2))
    domain.volumes.open()
    domain.volumes.create("v1", {})
    path = domain.volumes.mount("v1", "m1")
    (path / "f").write_text("data")
    domain.volumes.unmount("v1", "m1")
    domain.volumes.snapshot(["v1"], "s1")
    squatter = subprocess.Popen(["sleep", "120"], cwd=path)
    try:
        with pytest.raises(BackendError, match="busy"):
            domain.volumes.remove("v1")
        assert [v.name for v in domain.volumes.list()] == ["v1"]
        assert [s.name for s in domain.volumes.snapshots("v1")] == ["s1"]   # nothing destroyed
        assert zget(f"{backend.root}/v1", OWNER) == "snapvol"
        assert domain.checker.check()["problems"] == []
    finally:
        squatter.kill()
        squatter.wait()
    assert (domain.volumes.mount("v1", "m2") / "f").read_text() == "data"
    domain.volumes.unmount("v1", "m2")
    domain.volumes.remove("v1")
    assert domain.volumes.list() == []
    assert subprocess.run(["zfs", "list", f"{backend.root}/v1"], capture_output=True).returncode != 0
