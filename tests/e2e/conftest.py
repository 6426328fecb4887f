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

from tests.conftest import need
from tests.e2e.harness import DockerDaemon, PluginProcess, mounts_under


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


@pytest.fixture(scope="session")
def plugin(e2e_base: Path) -> Iterator[PluginProcess]:
    """snapvol on its embedded pool (the default a user gets), unique driver name."""
    process = PluginProcess(f"snapvole2e{secrets.token_hex(4)}", e2e_base / "state")
    process.start()
    yield process
    process.stop()
    pool = e2e_base / "state" / "pool"
    if mounts_under(pool):
        subprocess.run(["umount", str(pool)], check=True)


@pytest.fixture(scope="session")
def docker(plugin: PluginProcess, e2e_base: Path) -> Iterator[DockerDaemon]:
    daemon = DockerDaemon(e2e_base / "docker")
    daemon.base.mkdir()
    daemon.start()
    yield daemon
    daemon.stop()


@pytest.fixture(scope="session")
def busybox(docker: DockerDaemon) -> str:
    return docker.import_busybox()
