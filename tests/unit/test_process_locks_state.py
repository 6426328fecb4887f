from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

import pytest

from plugin import process
from plugin.config import Settings
from plugin.errors import (AlreadyRunning, BackendError, CommandFailed, CommandTimeout,
                           ConfigError, VolumeBusy)
from plugin.locks import VolumeLocks, single_instance
from plugin.mounts import MountTable
from plugin.statefile import read_json, write_json_atomically


def test_run_returns_output():
    result = process.run(["sh", "-c", "echo out; echo err >&2"])
    assert (result.returncode, result.stdout, result.stderr) == (0, "out\n", "err\n")


def test_run_refuses_shell_strings():
    with pytest.raises(TypeError, match="never a shell string"):
        process.run("echo hi")  # type: ignore[arg-type]


def test_run_failure_carries_command_and_stderr_tail():
    with pytest.raises(CommandFailed) as info:
        process.run(["sh", "-c", "echo one >&2; echo two >&2; exit 3"])
    assert str(info.value) == "sh -c 'echo one >&2; echo two >&2; exit 3' failed (exit 3): one; two"


def test_run_timeout_kills():
    started = time.monotonic()
    with pytest.raises(CommandTimeout, match="timed out after 0.2 s"):
        process.run(["sleep", "5"], timeout=0.2)
    assert time.monotonic() - started < 3


def test_run_missing_program():
    with pytest.raises(BackendError, match="no-such-program: command not found"):
        process.run(["no-such-program"])


def test_run_child_gets_a_clean_environment(monkeypatch):
    monkeypatch.setenv("SECRET_TOKEN", "x")
    env = process.run(["env"]).stdout
    assert "SECRET_TOKEN" not in env and "LC_ALL=C.UTF-8" in env


def test_arguments_are_never_interpreted(tmp_path: Path):
    marker = tmp_path / "F"
    out = process.run(["echo", f"$(touch {marker})", f"; touch {marker}"]).stdout
    assert not marker.exists() and "$(touch" in out


def test_locks_bounded_wait_and_sorted_order():
    locks = VolumeLocks(timeout=0.2)
    with locks.hold("b", "a"):
        with pytest.raises(VolumeBusy, match="volume a is busy"):
            with locks.hold("a"):
                pass
    with locks.hold("a"):          # released and reusable
        pass
    assert locks._entries == {}    # idle entries are dropped


def test_locks_serialise_one_volume_not_others():
    locks = VolumeLocks(timeout=5)
    order: list[str] = []
    inside = threading.Event()

    def slow() -> None:
        with locks.hold("a"):
            inside.set()
            time.sleep(0.3)
            order.append("slow")

    thread = threading.Thread(target=slow)
    thread.start()
    inside.wait()
    with locks.hold("b"):
        order.append("other volume")
    with locks.hold("a"):
        order.append("same volume")
    thread.join()
    assert order == ["other volume", "slow", "same volume"]


def test_single_instance(tmp_path: Path):
    fd = single_instance(tmp_path)
    try:
        with pytest.raises(AlreadyRunning, match=f"pid {os.getpid()}"):
            single_instance(tmp_path, wait=0.3)
    finally:
        os.close(fd)
    os.close(single_instance(tmp_path, wait=0.3))   # free again once the holder closes


def test_atomic_write_and_read(tmp_path: Path):
    path = tmp_path / "s.json"
    assert read_json(path, {"default": 1}) == {"default": 1}
    write_json_atomically(path, {"a": [1, 2]})
    assert json.loads(path.read_text()) == {"a": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]   # no temp files left


def test_mount_table_persists_multiset(tmp_path: Path):
    path = tmp_path / "mounts.json"
    table = MountTable(path)
    table.add("v", "id1")
    table.add("v", "id1")
    table.add("w", "id2")
    reloaded = MountTable(path)
    assert reloaded.users("v") == ["id1", "id1"]
    assert reloaded.discard("v", "nope") is None
    assert reloaded.discard("v", "id1") is False
    assert reloaded.discard("v", "id1") is True
    assert MountTable(path).in_use() == {"w": 1}
    assert MountTable(path).forget("w") == ["id2"]
    assert MountTable(path).in_use() == {}


def test_mount_table_changes_memory_only_once_saved(tmp_path: Path, monkeypatch):
    """A mount or unmount whose table could not be saved changes nothing: memory and disk
    agree, so a restart cannot resurrect or lose a mount the caller was told had failed."""
    path = tmp_path / "mounts.json"
    table = MountTable(path)
    table.add("v", "id1")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("plugin.mounts.write_json_atomically", disk_full)
    with pytest.raises(OSError):
        table.add("v", "id2")
    with pytest.raises(OSError):
        table.add("w", "id3")
    with pytest.raises(OSError):
        table.discard("v", "id1")
    with pytest.raises(OSError):
        table.forget("v")
    assert table.in_use() == {"v": 1} and table.users("v") == ["id1"]
    monkeypatch.undo()
    assert MountTable(path).in_use() == {"v": 1}


