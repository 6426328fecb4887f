"""A dataset under snapvol's parent that snapvol did not make is not a volume."""

from __future__ import annotations

import subprocess

from tests.e2e.harness import unique


def test_foreign_dataset_is_invisible_unmountable_and_survives_rm(docker, zfs_plugin, busybox):
    name = unique("foreign")
    dataset = f"{zfs_plugin.env['SNAPVOL_ZFS_ROOT']}/{name}"
    subprocess.run(["zfs", "create", "-o", "canmount=noauto", "-o", "mountpoint=none", dataset],
                   check=True)
    try:
        assert name not in docker("volume", "ls", "--format", "{{.Name}}").split()
        run = docker.result("run", "--rm", "--network", "none", "--volume-driver",
                            zfs_plugin.driver, "-v", f"{name}:/data", busybox, "true")
        assert run.returncode != 0
        assert f"volume {name} already exists (made by something else (not snapvol))" in run.stderr
        rm = docker.result("volume", "rm", name)
        assert rm.returncode != 0 and "no such volume" in rm.stderr
        assert subprocess.run(["zfs", "list", dataset], capture_output=True).returncode == 0
    finally:
        subprocess.run(["zfs", "destroy", dataset], check=False)
