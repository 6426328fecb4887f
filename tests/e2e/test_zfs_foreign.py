"""ZFS through Docker: which ZFS a plugin uses, and datasets snapvol did not make."""

from __future__ import annotations

import os
import subprocess

from tests.e2e.harness import unique


def test_foreign_dataset_is_invisible_unmountable_and_survives_rm(docker, zfs_driver, busybox):
    name = unique("foreign")
    dataset = f"{zfs_driver.zfs_root}/{name}"
    subprocess.run(["zfs", "create", "-o", "canmount=noauto", "-o", "mountpoint=none", dataset],
                   check=True)
    try:
        assert name not in docker("volume", "ls", "--format", "{{.Name}}").split()
        run = docker.result("run", "--rm", "--network", "none", "--volume-driver",
                            zfs_driver.driver, "-v", f"{name}:/data", busybox, "true")
        assert run.returncode != 0
        assert f"volume {name} already exists (made by something else (not snapvol))" in run.stderr
        rm = docker.result("volume", "rm", name)
        assert rm.returncode != 0 and "no such volume" in rm.stderr.lower()
        assert subprocess.run(["zfs", "list", dataset], capture_output=True).returncode == 0
    finally:
        subprocess.run(["zfs", "destroy", dataset], check=False)


def test_each_zfs_plugin_reports_the_zfs_it_drives(zfs_driver):
    """The OpenZFS lane must exercise libzfs_core (pyzfs) through Docker, not the CLI-only path."""
    code, body = zfs_driver.call("Snapvol.Status")
    assert code == 200, body
    storage = body["Status"]["storage"]
    if os.environ.get("SNAPVOL_REQUIRE_LIBZFS_CORE") == "1":
        assert storage["libzfs_core"] is True, storage
        assert storage["implementation"].startswith("OpenZFS "), storage
        assert "lz4" in storage["compression"], storage
    else:
        assert storage["libzfs_core"] is os.path.exists("/dev/zfs"), storage
