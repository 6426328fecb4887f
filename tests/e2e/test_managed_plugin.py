"""The managed plugin's life: crashes, disable/enable, upgrade, and a host Btrfs data source.

Each test runs against a plugin installed from the loopback registry with a container writing
into one of its volumes; afterwards the container must still be writing, a new container must
see all the data, and every volume must still be listed.
"""

from __future__ import annotations

import io
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import btrfsutil
import pytest

from plugin import client
from plugin.cli import main
from plugin.mountinfo import mounted_filesystem
from tests.conftest import destroy_pool, make_btrfs, make_pool, unmount
from tests.e2e.conftest import LANE
from tests.e2e.harness import ManagedPlugin, inspect_volume, unique

WRITER = "i=0; while true; do i=$((i+1)); echo $i >> /data/log; sleep 0.05; done"


@pytest.fixture(params=LANE.managed_backends)
def life(request, docker, plugin_references, tmp_path: Path) -> Iterator[ManagedPlugin]:
    """A plugin of its own (own alias, own data directory, own pool), so these tests can break
    it: on its embedded Btrfs pool, or with SNAPVOL_BACKEND=zfs on a ZFS pool of its own."""
    data = tmp_path / "host"
    data.mkdir()
    pool = None
    if request.param == "zfs":
        request.getfixturevalue("zfs_service")
        pool = make_pool(tmp_path, size=1 << 30)
    plugin = ManagedPlugin.install(docker, plugin_references[0], "snapvollife",
                                   f"data.source={data}", f"docker.source={docker.socket.parent}",
                                   *([] if pool else ["SNAPVOL_POOL_SIZE=2G"]),
                                   zfs_root=f"{pool}/life" if pool else None)
    yield plugin
    for container in docker("ps", "-aq", "--filter", "label=snapvol-life").split():
        docker("rm", "-f", container, check=False)
    plugin.remove()
    if pool:
        destroy_pool(pool)


def lines(docker, container: str) -> int:
    return int(docker("exec", container, "sh", "-c", "wc -l < /data/log").strip())


def assert_writing(docker, container: str) -> None:
    before = lines(docker, container)
    time.sleep(0.5)
    assert lines(docker, container) > before, f"{container} stopped writing"


def start_writer(docker, plugin: ManagedPlugin, busybox: str) -> tuple[str, str]:
    volume, writer = unique("life"), unique("writer")
    docker("volume", "create", "-d", plugin.driver, "-o", "size=64M", volume)
    docker("run", "-d", "--label", "snapvol-life", "--name", writer, "--network", "none",
           "-v", f"{volume}:/data", busybox, "sh", "-c", WRITER)
    deadline = time.monotonic() + 30
    while lines(docker, writer) < 5:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return volume, writer


def assert_all_there(docker, plugin: ManagedPlugin, busybox: str, volume: str, writer: str) -> None:
    assert_writing(docker, writer)
    listed = docker("volume", "ls", "-q", "--filter", f"driver={plugin.driver}").split()
    assert volume in listed, f"{volume} not listed (dockerd disabled the plugin?)\n{plugin.diagnostics()}"
    log = docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", busybox,
                 "cat", "/data/log").split()
    assert len(log) > 5 and log == [str(i) for i in range(1, len(log) + 1)]
    assert inspect_volume(docker, volume)["Status"]["options"] == {"size": "64M"}
    assert inspect_volume(docker, volume)["Status"]["backend"] == plugin.backend


def test_sigkill_of_the_plugin_process(docker, life, busybox):
    volume, writer = start_writer(docker, life, busybox)
    before = life.processes()
    assert before, "no plugin process found"
    for pid in before:                    # gunicorn master (the plugin's pid 1) and worker
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 60
    while not (life.processes() and set(life.processes()).isdisjoint(before)):
        assert time.monotonic() < deadline, f"dockerd did not restart the plugin\n{life.diagnostics()}"
        time.sleep(0.3)
    life.wait_answering()
    assert_all_there(docker, life, busybox, volume, writer)
    assert inspect_volume(docker, volume)["Status"]["mounts"] == 1      # the writer's, remembered


def test_disable_force_and_enable(docker, life, busybox):
    volume, writer = start_writer(docker, life, busybox)
    docker("plugin", "disable", "-f", life.name)
    assert_writing(docker, writer)            # its bind mount does not depend on the plugin
    docker("plugin", "enable", life.name)
    life.wait_answering()
    assert_all_there(docker, life, busybox, volume, writer)
    if life.backend == "zfs":
        # the new plugin process mounted the dataset again, in its new mount namespace,
        # under the propagated mount where dockerd finds it
        assert mounted_filesystem(life.volume_dir(volume)) == "zfs"
        return
    # the image was still attached through the writer: it must not be attached a second time
    image = Path(life.inspect()["Settings"]["Mounts"][0]["Source"]) / "snapvol" / "pool.img"
    attached = subprocess.run(["losetup", "--associated", str(image)], capture_output=True,
                              text=True, check=True).stdout
    assert len(attached.splitlines()) == 1, attached