def test_mount_table_from_an_earlier_boot_is_discarded(tmp_path: Path):
    path = tmp_path / "mounts.json"
    MountTable(path, boot_id="boot-1").add("v", "id1")
    assert MountTable(path, boot_id="boot-1").users("v") == ["id1"]
    assert MountTable(path, boot_id="boot-2").in_use() == {}


def test_settings_defaults_and_errors():
    settings = Settings.from_env({})
    assert settings.btrfs_root is None and settings.pool_mountpoint == Path("/var/lib/snapvol/pool")
    assert settings.socket == Path("/run/docker/plugins/snapvol.sock")
    assert settings.mount_table == Path("/run/snapvol/snapvol/mounts.json")
    other = Settings.from_env({"SNAPVOL_SOCKET": "/run/docker/plugins/snapvolzfs.sock"})
    assert other.driver == "snapvolzfs"
    assert other.mount_table == Path("/run/snapvol/snapvolzfs/mounts.json")
    custom = Settings.from_env({"SNAPVOL_BTRFS_ROOT": "/srv/b", "SNAPVOL_POOL_SIZE": "2G"})
    assert custom.btrfs_root == Path("/srv/b") and custom.pool_size == 2 << 30
    managed = Settings.from_env({"SNAPVOL_PUBLISH_DIR": "/mnt/volumes"})
    assert managed.pool_mountpoint == Path("/mnt/volumes/pool")
    for env, message in [({"SNAPVOL_BACKEND": "ext4"}, "SNAPVOL_BACKEND='ext4': must be one of"),
                         ({"SNAPVOL_STATE_DIR": "rel"}, "SNAPVOL_STATE_DIR='rel': must be an absolute path"),
                         ({"SNAPVOL_POOL_SIZE": "1M"}, "SNAPVOL_POOL_SIZE='1M': must be at least 256M"),
                         ({"SNAPVOL_LOCK_TIMEOUT": "-1"}, "SNAPVOL_LOCK_TIMEOUT='-1': must be a number")]:
        with pytest.raises(ConfigError) as info:
            Settings.from_env(env)
        assert str(info.value).startswith(message)


@pytest.mark.parametrize("damage", [b"", b'{"v1": {"at": "2026-', b"\xff\xfe not utf-8",
                                    b"<html>not json</html>"])
def test_a_damaged_state_file_is_moved_aside_never_fatal(tmp_path: Path, caplog, damage):
    """Truncated, empty, binary or foreign: each state file loads as empty, the damaged
    file is kept aside under a name that says so, and one error line names both."""
    from plugin.history import AutoHistory, ReplicationLog
    from plugin.statefile import quarantined

    for name, load in (("schedule.json", AutoHistory), ("replication.json", ReplicationLog),
                       ("mounts.json", MountTable)):
        path = tmp_path / name
        path.write_bytes(damage)
        caplog.clear()
        loaded = load(path)
        assert not path.exists()
        aside = [p for p in quarantined(tmp_path) if p.name.startswith(name + ".corrupt-")]
        assert len(aside) == 1 and aside[0].read_bytes() == damage
        errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
        assert len(errors) == 1 and str(path) in errors[0] and aside[0].name in errors[0]
        if isinstance(loaded, MountTable):
            assert loaded.in_use() == {}
            loaded.add("v", "id1")                     # and it works on: a fresh file
            assert MountTable(path).users("v") == ["id1"]
    path = tmp_path / "schedule.json"
    path.write_bytes(b"{")
    AutoHistory(path)
    assert len([p for p in quarantined(tmp_path) if "schedule" in p.name]) == 2   # never overwritten


def test_replication_log_reads_while_it_is_written(tmp_path: Path, monkeypatch):
    """Status, retention and the scheduler read the replication log while replications
    record into it from other threads: a read must never see the dicts change under it."""
    import sys
    from datetime import datetime, timezone

    from plugin.history import Replication, ReplicationLog

    monkeypatch.setattr("plugin.history.write_json_atomically", lambda *a, **k: None)
    replications = ReplicationLog(tmp_path / "replication.json")
    now = datetime.now(timezone.utc)
    failures: list[BaseException] = []
    stop = threading.Event()

    def writer():
        for n in range(20000):
            if stop.is_set():
                return
            replications.record("v", Replication(f"ssh://t{n}", now, f"s{n}"))

    def reader():
        try:
            while not stop.is_set():
                replications.bases("v")
                replications.last("v")
        except RuntimeError as exc:                     # dictionary changed size during iteration
            failures.append(exc)
            stop.set()

    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=writer), threading.Thread(target=reader)]
        for t in threads:
            t.start()
        threads[0].join(30)
        stop.set()
        threads[1].join(30)
    finally:
        sys.setswitchinterval(old)
    assert not failures, failures
