"""`snapvol send | snapvol receive` between two real plugin processes (gunicorn, Btrfs in
their embedded pool images): the stream goes out over HTTP/1.0 (format 3: spliced by the
sending plugin into the socket) and is relayed by splice(2) in `snapvol send`, forwarded by
splice(2) in `snapvol receive`, with and without zstd, and in each format; a stream cut on
its way is refused with nothing left; `snapvol replicate` from plugin to plugin, full and
incremental."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import need
from tests.e2e.harness import PluginProcess, mounts_under

SNAPVOL = [sys.executable, "-c", "import sys; from plugin.cli import main; sys.exit(main())"]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def pair(tmp_path: Path):
    need("mkfs.btrfs", "mount", "umount", "zstd")
    plugins = [PluginProcess(f"clistream{secrets.token_hex(3)}", tmp_path / f"state{i}",
                             {"SNAPVOL_POOL_SIZE": "1G", "SNAPVOL_LOG_LEVEL": "warning",
                              "SNAPVOL_RUN_DIR": str(tmp_path / f"run{i}")},
                             socket_dir=tmp_path / "sockets")
               for i in (1, 2)]
    try:
        for p in plugins:
            p.start()
        yield plugins
    finally:
        for p in plugins:
            p.stop()
        for point in mounts_under(tmp_path):
            subprocess.run(["umount", point], check=False, timeout=60)


def snapvol(plugin: PluginProcess, *argv: str, **kw) -> subprocess.Popen:
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.Popen([*SNAPVOL, "--socket", str(plugin.socket), *argv], cwd=REPO, **kw)


def through(source: PluginProcess, replica: PluginProcess, spec: str, name: str,
            *extra: str, cut: int | None = None) -> tuple[int, str]:
    sender = snapvol(source, "send", spec, *extra, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    if cut is None:
        receiver = snapvol(replica, "receive", name, stdin=sender.stdout, stdout=subprocess.PIPE)
        sender.stdout.close()
    else:   # only the first *cut* bytes get through
        receiver = snapvol(replica, "receive", name, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        receiver.stdin.write(sender.stdout.read(cut))
        receiver.stdin.close()
        receiver.stdin = None                 # communicate() must not flush it again
        sender.stdout.close()
    out, err = receiver.communicate(timeout=300)
    sender.wait(timeout=300)
    return receiver.returncode, (out + err).decode()


def volume_path(plugin: PluginProcess, name: str) -> Path:
    status, reply = plugin.call("VolumeDriver.Mount", {"Name": name, "ID": "test"})
    assert status == 200, reply
    return Path(reply["Mountpoint"])


@pytest.mark.parametrize("extra", [(), ("--compress", "zstd"), ("--format", "2"), ("--format", "1")],
                         ids=["plain", "zstd", "format2", "format1"])
def test_send_into_receive(pair, extra):
    source, replica = pair
    assert source.call("VolumeDriver.Create", {"Name": "db"})[0] == 200
    data = os.urandom(3 << 20) + b"row\n" * 500_000
    (volume_path(source, "db") / "table").write_bytes(data)
    assert source.call("Snapvol.SnapshotCreate", {"Volumes": ["db"], "Name": "s1"})[0] == 200
    code, said = through(source, replica, "db@s1", "copy", *extra)
    assert code == 0 and "received copy@s1 (full)" in said, said
    assert (volume_path(replica, "copy") / "table").read_bytes() == data


def test_a_stream_cut_on_its_way_is_refused_and_leaves_nothing(pair):
    source, replica = pair
    source.call("VolumeDriver.Create", {"Name": "db"})
    (volume_path(source, "db") / "table").write_bytes(os.urandom(4 << 20))
    source.call("Snapvol.SnapshotCreate", {"Volumes": ["db"], "Name": "s1"})
    code, said = through(source, replica, "db@s1", "copy", cut=(2 << 20) + 12345)
    assert code == 2 and "truncated" in said, said
    assert replica.call("VolumeDriver.List", {})[1]["Volumes"] == []


def test_replicate_from_plugin_to_plugin(pair):
    source, replica = pair
    assert source.call("VolumeDriver.Create", {"Name": "db"})[0] == 200
    table = volume_path(source, "db") / "table"
    table.write_bytes(os.urandom(5 << 20))
    for snapshot in ("s1", "s2"):                         # full, then incremental
        if snapshot == "s2":
            table.write_bytes(table.read_bytes()[:1 << 20] + b"changed")
        assert source.call("Snapvol.SnapshotCreate", {"Volumes": ["db"], "Name": snapshot})[0] == 200
        proc = snapvol(source, "replicate", "db", f"unix://{replica.socket}", "--as", "copy",
                       "--snapshot", snapshot, stdout=subprocess.PIPE)
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, (out + err).decode()
        assert (volume_path(replica, "copy") / "table").read_bytes() == table.read_bytes()
        replica.call("VolumeDriver.Unmount", {"Name": "copy", "ID": "test"})