def test_upgrade_to_a_newer_build(docker, life, busybox, plugin_references):
    volume, writer = start_writer(docker, life, busybox)
    data_source = {m["Name"]: m["Source"] for m in life.inspect()["Settings"]["Mounts"]}["data"]
    build = docker.base / "data" / "plugins" / life.id / "rootfs" / "opt" / "snapvol" / "BUILD"
    first = build.read_text()
    docker("plugin", "disable", "-f", life.name)
    # --skip-remote-check: the new build has another tag, and the CLI would ask to confirm
    out = docker("plugin", "upgrade", "--grant-all-permissions", "--skip-remote-check",
                 life.name, plugin_references[1], timeout=300)
    assert "Upgraded plugin" in out, out
    # dockerd 20.10 keeps env settings across an upgrade but resets mount sources to the new
    # config.json's defaults: the data source must be set again before enabling (README).
    docker("plugin", "set", life.name, f"data.source={data_source}")
    docker("plugin", "enable", life.name)
    # dockerd 20.10 keeps PluginReference as installed; the rootfs is the new build's
    assert build.read_text() != first and "snapvol:2" in build.read_text()
    life.wait_answering()
    assert_all_there(docker, life, busybox, volume, writer)


@pytest.mark.parametrize("life", ["btrfs"], indirect=True)
def test_data_source_on_a_host_btrfs(docker, life, busybox, tmp_path):
    mnt = make_btrfs(tmp_path / "btrfs" if (tmp_path / "btrfs").mkdir() is None else tmp_path)
    try:
        docker("plugin", "disable", "-f", life.name)
        docker("plugin", "set", life.name, f"data.source={mnt}")
        docker("plugin", "enable", life.name)
        life.wait_answering()
        volume = unique("onbtrfs")
        docker("volume", "create", "-d", life.driver, volume)
        docker("run", "--rm", "--network", "none", "-v", f"{volume}:/data", busybox,
               "sh", "-c", "echo on-host-btrfs > /data/f")
        on_host = mnt / "snapvol" / "volumes" / volume
        assert btrfsutil.is_subvolume(on_host)
        assert (on_host / "f").read_text() == "on-host-btrfs\n"
        assert not (mnt / "snapvol" / "pool.img").exists()
        docker("volume", "rm", volume)
        assert not on_host.exists()
    finally:
        docker("plugin", "disable", "-f", life.name, check=False)
        unmount(mnt)


def test_cli_finds_the_managed_socket_by_itself(docker, managed, monkeypatch):
    """With no --socket and no SNAPVOL_SOCKET, `snapvol` finds the managed plugin's socket.

    If other snapvol plugins run on this machine (not ours to stop), discovery must refuse
    to guess and name ours among them.
    """
    name = unique("cli")
    docker("volume", "create", "-d", managed.driver, name)
    monkeypatch.setattr(client, "LEGACY_SOCKET", "/nonexistent/snapvol.sock")
    out, err = io.StringIO(), io.StringIO()
    code = main(["ls"], stdout=out, stderr=err, environ={})
    if len(list(Path("/run/docker/plugins").glob("*/snapvol.sock"))) == 1:
        assert code == 0 and name in out.getvalue()
    else:
        assert code == 5 and str(managed.socket) in err.getvalue()
        assert "several snapvol plugins are running" in err.getvalue()
    docker("volume", "rm", name)


def test_a_plugin_that_cannot_use_its_storage_says_why_on_every_call(docker, plugin_references,
                                                                    tmp_path):
    """A storage it cannot use (here: a ZFS pool that does not exist): the plugin listens before
    it looks (plugin.prebind), so it installs, and then answers every call with the reason and
    the fix, in Docker's own error, and in dockerd's log. It does not exit: dockerd would
    restart it at once, for ever."""
    alias = f"snapvolbad{secrets.token_hex(3)}:latest"
    pool = f"nosuchpool{secrets.token_hex(3)}"
    seen = docker.log.stat().st_size

    def new_log() -> str:
        with docker.log.open("rb") as log:
            log.seek(seen)
            return log.read().decode(errors="replace")

    try:
        docker("plugin", "install", "--grant-all-permissions", "--alias", alias,
               plugin_references[0], f"docker.source={docker.socket.parent}",
               f"data.source={tmp_path}", "SNAPVOL_BACKEND=zfs", f"SNAPVOL_ZFS_ROOT={pool}/x",
               timeout=300)
        result = docker.result("volume", "create", "-d", alias, unique("never"), timeout=120)
        assert result.returncode != 0, result.stdout
        # OpenZFS: no such pool; a host without it (zfs-fuse is not reachable from a plugin):
        # ZFS is not usable
        assert "snapvol cannot start: " in result.stderr, result.stderr
        assert f"ZFS pool {pool} does not exist" in result.stderr \
            or "ZFS is not usable here" in result.stderr, result.stderr
        assert "docker plugin disable PLUGIN && docker plugin enable PLUGIN" in result.stderr
        assert "snapvol cannot start" in new_log()
        assert docker("plugin", "inspect", "--format", "{{.Enabled}}", alias).strip() == "true"
        plugin_id = docker("plugin", "inspect", "--format", "{{.Id}}", alias).strip()

        def starts() -> int:
            return sum(1 for line in new_log().splitlines()
                       if plugin_id in line and "Starting gunicorn" in line)
        first = starts()
        time.sleep(3)
        assert first >= 1 and starts() == first, f"dockerd keeps restarting it: {new_log()[-3000:]}"
    finally:
        docker("plugin", "disable", "-f", alias, check=False)
        docker("plugin", "rm", "-f", alias, check=False)
