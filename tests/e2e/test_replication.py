"""Send/receive through files, replication over real ssh, bad streams, and transfers that hang,
between two host instances of each backend (each with its own pool and socket)."""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from plugin.cli import main
from tests.e2e.harness import inspect_volume, remove_volume, unique

RUN = ("run", "--rm", "--network", "none")


def cli(instance, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--socket", str(instance.socket)], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def fill(docker, busybox, instance, volume: str, script: str) -> None:
    docker(*RUN, "--mount", f"type=volume,source={volume},target=/data,volume-driver={instance.driver}",
           busybox, "sh", "-c", script)


def digest(docker, busybox, instance, volume: str) -> str:
    return docker(*RUN, "--mount", f"type=volume,source={volume},target=/data,volume-driver={instance.driver}",
                  busybox, "sh", "-c", "cd /data && find . -type f | sort | xargs md5sum").strip()


def snapshot_names(instance, volume: str) -> list[str]:
    code, out, _ = cli(instance, "snapshot", "ls", volume, "--json")
    return [s["name"] for s in json.loads(out)["Snapshots"]] if code == 0 else []


def test_full_then_incremental_through_files_and_bad_streams(docker, busybox, pair, tmp_path: Path):
    source, replica = pair
    # one dockerd serves both instances here, so the replica's copy needs a name of its own
    vol, copy = unique("files"), unique("filescopy")
    docker("volume", "create", "-d", source.driver, vol)
    fill(docker, busybox, source, vol, "dd if=/dev/urandom of=/data/big bs=1M count=8 2>/dev/null;"
         " echo one > /data/state")
    assert cli(source, "snapshot", "create", vol, "--name", "s1")[0] == 0
    full, inc = tmp_path / "full.stream", tmp_path / "inc.stream"
    code, _, err = cli(source, "send", f"{vol}@s1", "-o", str(full))
    assert code == 0 and f"sent {vol}@s1 (full)" in err, err
    code, out, err = cli(replica, "receive", copy, "-i", str(full))
    assert code == 0 and f"received {copy}@s1 (full)" in out, err
    assert copy in docker("volume", "ls", "-q", "--filter", f"driver={replica.driver}").split()
    assert digest(docker, busybox, replica, copy) == digest(docker, busybox, source, vol)

    fill(docker, busybox, source, vol, "echo two > /data/state; dd if=/dev/urandom of=/data/small bs=64k count=1 2>/dev/null")
    assert cli(source, "snapshot", "create", vol, "--name", "s2")[0] == 0
    code, _, err = cli(source, "send", f"{vol}@s2", "--since", "s1", "-o", str(inc))
    assert code == 0 and "(incremental from s1)" in err, err
    assert inc.stat().st_size < full.stat().st_size / 20       # ~70 KB changed of 8 MB
    before_volumes = docker("volume", "ls", "-q", "--filter", f"driver={replica.driver}")

    # bad streams: each refused with a clear word, nothing made or changed
    raw = inc.read_bytes()
    flipped = bytearray(raw)
    flipped[len(raw) // 2] ^= 0x40
    # a flipped bit: format 3 (the default, uncompressed) leaves it to the native receiver:
    # btrfs receive verifies the CRC32C of each btrfs send command; zfs receive the stream's
    # fletcher4 checksum (zfs-fuse: at the END record; OpenZFS: also per record), and its
    # message depends on where the flip fell (a checksum mismatch, an invalid record), so
    # on ZFS the plugin's own words say it: the native receiver refused the stream
    flip_found = "crc32 mismatch" if replica.backend == "btrfs" else "native receiver refused the stream"
    bad = {"empty": (b"", copy, "the stream is empty"),
           "truncated": (full.read_bytes()[: full.stat().st_size // 2], unique("trunc"), "truncated"),
           "bit-flipped": (bytes(flipped), copy, flip_found),
           "missing-base": (raw, unique("nobase"), "there is no volume"),
           "not-a-stream": (b"#!/bin/sh\nrm -rf /\n" * 100, copy, "not a snapvol stream")}
    for label, (data, target, message) in bad.items():
        path = tmp_path / f"{label}.stream"
        path.write_bytes(data)
        code, _, err = cli(replica, "receive", target, "-i", str(path))
        assert code == 2 and message in err, (label, err)
        assert "Traceback" not in err
    assert docker("volume", "ls", "-q", "--filter", f"driver={replica.driver}") == before_volumes
    assert snapshot_names(replica, copy) == ["s1"]
    other = unique("other")                 # a replica without the base
    docker("volume", "create", "-d", replica.driver, other)
    code, _, err = cli(replica, "receive", other, "-i", str(inc))
    assert code == 2 and f"volume {other} lacks the stream's base snapshot s1" in err, err

    code, out, err = cli(replica, "receive", copy, "-i", str(inc))
    assert code == 0 and "(incremental from s1)" in out, err
    assert digest(docker, busybox, replica, copy) == digest(docker, busybox, source, vol)
    assert snapshot_names(replica, copy) == ["s1", "s2"]
    for name in (copy, other, vol):
        docker("volume", "rm", name)


def test_a_stream_for_the_other_backend_is_refused(docker, plugin, zfs_replica, tmp_path: Path):
    vol = unique("cross")
    docker("volume", "create", "-d", plugin.driver, vol)
    stream = tmp_path / "btrfs.stream"
    assert cli(plugin, "send", vol, "-o", str(stream))[0] == 0
    code, _, err = cli(zfs_replica, "receive", vol, "-i", str(stream))
    assert code == 2 and "the stream is from a btrfs volume; this plugin stores volumes on zfs" in err
    assert zfs_replica.call("VolumeDriver.Get", {"Name": vol})[0] == 404
    docker("volume", "rm", vol)


def ssh_target(sshd, replica) -> str:
    return f"ssh://root@127.0.0.1:{sshd.port}{replica.socket}"


def children_running(pid: int, needle: str) -> list[int]:
    """Processes below *pid* (our plugin) whose command line contains *needle*."""
    found, queue = [], [pid]
    while queue:
        parent = queue.pop()
        kids = []
        for task in Path(f"/proc/{parent}/task").glob("*"):   # a child belongs to the thread
            try:                                              # that started it
                kids += (task / "children").read_text().split()
            except OSError:
                continue
        for kid in map(int, kids):
            queue.append(kid)
            try:
                if needle in Path(f"/proc/{kid}/cmdline").read_bytes().replace(b"\0", b" ").decode():
                    found.append(kid)
            except OSError:
                pass
    return found


def test_replicate_over_ssh_full_incremental_and_after_a_killed_transfer(docker, busybox, pair, sshd):
    source, replica = pair
    vol, copy = unique("repl"), unique("replcopy")
    target = ssh_target(sshd, replica)
    docker("volume", "create", "-d", source.driver, vol)
    fill(docker, busybox, source, vol, "dd if=/dev/urandom of=/data/a bs=1M count=4 2>/dev/null")
    code, out, err = cli(source, "replicate", vol, target, "--as", copy)
    assert code == 0 and "(full)" in out, err + source.log_tail()
    assert digest(docker, busybox, replica, copy) == digest(docker, busybox, source, vol)
    full_bytes = inspect_volume(docker, vol)["Status"]["replication"]["bytes"]

    fill(docker, busybox, source, vol, "echo more > /data/b")
    code, out, err = cli(source, "replicate", vol, target, "--as", copy, "--json")
    assert code == 0, err
    run = json.loads(out)["Replication"]
    assert run["base"] and run["bytes"] < full_bytes / 10, (run, err, source.log_tail(),
                                                            replica.log_tail())
    assert digest(docker, busybox, replica, copy) == digest(docker, busybox, source, vol)
    status = inspect_volume(docker, vol)["Status"]["replication"]
    assert (status["target"], status["result"], status["snapshot"]) == \
        (f"{target} as {copy}", "ok", run["snapshot"])
    assert [n for n in snapshot_names(source, vol) if n.startswith("repl-")] == [run["snapshot"]]

    # a transfer killed mid-stream: retried from the last common snapshot, and completed
    fill(docker, busybox, source, vol, "dd if=/dev/urandom of=/data/c bs=1M count=200 2>/dev/null")
    killed: list[int] = []

    def killer() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not killed:
            for pid in children_running(source.pid, " receive "):
                time.sleep(0.05)                    # let some data flow first
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:          # already done: too fast to interrupt
                    return
                killed.append(pid)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=killer)
    thread.start()
    code, out, err = cli(source, "replicate", vol, target, "--as", copy, "--json")
    thread.join()
    assert killed, "the transfer was never seen running"
    assert code == 0, err + source.log_tail()
    assert json.loads(out)["Replication"]["attempts"] == 2
    assert digest(docker, busybox, replica, copy) == digest(docker, busybox, source, vol)
    for name in (copy, vol):
        docker("volume", "rm", name)


def test_scheduled_replication_keeps_its_base(docker, busybox, pair, sshd):
    source, replica = pair
    vol = unique("sched-repl")
    target = ssh_target(sshd, replica)
    docker("volume", "create", "-d", source.driver, "-o", "schedule=2s", "-o", "keep=last=1",
           "-o", f"replicate={target}", vol)
    deadline, seen = time.monotonic() + 90, set()
    while time.monotonic() < deadline and len(seen) < 3:
        status = inspect_volume(docker, vol)["Status"]
        replication = status.get("replication")
        if replication and replication["result"] == "ok":
            seen.add(replication["snapshot"])
            # the base the replica holds is still here, however old (retention skips it)
            assert replication["snapshot"] in [s["name"] for s in status["snapshots"]], status
        time.sleep(0.3)
    assert len(seen) >= 3, source.log_tail()
    assert any(name in snapshot_names(replica, vol) for name in seen)
    deadline = time.monotonic() + 60      # refused as busy while a replication is sending
    while docker.result("volume", "rm", vol).returncode != 0:
        assert time.monotonic() < deadline, source.log_tail()
        time.sleep(0.5)
    # the replica's copy has the same name (dockerd knows it by the source's driver): remove it
    # through the replica's own socket, once a replication still running there has finished
    remove_volume(replica, vol)


class DeadTarget:
    """A Unix socket that accepts connections and never reads or answers them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(str(path))
        self.server.listen(16)
        self.held: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            self.held.append(conn)

    def close(self) -> None:
        self.server.close()
        for conn in self.held:
            conn.close()
        self.path.unlink(missing_ok=True)


@contextmanager
def every_slot_hanging(plugin, volume: str) -> Iterator[tuple[DeadTarget, list]]:
    """Four replications of *volume* (all the plugin's transfer slots) to a target that
    accepts and never reads; released on exit. Yields the target and the CLI results."""
    dead = DeadTarget(Path("/tmp") / f"snapvol-dead-{os.getpid()}.sock")
    results: list[tuple[int, str, str]] = []
    deadline = time.monotonic() + 30

    def replicate() -> None:
        while True:
            result = cli(plugin, "replicate", volume, f"unix://{dead.path}")
            # a transfer of another volume of this plugin (a schedule) held a slot for a
            # moment: this one must still take a slot, so ask again
            if (result[0] == 4 and "transfers are running already" in result[2]
                    and len(dead.held) < 4 and time.monotonic() < deadline):
                time.sleep(0.2)
                continue
            results.append(result)
            return

    threads = [threading.Thread(target=replicate) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        while len(dead.held) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(dead.held) >= 4, plugin.log_tail()
        yield dead, results
    finally:
        dead.close()
        for t in threads:
            t.join(120)


def test_transfers_hanging_on_a_dead_target_never_block_docker(docker, busybox, plugin, tmp_path: Path):
    vol = unique("hang")
    docker("volume", "create", "-d", plugin.driver, vol)
    fill(docker, busybox, plugin, vol, "dd if=/dev/urandom of=/data/a bs=1M count=16 2>/dev/null")
    with every_slot_hanging(plugin, vol) as (dead, results):
        time.sleep(1)
        slowest = 0.0
        for _ in range(20):
            for endpoint, body in (("VolumeDriver.Get", {"Name": vol}), ("VolumeDriver.List", {})):
                started = time.monotonic()
                status, _ = plugin.call(endpoint, body)
                slowest = max(slowest, time.monotonic() - started)
                assert status == 200
        started = time.monotonic()
        docker("volume", "inspect", vol)
        assert time.monotonic() - started < 5
        assert slowest < 1.0, f"Get/List took {slowest:.3f} s while transfers hung"
        code, _, err = cli(plugin, "replicate", vol, f"unix://{dead.path}")
        assert code == 4 and "transfers are running already" in err, err
    assert len(results) == 4 and all(code != 0 for code, _, _ in results), results
    docker("volume", "rm", vol)


@pytest.mark.parametrize("first_line, message", [
    (b"not json\n", "the request line is not JSON"),
    (b'{"Op": "delete", "Volume": "x"}\n', "expected {\"Op\": \"receive\""),
    (b'{"Op": "receive", "Volume": "../etc"}\n', "invalid volume name"),
    (b'{"Op": "receive", "Volume": "$(touch /tmp/snapvol-hostile-marker)"}\n', "invalid volume name"),
    (b'{"Op": "receive", "Volume": "okname"}\n', "the stream is empty"),
    (b'{"Op": "receive", "Volume": "okname"}\n' + b"\0" * 10000, "not a snapvol stream"),
    (b"x" * 10000 + b"\n", "the request line is not JSON"),
])
def test_the_stream_socket_refuses_hostile_requests(host_plugin, first_line, message):
    path = str(host_plugin.socket) + ".stream"
    assert Path(path).exists()
    before = host_plugin.call("VolumeDriver.List")[1]["Volumes"]
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    try:
        sock.sendall(first_line)
        sock.shutdown(socket.SHUT_WR)
        answer = json.loads(sock.makefile("rb").readline())
    finally:
        sock.close()
    assert message in answer["Err"] and answer["Status"] >= 400, answer
    assert "Traceback" not in answer["Err"]
    assert host_plugin.call("VolumeDriver.List")[1]["Volumes"] == before
    assert not Path("/tmp/snapvol-hostile-marker").exists()
