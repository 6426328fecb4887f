"""Fixtures of the end-to-end tier: a real plugin process, a private dockerd, busybox.

Order matters (PROTOCOL.md section 4): the plugin starts before dockerd and stops after it, so
dockerd never holds a reference to a driver whose socket has gone.

Three lanes (``SNAPVOL_E2E_LANE``), all run by scripts/test:

``host`` (default)
    Btrfs and zfs-fuse on this machine: host processes (``scripts/run``'s kind of plugin) of
    both backends and the managed plugin on its embedded Btrfs pool. Builds the plugin and
    pushes it to a loopback registry kept in ``SNAPVOL_E2E_REGISTRY`` when that is set.
``openzfs``
    Real OpenZFS (inside the test VM where this kernel has no module): a host process with
    libzfs_core and the managed plugin with ``SNAPVOL_BACKEND=zfs``, installed from a loopback
    registry serving the builds the host lane left in ``SNAPVOL_E2E_REGISTRY``.
``engine``
    A newer Docker Engine than the host's 20.10 (scripts/newer-engine), in the namespaced
    nodes of tests/e2e/nodes.py: only test_newer_engine.py, which no other lane runs.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import destroy_pool, make_pool, need
from tests.e2e.harness import (DockerDaemon, ManagedPlugin, PluginProcess, Registry,
                               SshServer, build_plugin, mounts_under)
from tests.e2e.publish import PLUGIN_TAGS   # two builds: the second for `docker plugin upgrade`

DEFAULT_DATA = Path("/var/lib/snapvol")
# The session's instances keep what `docker volume rm` trashes for 5 minutes, not 24 hours:
# every test removes its volumes, and hundreds of trashed datasets under one zfs-fuse root made
# every listing, and so every dockerd volume lookup that asks all drivers, slower as the
# session went on (a Compose request past its 60 s, a `docker volume rm` past 180 s).
SESSION_TRASH = {"SNAPVOL_TRASH_TTL": "5m"}


@dataclass(frozen=True)
class Lane:
    drivers: tuple[str, ...]        # the ways Docker reaches snapvol (fixture `driver`)
    host_backends: tuple[str, ...]  # host-process backends (fixtures `host_plugin`, `pair`)
    managed_backends: tuple[str, ...]   # backends of the managed plugins the life tests break
    instances: tuple[str, ...]      # host processes started before dockerd
    build_plugin: bool              # build and push the plugin, or install what is there
    swarm: bool                     # two Docker nodes in a Swarm, each with a Btrfs host plugin
    only: tuple[str, ...] = ()      # test modules this lane runs, and no other lane does


LANES = {
    "host": Lane(drivers=("legacy", "managed", "legacy-zfs"), host_backends=("btrfs", "zfs"),
                 managed_backends=("btrfs",),
                 instances=("plugin", "zfs_plugin", "replica", "zfs_replica"), build_plugin=True,
                 swarm=True),
    # The VM runs under emulation on machines without hardware virtualisation (CI's): this
    # lane takes what only it can prove, the managed plugin on OpenZFS. The host process on
    # OpenZFS is proven by the integration tests run in the same VM, and through Docker on
    # zfs-fuse in the host lane.
    "openzfs": Lane(drivers=("managed-zfs",), host_backends=(), managed_backends=("zfs",),
                    instances=(), build_plugin=False, swarm=False),
    # Its own daemons in its own namespaces (tests/e2e/test_newer_engine.py): none of the
    # host lane's fixtures, and the plugin builds come from the registry storage.
    "engine": Lane(drivers=(), host_backends=(), managed_backends=(), instances=(),
                   build_plugin=False, swarm=False, only=("test_newer_engine.py",)),
}
LANE_NAME = os.environ.get("SNAPVOL_E2E_LANE", "host")
if LANE_NAME not in LANES:
    raise pytest.UsageError(f"SNAPVOL_E2E_LANE={LANE_NAME!r}: expected one of {', '.join(LANES)}")
LANE = LANES[LANE_NAME]
DRIVER_FIXTURES = {"legacy": "plugin", "managed": "managed", "legacy-zfs": "zfs_plugin",
                   "managed-zfs": "managed_zfs"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.docker)
    # A lane with modules of its own runs only those; the other lanes run them only when
    # the command line names them (`pytest tests/e2e/test_newer_engine.py` runs that module
    # in any lane, a plain `pytest` in the host lane does not). Deselected, not skipped, as below.
    named = {Path(arg.split("::", 1)[0]).name for arg in config.args}
    owned = {module for lane in LANES.values() for module in lane.only} - named
    if LANE.only:
        other = [item for item in items if Path(str(item.fspath)).name not in LANE.only]
    else:
        other = [item for item in items if Path(str(item.fspath)).name in owned]
    if other:
        config.hook.pytest_deselected(items=other)
        items[:] = [item for item in items if item not in other]
    # A lane without the Swarm nodes deselects their tests (not a skip: in CI a skip reads as
    # a missing tool), even when test_swarm.py is named on the command line.
    if not LANE.swarm:
        swarm = [item for item in items if Path(str(item.fspath)).name == "test_swarm.py"]
        if swarm:
            config.hook.pytest_deselected(items=swarm)
            items[:] = [item for item in items if item not in swarm]


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
                            {"SNAPVOL_DOCKER_HOST": f"unix://{docker_socket(e2e_base)}",
                             **sshd.env(), **SESSION_TRASH})
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
                             "SNAPVOL_DOCKER_HOST": f"unix://{docker_socket(e2e_base)}",
                             **SESSION_TRASH, **env})
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
    process = PluginProcess(f"snapvolrep{secrets.token_hex(4)}", e2e_base / "replica-state",
                            SESSION_TRASH)
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
def docker(request, e2e_base: Path) -> Iterator[DockerDaemon]:
    for instance in LANE.instances:      # started first, so they are stopped after dockerd
        request.getfixturevalue(instance)
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
    """A loopback registry; its storage is $SNAPVOL_E2E_REGISTRY when set (kept afterwards,
    so the openzfs lane installs the very builds the host lane tested)."""
    need("docker-registry")
    kept = os.environ.get("SNAPVOL_E2E_REGISTRY")
    reg = Registry(Path(kept) if kept else e2e_base / "registry")
    reg.start()
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def plugin_references(docker: DockerDaemon, registry: Registry) -> list[str]:
    """Two builds of the plugin (the second for `docker plugin upgrade`), pushed to the
    loopback registry and removed locally, as a user would get them. Where scripts/test
    published them before the lanes started (tests/e2e/publish.py, ``SNAPVOL_E2E_PUBLISHED=1``)
    they are taken from the registry; the openzfs lane always does (no base image, no network
    in the VM)."""
    references = [f"{registry.address}/snapvol:{tag}" for tag in PLUGIN_TAGS]
    if not LANE.build_plugin or os.environ.get("SNAPVOL_E2E_PUBLISHED") == "1":
        with urllib.request.urlopen(f"http://{registry.address}/v2/snapvol/tags/list",
                                    timeout=10) as answer:
            tags = json.load(answer).get("tags") or []
        missing = sorted(set(PLUGIN_TAGS) - set(tags))
        assert not missing, (f"registry {registry.base} lacks snapvol:{missing}: scripts/test "
                             "publishes them there first (python -m tests.e2e.publish DIR, "
                             "then SNAPVOL_E2E_REGISTRY=DIR SNAPVOL_E2E_PUBLISHED=1)")
        return references
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
    plugin = ManagedPlugin.install(docker, plugin_references[0], "snapvolmgd", *settings)
    yield plugin
    plugin.remove()
    if ours and DEFAULT_DATA.exists() and not mounts_under(DEFAULT_DATA):
        shutil.rmtree(DEFAULT_DATA)


@pytest.fixture(scope="session")
def managed_zfs(docker: DockerDaemon, plugin_references: list[str], e2e_base: Path,
                zfs_service: None) -> Iterator[ManagedPlugin]:
    """The managed plugin with SNAPVOL_BACKEND=zfs on a pool of its own: the plugin reaches
    the host's OpenZFS through /dev/zfs and mounts volumes under its propagated mount."""
    pool = make_pool(e2e_base, size=2 << 30)
    data = e2e_base / "managed-zfs-host"
    data.mkdir()
    plugin = ManagedPlugin.install(docker, plugin_references[0], "snapvolmz",
                                   f"docker.source={docker.socket.parent}", f"data.source={data}",
                                   zfs_root=f"{pool}/snapvol")
    yield plugin
    plugin.remove()
    destroy_pool(pool)


@pytest.fixture(scope="session", params=LANE.drivers)
def driver(request):
    """The same end-to-end tests through `scripts/run`'s kind of plugin (a host process on a
    legacy socket) and through the managed plugin installed from a registry, with each
    backend the lane has."""
    return request.getfixturevalue(DRIVER_FIXTURES[request.param])


@pytest.fixture(scope="session", params=[d for d in LANE.drivers if d.endswith("zfs")])
def zfs_driver(request):
    """Each way Docker reaches a ZFS-backed snapvol in this lane."""
    return request.getfixturevalue(DRIVER_FIXTURES[request.param])


@pytest.fixture(scope="session", params=LANE.host_backends)
def host_plugin(request):
    """A host-process plugin of each backend (restart and hostile-input tests)."""
    return request.getfixturevalue("plugin" if request.param == "btrfs" else "zfs_plugin")


@pytest.fixture(scope="session", params=LANE.host_backends)
def pair(request, docker):
    """(source, replica): two host instances of one backend, each with its own pool."""
    if request.param == "btrfs":
        return request.getfixturevalue("plugin"), request.getfixturevalue("replica")
    return request.getfixturevalue("zfs_plugin"), request.getfixturevalue("zfs_replica")
