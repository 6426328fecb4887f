"""A host with one backend's library only: a ZFS host needs no btrfsutil, a Btrfs host no
libzfs_core. The plugin runs with the other library made unimportable (a ``sitecustomize``
that refuses it, first on ``PYTHONPATH``) and serves Docker: create, write, list, remove."""

from __future__ import annotations

import secrets
import subprocess
from pathlib import Path

import pytest

from tests.conftest import destroy_pool, make_pool
from tests.e2e.harness import PluginProcess, mounts_under, unique

BLOCKER = '''\
import importlib.abc, sys

class _Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == {module!r}:
            raise ImportError(f"{{name}} is not installed on this host (test_one_backend_host)")
        return None

sys.meta_path.insert(0, _Refuse())
'''


def without(module: str, directory: Path) -> dict[str, str]:
    directory.mkdir()
    (directory / "sitecustomize.py").write_text(BLOCKER.format(module=module))
    return {"PYTHONPATH": str(directory)}


def serves_docker(docker, busybox, plugin: PluginProcess) -> None:
    vol = unique("onebackend")
    docker("volume", "create", "-d", plugin.driver, "-o", "size=64M", vol)
    out = docker("run", "--rm", "--network", "none", "-v", f"{vol}:/data", "--volume-driver",
                 plugin.driver, busybox, "sh", "-c", "echo kept > /data/f && cat /data/f")
    assert out.strip() == "kept"
    assert vol in docker("volume", "ls", "-q", "--filter", f"driver={plugin.driver}").split()
    docker("volume", "rm", vol)


@pytest.mark.parametrize("blocked", ["btrfsutil"])
def test_a_zfs_host_needs_no_btrfsutil(docker, busybox, zfs_service, tmp_path, blocked):
    pool = make_pool(tmp_path, size=1 << 30)
    plugin = PluginProcess(f"snvzonly{secrets.token_hex(3)}", tmp_path / "state",
                           {"SNAPVOL_BACKEND": "zfs", "SNAPVOL_ZFS_ROOT": f"{pool}/snapvol",
                            **without(blocked, tmp_path / "site")})
    try:
        plugin.start()
        serves_docker(docker, busybox, plugin)
        assert f"{blocked} is not installed" not in plugin.log_tail(20000)
    finally:
        plugin.stop()
        destroy_pool(pool)


def test_a_btrfs_host_needs_no_libzfs_core(docker, busybox, tmp_path):
    plugin = PluginProcess(f"snvbonly{secrets.token_hex(3)}", tmp_path / "state",
                           {"SNAPVOL_POOL_SIZE": "1G", **without("libzfs_core", tmp_path / "site")})
    try:
        plugin.start()
        serves_docker(docker, busybox, plugin)
    finally:
        plugin.stop()
        for point in mounts_under(tmp_path / "state"):
            subprocess.run(["umount", point], check=False, timeout=60)


def test_the_blocker_really_blocks(tmp_path):
    """The proof above means something only if the module is really unimportable there."""
    env = without("btrfsutil", tmp_path / "site")
    probe = subprocess.run(["/usr/bin/python3", "-c", "import btrfsutil"], env=env,
                           capture_output=True, text=True, timeout=60)
    assert probe.returncode != 0 and "is not installed on this host" in probe.stderr
