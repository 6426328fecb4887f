"""Fixtures of the end-to-end tier: a real plugin process, a private dockerd, busybox.

Order matters (PROTOCOL.md section 4): the plugin starts before dockerd and stops after it, so
dockerd never holds a reference to a driver whose socket has gone.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import destroy_pool, make_pool, need
from tests.e2e.harness import (DockerDaemon, ManagedPlugin, PluginProcess, Registry,
                               SshServer, build_plugin, mounts_under)

DEFAULT_DATA = Path("/var/lib/snapvol")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.docker)


@pytest.fixture(scope="session")
def e2e_base() -> Iterator[Path]:
    need("dockerd", "docker", "mkfs.btrfs", "busybox")
    # Short path: containerd's sockets live below it and Unix socket paths max out at 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="snapvol-e2e-", dir="/tmp"))
    yield base
    for point in mounts_under(base):
        subprocess.run(["umount", "-l", point], check=False)
    shutil.rmtree(base, ignore_errors=True)


def docker_socket(e2e_base: Path) -> Path:
    """The private dockerd's API socket (plugins start before it, so they get the path)."""
    return e2e_base / "docker" / "docker.sock"


@pytest.fixture(scope="session")
def sshd(e2e_base: Path) -> Iterator[SshServer]:
    """An ssh server on loopback: the way replication reaches another host."""
    need("sshd", "ssh", "ssh-keygen")
    server = SshServer(e2e_base / "ssh")
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def plugin(e2e_base: Path, sshd: SshServer) -> Iterator[PluginProcess]:
    """snapvol on its embedded pool (the default a user gets), unique driver name."""
    process = PluginProcess(f"snapvole2e{secrets.token_hex(4)}", e2e_base / "state",
                            {"SNAPVOL_DOCKER_HOST": f"unix://{docker_socket(e2e_base)}", **sshd.env()})
    process.start()
    yield process
    process.stop()
    pool = e2e_base / "state" / "pool"
    if mounts_under(pool):
        subprocess.run(["umount", str(pool)], check=True)


def _zfs_instance(e2e_base: Path, label: str, env: dict[str, str]) -> Iterator[PluginProcess]:
    pool = make_pool(e2e_base, size=2 << 30)
    process = PluginProcess(f"{label}{secrets.token_hex(4)}", e2e_base / f"{label}-state",
                            {"SNAPVOL_BACKEND": "zfs", "SNAPVOL_ZFS_ROOT": f"{pool}/snapvol",
                             "SNAPVOL_DOCKER_HOST": f"unix://{docker_socket(e2e_base)}", **env})
    process.pool = pool  # type: ignore[attr-defined]
    process.start()
    yield process
    process.stop()
    destroy_pool(pool)


@pytest.fixture(scope="session")
def zfs_plugin(e2e_base: Path, zfs_service: None, sshd: SshServer) -> Iterator[PluginProcess]:
    """snapvol with SNAPVOL_BACKEND=zfs on a pool of its own (zfs-fuse where no kernel ZFS)."""
    yield from _zfs_instance(e2e_base, "snapvolzfs", sshd.env())


@pytest.fixture(scope="session")
def replica(e2e_base: Path) -> Iterator[PluginProcess]:
    """A second Btrfs instance with its own pool and socket: the replication target."""
    process = PluginProcess(f"snapvolrep{secrets.token_hex(4)}", e2e_base / "replica-state")
    process.start()
    yield process
    process.stop()
    pool = e2e_base / "replica-state" / "pool"
    if mounts_under(pool):
        subprocess.run(["umount", str(pool)], check=True)


@pytest.fixture(scope="session")
def zfs_replica(e2e_base: Path, zfs_service: None) -> Iterator[PluginProcess]:
    """A second ZFS instance on a pool of its own: the ZFS replication target."""
    yield from _zfs_instance(e2e_base, "snapvolzrep", {})


@pytest.fixture(scope="session")
def docker(plugin: PluginProcess, zfs_plugin: PluginProcess, replica: PluginProcess,
           zfs_replica: PluginProcess, e2e_base: Path) -> Iterator[DockerDaemon]:
    daemon = DockerDaemon(e2e_base / "docker")
    daemon.base.mkdir()
    daemon.start()
    assert daemon.socket == docker_socket(e2e_base)
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def busybox(docker: DockerDaemon) -> str:
    return docker.import_busybox()


@pytest.fixture(scope="session")
def registry(e2e_base: Path) -> Iterator[Registry]:
    need("docker-registry")
    reg = Registry(e2e_base / "registry")
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def plugin_references(docker: DockerDaemon, registry: Registry) -> list[str]:
    """Two builds of the plugin (the second for `docker plugin upgrade`), pushed to the
    loopback registry and removed locally, as a user would get them."""
    references = [f"{registry.address}/snapvol:{tag}" for tag in ("1", "2")]
    for reference in references:
        build_plugin(docker, reference)
        docker("plugin", "push", reference, timeout=300)
        docker("plugin", "rm", reference)
    return references


@pytest.fixture(scope="session")
def managed(docker: DockerDaemon, plugin_references: list[str], e2e_base: Path):
    """`docker plugin install` from the registry, with no settings: the data lands in
    /var/lib/snapvol, on this host's root filesystem (ext4 here, so the plugin makes its pool
    image). Where /var/lib/snapvol already exists (someone's snapvol), we must not touch it:
    the data source moves to a directory of the test's own."""
    settings = [f"docker.source={docker.socket.parent}"]   # where quiesce finds dockerd
    ours = not DEFAULT_DATA.exists()
    if not ours:
        (e2e_base / "host").mkdir()
        settings.append(f"data.source={e2e_base / 'host'}")
    alias = f"snapvolmgd{secrets.token_hex(3)}:latest"
    docker("plugin", "install", "--grant-all-permissions", "--alias", alias,
           plugin_references[0], *settings, timeout=300)
    plugin = ManagedPlugin(docker, alias)
    plugin.wait_answering()
    yield plugin
    for volume in docker("volume", "ls", "-q", "--filter", f"driver={alias}").split():
        docker("volume", "rm", "-f", volume, check=False)
    plugin.remove()
    if ours and DEFAULT_DATA.exists() and not mounts_under(DEFAULT_DATA):
        shutil.rmtree(DEFAULT_DATA)


@pytest.fixture(scope="session", params=["legacy", "managed", "legacy-zfs"])
def driver(request):
    """The same end-to-end tests through `scripts/run`'s kind of plugin (a host process on a
    legacy socket), through the managed plugin installed from a registry, and through a host
    process with the ZFS backend."""
    return request.getfixturevalue({"legacy": "plugin", "managed": "managed",
                                    "legacy-zfs": "zfs_plugin"}[request.param])


@pytest.fixture(scope="session", params=["btrfs", "zfs"])
def host_plugin(request):
    """A host-process plugin of each backend (restart and hostile-input tests)."""
    return request.getfixturevalue("plugin" if request.param == "btrfs" else "zfs_plugin")


@pytest.fixture(scope="session", params=["btrfs", "zfs"])
def pair(request, docker):
    """(source, replica): two host instances of one backend, each with its own pool."""
    if request.param == "btrfs":
        return request.getfixturevalue("plugin"), request.getfixturevalue("replica")
    return request.getfixturevalue("zfs_plugin"), request.getfixturevalue("zfs_replica")
