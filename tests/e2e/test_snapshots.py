"""Snapshots, clones and rollback through Docker and the snapvol CLI, on every driver."""

from __future__ import annotations

import io
import json

from plugin.cli import main
from tests.e2e.harness import inspect_volume, unique

RUN = ("run", "--rm", "--network", "none")


def cli(driver, *argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main([*argv, "--socket", str(driver.socket)], stdout=out, stderr=err)
    return code, out.getvalue(), err.getvalue()


def md5(docker, busybox, volume: str) -> str:
    return docker(*RUN, "-v", f"{volume}:/data", busybox, "sh", "-c",
                  "cd /data && cat state && md5sum blob | cut -d' ' -f1").strip()


def test_snapshot_write_clone_rollback(docker, driver, busybox):
    vol, at_snap, live, holder = unique("src"), unique("fromsnap"), unique("fromlive"), unique("hold")
    docker("volume", "create", "-d", driver.driver, vol)
    docker(*RUN, "-v", f"{vol}:/data", busybox, "sh", "-c",
           "echo one > /data/state && dd if=/dev/urandom of=/data/blob bs=1M count=4 2>/dev/null")
    before = md5(docker, busybox, vol)

    code, out, err = cli(driver, "snapshot", "create", vol, "--name", "s1", "--json")
    assert code == 0, err
    assert [s["name"] for s in json.loads(out)["Snapshots"]] == ["s1"]
    docker(*RUN, "-v", f"{vol}:/data", busybox, "sh", "-c",
           "echo two > /data/state && dd if=/dev/urandom of=/data/blob bs=1M count=4 2>/dev/null")
    after = md5(docker, busybox, vol)
    assert after != before

    docker("volume", "create", "-d", driver.driver, "-o", f"from={vol}@s1", at_snap)
    docker("volume", "create", "-d", driver.driver, "-o", f"from={vol}", live)
    assert md5(docker, busybox, at_snap) == before
    assert md5(docker, busybox, live) == after
    docker(*RUN, "-v", f"{at_snap}:/data", busybox, "sh", "-c", "echo clone > /data/state")
    assert md5(docker, busybox, vol) == after                     # clones are independent
    assert md5(docker, busybox, at_snap).startswith("clone")

    snapshots = inspect_volume(docker, vol)["Status"]["snapshots"]
    assert snapshots[0]["name"] == "s1" and snapshots[0]["automatic"] is False
    code, out, _ = cli(driver, "snapshot", "ls", vol)
    assert "s1" in out

    docker("run", "-d", "--name", holder, "--network", "none", "-v", f"{vol}:/data", busybox,
           "sleep", "300")
    code, _, err = cli(driver, "rollback", vol, "s1")
    assert code == 4 and f"volume {vol} is in use by container(s) {holder}; stop" in err, err
    docker("rm", "-f", holder)
    if driver.backend == "zfs":
        # the newer snapshot rollback -r would destroy is the origin of the clone `live`
        code, _, err = cli(driver, "rollback", vol, "s1", "--destroy-newer")
        assert code == 4 and f"volume(s) {live} were cloned from a newer snapshot" in err, err
        docker("volume", "rm", live)
    code, _, err = cli(driver, "rollback", vol, "s1", "--destroy-newer")
    assert code == 0, err
    assert md5(docker, busybox, vol) == before

    bad = docker.result("volume", "create", "-d", driver.driver, "-o", f"from={vol}@nope", unique("x"))
    assert bad.returncode != 0 and f"no such snapshot: {vol}@nope" in bad.stderr
    bad = docker.result("volume", "create", "-d", driver.driver, "-o", "from=ghost-vol", unique("x"))
    assert bad.returncode != 0 and "no such volume: ghost-vol" in bad.stderr
    code, _, err = cli(driver, "snapshot", "rm", vol, "nope")
    assert code == 3 and f"no such snapshot: {vol}@nope" in err

    # removing the source keeps the clone made from its snapshot (ZFS: promoted first)
    docker("volume", "rm", vol)
    assert md5(docker, busybox, at_snap).startswith("clone")

    for name in (at_snap, live):
        if name in docker("volume", "ls", "-q").split():
            docker("volume", "rm", name)
