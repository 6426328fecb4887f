"""The managed plugin does what a host install does: ssh replication (full, incremental,
scheduled) to a host that has only the managed plugin (its `snapvol` being the bundle the
plugin leaves on the host), standbys with a planned hand-off, a clear refusal of an ssh target
that cannot work, and a clear answer when a host install already uses its data directory.

Both plugins are installed from the loopback registry into the private dockerd; the "other
host" is reached through a real sshd on 127.0.0.1, which runs the bundle there.
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import destroy_pool, make_pool
from tests.e2e.conftest import LANE
from tests.e2e.harness import (REPO, CommandError, ManagedPlugin, PluginProcess, free_port, remove_volume,
                               unique)
from tests.e2e.test_metrics import scrape
from tests.e2e.test_replication import cli, digest, fill

pytestmark = pytest.mark.usefixtures("busybox")


def install_disabled(docker, reference: str, prefix: str, *settings: str) -> ManagedPlugin:
    alias = f"{prefix}{secrets.token_hex(3)}:latest"
    docker("plugin", "install", "--grant-all-permissions", "--disable", "--alias", alias,
           reference, *settings, timeout=300)
    return ManagedPlugin(docker, alias)


def enable(plugin: ManagedPlugin) -> None:
    plugin.docker("plugin", "enable", plugin.name, timeout=120)
    plugin.wait_answering()


def bundle(data: Path) -> Path:
    """The snapvol command the managed plugin leaves on the host (data mount: *data*)."""
    return data / "snapvol" / "bin" / "snapvol"


def bundled_cli(data: Path, plugin: ManagedPlugin, *argv: str) -> subprocess.CompletedProcess[str]:
    """Run the bundle as a user of a plugin-only host would: Debian's python3, nothing else."""
    return subprocess.run(["/usr/bin/python3", "-I", "-S", str(bundle(data)),
                           "--socket", str(plugin.socket), *argv],
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", params=LANE.managed_backends)
def two_managed(request, docker, plugin_references, sshd, tmp_path_factory) -> Iterator[tuple]:
    """(a, b, target_of_b, data): two managed plugins of the lane's backend (each on its own
    embedded Btrfs pool, or with SNAPVOL_BACKEND=zfs on a ZFS pool of its own), each with
    its own data directory, sharing an ssh directory (a key sshd accepts, sshd's host key in
    known_hosts) through their ssh mounts; each runs the other's bundle as the remote snapvol,
    as on a plugin-only host."""
    base = tmp_path_factory.mktemp("parity")
    pools: dict[str, str] = {}
    if request.param == "zfs":
        request.getfixturevalue("zfs_service")
        pools = {side: make_pool(base, size=1 << 30) for side in ("a", "b")}
    keys = base / "ssh"
    keys.mkdir(mode=0o700)
    shutil.copy(sshd.client_key, keys / "id_ed25519")
    (keys / "id_ed25519").chmod(0o600)
    shutil.copy(sshd.known_hosts, keys / "known_hosts")
    data = {"a": base / "a", "b": base / "b"}
    metrics_port = free_port()           # plugin a serves /metrics on the host's loopback
    plugins = {}
    try:
        for side, other in (("a", "b"), ("b", "a")):
            data[side].mkdir()
            plugins[side] = install_disabled(
                docker, plugin_references[0], f"snvpar{side}", f"data.source={data[side]}",
                f"docker.source={docker.socket.parent}", f"ssh.source={keys}",
                "SNAPVOL_SSH_DIR=/mnt/ssh", "SNAPVOL_POOL_SIZE=2G",
                f"SNAPVOL_REMOTE_SNAPVOL={bundle(data[other])}",
                *([f"SNAPVOL_METRICS=127.0.0.1:{metrics_port}"] if side == "a" else []),
                *(["SNAPVOL_BACKEND=zfs", f"SNAPVOL_ZFS_ROOT={pools[side]}/parity"]
                  if pools else []))
            if pools:
                plugins[side].zfs_root, plugins[side].backend = f"{pools[side]}/parity", "zfs"
        targets = {side: f"ssh://root@127.0.0.1:{sshd.port}{p.socket}" for side, p in plugins.items()}
        for side, plugin in plugins.items():
            docker("plugin", "set", plugin.name, f"SNAPVOL_ADVERTISE={targets[side]}")
            enable(plugin)
        plugins["a"].metrics_port = metrics_port   # type: ignore[attr-defined]
        yield plugins["a"], plugins["b"], targets["b"], data
    finally:
        for plugin in plugins.values():
            plugin.remove()
        for pool in pools.values():
            destroy_pool(pool)


def test_replication_from_the_managed_plugin_to_a_plugin_only_host(docker, busybox, two_managed):
    a, b, target, data = two_managed
    assert bundle(data["a"]).exists() and bundle(data["b"]).exists()
    vol, copy = unique("mrep"), unique("mrepcopy")
    docker("volume", "create", "-d", a.driver, vol)
    fill(docker, busybox, a, vol, "dd if=/dev/urandom of=/data/a bs=1M count=4 2>/dev/null")
    full = bundled_cli(data["a"], a, "replicate", vol, target, "--as", copy, "--json")
    assert full.returncode == 0, full.stderr + a.diagnostics()
    full_bytes = json.loads(full.stdout)["Replication"]["bytes"]
    assert digest(docker, busybox, b, copy) == digest(docker, busybox, a, vol)

    fill(docker, busybox, a, vol, "echo more > /data/b")
    again = bundled_cli(data["a"], a, "replicate", vol, target, "--as", copy, "--json")
    assert again.returncode == 0, again.stderr
    run = json.loads(again.stdout)["Replication"]
    assert run["base"] and run["bytes"] < full_bytes / 10, run
    assert digest(docker, busybox, b, copy) == digest(docker, busybox, a, vol)

    # scheduled, as a volume option: the copy appears on the plugin-only host by itself
    scheduled = unique("msched")
    docker("volume", "create", "-d", a.driver, "-o", "schedule=2s", "-o", f"replicate={target}",
           scheduled)
    deadline = time.monotonic() + 90
    while b.call("VolumeDriver.Get", {"Name": scheduled})[0] != 200:
        assert time.monotonic() < deadline, (docker("volume", "inspect", scheduled), a.diagnostics())
        time.sleep(1)
    for name in (vol, scheduled):
        docker("volume", "rm", name)
    docker("volume", "rm", copy)
    remove_volume(b, scheduled)


def test_the_managed_plugin_serves_metrics_on_the_hosts_loopback(docker, two_managed):
    """Host networking: a Prometheus on the host scrapes the managed plugin's /metrics."""
    a, _, _, _ = two_managed
    vol = unique("mmetrics")
    docker("volume", "create", "-d", a.driver, vol)
    deadline = time.monotonic() + 30
    while True:            # per-volume values are cached for up to 5 s
        samples = scrape(a.metrics_port)
        if samples.get(("snapvol_volume_snapshots", frozenset({("volume", vol)}))) == 0:
            break
        assert time.monotonic() < deadline, sorted(k for k in samples if k[0] == "snapvol_volume_snapshots")
        time.sleep(1)
    created = [v for (name, labels), v in samples.items()
               if name == "snapvol_request_duration_seconds_count"
               and dict(labels).get("endpoint") == "VolumeDriver.Create"]
    assert created and created[0] >= 1, created
    docker("volume", "rm", vol)


def test_standby_from_the_managed_plugin_hands_off(docker, busybox, two_managed):
    a, b, target, _ = two_managed
    vol = unique("mstandby")
    docker("volume", "create", "-d", a.driver, "-o", f"standby={target}", "-o", "sync=2s", vol)
    fill(docker, busybox, a, vol, "mkdir /data/rows && for i in $(seq 1 40); do touch /data/rows/$i; done")
    code, out, err = cli(a, "sync", vol)
    assert code == 0, err + a.diagnostics()
    assert b.call("Snapvol.Role", {"Volume": vol})[1]["Role"] == "standby"
    fill(docker, busybox, a, vol, "for i in $(seq 41 60); do touch /data/rows/$i; done")
    code, out, err = cli(a, "handoff", vol, target)
    assert code == 0, err + a.diagnostics()
    assert (b.call("Snapvol.Role", {"Volume": vol})[1]["Role"],
            a.call("Snapvol.Role", {"Volume": vol})[1]["Role"]) == ("primary", "standby")
    status, reply = b.call("VolumeDriver.Mount", {"Name": vol, "ID": "c" * 64})
    assert status == 200, reply
    rows = sorted(int(p.name) for p in (b.volume_dir(vol) / "rows").iterdir())
    assert rows == list(range(1, 61))               # every write made before the hand-off
    assert b.call("VolumeDriver.Unmount", {"Name": vol, "ID": "c" * 64})[0] == 200
    for plugin in (b, a):
        remove_volume(plugin, vol)


def test_an_ssh_target_that_cannot_work_is_refused_at_create(docker, two_managed):
    a, _, target, _ = two_managed
    docker("plugin", "disable", "-f", a.name)
    docker("plugin", "set", a.name, "SNAPVOL_SSH_DIR=/mnt/ssh/nothing-here")
    try:
        enable(a)
        vol = unique("mnossh")
        result = docker.result("volume", "create", "-d", a.driver, "-o", "schedule=1h",
                               "-o", f"replicate={target}", vol)
        assert result.returncode != 0
        assert ("cannot work: no known_hosts file /mnt/ssh/nothing-here/known_hosts" in result.stderr), \
            result.stderr
        assert a.call("VolumeDriver.Get", {"Name": vol})[0] == 404      # nothing made
    finally:
        docker("plugin", "disable", "-f", a.name, check=False)
        docker("plugin", "set", a.name, "SNAPVOL_SSH_DIR=/mnt/ssh")
        enable(a)


def test_a_host_install_and_the_managed_plugin_on_one_data_directory(docker, plugin_references,
                                                                     tmp_path):
    """The managed plugin installs, and every call says what is wrong and what to do; done as
    said, both serve side by side. The other way round, the host install says who holds it."""
    shared = tmp_path / "lib"
    shared.mkdir()
    host = PluginProcess(f"snvhost{secrets.token_hex(3)}", shared / "snapvol",
                         {"SNAPVOL_POOL_SIZE": "1G"})
    host.start()
    plugin = None
    try:
        # installs and enables (the socket answers), though it cannot serve
        alias = f"snvcoex{secrets.token_hex(3)}:latest"
        docker("plugin", "install", "--grant-all-permissions", "--alias", alias,
               plugin_references[0], f"data.source={shared}",
               f"docker.source={docker.socket.parent}", "SNAPVOL_POOL_SIZE=1G", timeout=300)
        plugin = ManagedPlugin(docker, alias)
        vol = unique("coex")
        result = docker.result("volume", "create", "-d", plugin.driver, vol)
        assert result.returncode != 0
        assert "this snapvol managed plugin cannot serve: another snapvol process" in result.stderr
        assert "(a host install)" in result.stderr and "docker plugin set PLUGIN data.source=" \
            in result.stderr, result.stderr
        assert vol not in docker("volume", "ls", "-q", check=False).split()

        own = tmp_path / "plugin-lib"
        own.mkdir()
        docker("plugin", "disable", "-f", plugin.name)
        docker("plugin", "set", plugin.name, f"data.source={own}")
        enable(plugin)
        docker("volume", "create", "-d", plugin.driver, vol)
        docker("volume", "create", "-d", host.driver, vol + "-host")
        listed = {(v["Name"], v["Driver"]) for v in map(json.loads, docker(
            "volume", "ls", "--format", "{{json .}}").splitlines())}
        assert {(vol, plugin.driver), (vol + "-host", host.driver)} <= listed
        docker("volume", "rm", vol, vol + "-host")

        # the host install started second, on the plugin's directory, is told who holds it
        second = subprocess.run([sys.executable, "-m", "gunicorn", "-c", "python:plugin.gunicorn_conf"],
                                cwd=REPO, capture_output=True, text=True, timeout=60,
                                env={**host.env, "SNAPVOL_STATE_DIR": str(own / "snapvol"),
                                     "SNAPVOL_SOCKET": str(tmp_path / "second.sock"),
                                     "SNAPVOL_PIDFILE": str(tmp_path / "second.pid")})
        assert second.returncode != 0
        assert f"is using {own / 'snapvol'} (a managed Docker plugin)" in second.stderr, second.stderr
    finally:
        if plugin is not None:
            plugin.remove()
        host.stop()
        try:
            subprocess.run(["umount", str(shared / "snapvol" / "pool")], capture_output=True, timeout=60)
        except (OSError, CommandError):
            pass
