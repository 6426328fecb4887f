"""A real plugin (gunicorn, Btrfs in its embedded pool image) replaces its worker when idle
after many volumes went (plugin.recycle): the master stays, a new worker answers, and what
the old one knew is still known: the volumes, and the Docker mount IDs of a mounted one."""

from __future__ import annotations

import secrets
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import need
from tests.e2e.harness import PluginProcess, mounts_under


def workers(master: int) -> list[int]:
    children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
    return [int(pid) for pid in children]


@pytest.fixture
def plugin(tmp_path: Path):
    need("mkfs.btrfs", "mount", "umount")
    process = PluginProcess(f"recycle{secrets.token_hex(3)}", tmp_path / "state",
                            {"SNAPVOL_POOL_SIZE": "1G", "SNAPVOL_LOG_LEVEL": "info",
                             "SNAPVOL_RUN_DIR": str(tmp_path / "run"),
                             "SNAPVOL_TRASH_TTL": "0",
                             "SNAPVOL_RECYCLE_DROP": "30", "SNAPVOL_RECYCLE_QUIET": "1"},
                            socket_dir=tmp_path / "sockets")
    try:
        process.start()
        yield process
    finally:
        process.stop()
        for point in mounts_under(tmp_path):
            subprocess.run(["umount", point], check=False, timeout=60)


def ok(plugin: PluginProcess, endpoint: str, body: dict) -> dict:
    status, reply = plugin.call(endpoint, body)
    assert status == 200 and not reply.get("Err"), (endpoint, body, reply)
    return reply


def test_the_worker_is_replaced_after_a_large_drop_and_forgets_nothing(plugin):
    [first] = workers(plugin.pid)
    for i in range(40):
        ok(plugin, "VolumeDriver.Create", {"Name": f"v{i:02d}"})
    time.sleep(2)                                   # looked at once a second: the most seen
    mountpoint = Path(ok(plugin, "VolumeDriver.Mount", {"Name": "v00", "ID": "c1"})["Mountpoint"])
    (mountpoint / "f").write_bytes(b"kept")
    for i in range(1, 30):                          # 29 fewer: one short of the drop
        ok(plugin, "VolumeDriver.Remove", {"Name": f"v{i:02d}"})
    time.sleep(4)                                   # past the quiet time and a few looks
    assert workers(plugin.pid) == [first], "replaced before the drop was reached"

    ok(plugin, "VolumeDriver.Remove", {"Name": "v30"})
    deadline = time.monotonic() + 60
    while workers(plugin.pid) in ([first], []) and time.monotonic() < deadline:
        time.sleep(0.5)
    now = workers(plugin.pid)
    assert now and now != [first], plugin.log_tail()
    assert "handing over to a fresh worker to give the memory back" in plugin.log.read_text()

    names = {v["Name"] for v in ok(plugin, "VolumeDriver.List", {})["Volumes"]}
    assert names == {"v00", *(f"v{i}" for i in range(31, 40))}
    # the new worker knows the mount the old one counted: Remove is refused while it lasts
    status, reply = plugin.call("VolumeDriver.Remove", {"Name": "v00"})
    assert status != 200 and "in use" in reply["Err"], reply
    assert (Path(ok(plugin, "VolumeDriver.Path", {"Name": "v00"})["Mountpoint"]) / "f").read_bytes() == b"kept"
    ok(plugin, "VolumeDriver.Unmount", {"Name": "v00", "ID": "c1"})
    ok(plugin, "VolumeDriver.Remove", {"Name": "v00"})
    time.sleep(4)                                   # one fewer since the new worker began
    assert workers(plugin.pid) == now, "replaced again without a new drop"
