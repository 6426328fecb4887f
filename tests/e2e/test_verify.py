"""Validated restores through a real dockerd: PostgreSQL verified with builtin:postgres (a
quiesced snapshot passes, a damaged one fails with the server's message), a scheduled
verification shows in inspect, and the scratch clone and the check container are always
gone: after a pass, a failure, a hung check (timeout), and a plugin killed mid-verify."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.e2e.harness import build_test_image, inspect_volume, remove_volume, unique
from tests.e2e.test_postgres import PGDATA, psql, wait_ready
from tests.e2e.test_snapshots import RUN, cli

HERE = Path(__file__).resolve().parent
CHECK_LABEL = "snapvol.verify.clone"


@pytest.fixture(scope="session")
def postgres_image(docker) -> str:
    return build_test_image(docker, "snapvol-test/postgres:15", HERE / "images" / "postgres")


def leftovers(docker, instance) -> tuple[list[str], list[str]]:
    """(check containers, scratch clones) left on this host by *instance*."""
    containers = docker("ps", "-aq", "--filter", f"label={CHECK_LABEL}").split()
    if instance.backend == "zfs":
        listing = subprocess.run(["zfs", "list", "-H", "-o", "name", "-r", instance.zfs_root],
                                 capture_output=True, text=True, check=True, timeout=60).stdout
        clones = [n for n in listing.split() if "/snapvol.verify." in n]
    else:
        volumes = instance.state_dir / "pool" / "volumes"
        clones = [p.name for p in volumes.iterdir() if p.name.startswith("snapvol.verify.")]
    return containers, clones


def wait_for(what: str, predicate, timeout: float = 60.0, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(step)


def test_postgres_snapshot_verifies_and_a_damaged_one_fails(docker, host_plugin, postgres_image,
                                                            busybox):
    plugin = host_plugin                                # Btrfs and ZFS
    vol, db = unique("pgverify"), unique("pgv")
    docker("volume", "create", "-d", plugin.driver, "-o", "verify-cmd=builtin:postgres", vol)
    try:
        docker("run", "-d", "--name", db, "--network", "none", "-v", f"{vol}:{PGDATA}",
               postgres_image)
        wait_ready(docker, db)
        psql(docker, db, "CREATE TABLE t AS SELECT g AS id FROM generate_series(1, 1000) g")
        code, _, err = cli(plugin, "snapshot", "create", vol, "--name", "good", "--quiesce", "pause")
        assert code == 0, err
        started = time.monotonic()
        code, out, err = cli(plugin, "verify", vol)           # the newest: good
        took = time.monotonic() - started
        assert code == 0, out + err
        assert out.startswith(f"{vol}@good: PASSED") and postgres_image in out
        assert leftovers(docker, plugin) == ([], [])
        status = inspect_volume(docker, vol)["Status"]["verify"]
        assert status["last"]["result"] == "passed" and status["passed"]["snapshot"] == "good"
        assert "PostgreSQL checks passed" in status["last"]["message"]
        code, out, _ = cli(plugin, "snapshot", "ls", vol)
        assert "passed" in out and "newest verified restore point" in out

        # damage pg_control in the volume (the server stopped), then snapshot that: bytes
        # 16-63, past the version fields, so the server finds a bad checksum
        docker("stop", db)
        docker(*RUN, "-v", f"{vol}:/pg", busybox, "dd", "if=/dev/urandom",
               "of=/pg/global/pg_control", "bs=16", "seek=1", "count=3", "conv=notrunc")
        code, _, err = cli(plugin, "snapshot", "create", vol, "--name", "damaged")
        assert code == 0, err
        code, out, err = cli(plugin, "verify", f"{vol}@damaged", "--json")
        assert code == 1, out + err
        result = json.loads(out)["Verify"]
        assert result["result"] == "failed" and result["snapshot"] == "damaged"
        assert "incorrect checksum in control file" in result["message"], result["message"]
        assert "PostgreSQL does not start on this snapshot" in result["message"]
        assert leftovers(docker, plugin) == ([], [])
        status = inspect_volume(docker, vol)["Status"]["verify"]
        assert status["last"]["result"] == "failed" and status["passed"]["snapshot"] == "good"
        code, out, _ = cli(plugin, "status")
        assert f"{vol}: failed (damaged" in out
        print(f"\nverify of a PostgreSQL snapshot: {took:.1f} s")
    finally:
        docker("rm", "-f", db, check=False)
        remove_volume(plugin, vol)


def test_scheduled_verification_and_a_hung_check(docker, host_plugin, busybox):
    plugin = host_plugin
    vol, hung = unique("schedverify"), unique("hungverify")
    for name in (vol, hung):
        docker("volume", "create", "-d", plugin.driver, "-o", f"verify-image={busybox}",
               "-o", "verify-cmd=builtin:sha256sum", *(["-o", "verify=3s"] if name == vol else []),
               name)
    try:
        for name in (vol, hung):
            docker(*RUN, "-v", f"{name}:/data", busybox, "sh", "-c",
                   "cd /data && echo payload > f && sha256sum f > SHA256SUMS")
            code, _, err = cli(plugin, "snapshot", "create", name, "--name", "s1")
            assert code == 0, err
        last = wait_for("a scheduled verification", lambda: (
            inspect_volume(docker, vol)["Status"]["verify"]["last"] or {}).get("result") == "passed"
            and inspect_volume(docker, vol)["Status"]["verify"]["last"], timeout=30)
        assert last["snapshot"] == "s1" and "f: OK" in last["message"]
        assert inspect_volume(docker, vol)["Status"]["verify"]["every"] == "3s"

        started = time.monotonic()
        code, out, err = cli(plugin, "verify", hung, "--cmd", "sleep 600", "--timeout", "2s")
        assert code == 1, out + err
        assert "did not finish within 2s and was killed" in out
        assert time.monotonic() - started < 30
        code, out, err = cli(plugin, "verify", hung, "--image", "snapvol-test/absent:1")
        assert code == 2 and "is not on this host" in out, out + err

        # what monitoring reads (the facts behind /metrics and check --freshness)
        code, out, err = cli(plugin, "check", "--freshness", "--json")
        report = json.loads(out)
        facts = {v["name"]: v["verify"] for v in report["Facts"]["volumes"]}
        assert facts[vol]["interval"] == 3 and facts[vol]["last_success"], facts[vol]
        assert facts[hung]["last_failed"] and facts[hung]["last_success"] is None, facts[hung]
        assert [f for f in report["Findings"] if f["kind"] == "verification"
                and f"volume {hung}:" in f["what"]], report["Findings"]
    finally:
        for name in (vol, hung):
            remove_volume(plugin, name)
    assert wait_for("no leftovers", lambda: leftovers(docker, plugin) == ([], []), timeout=20)


def _verifying(docker) -> bool:
    return bool(docker("ps", "-q", "--filter", f"label={CHECK_LABEL}").split())


def test_a_plugin_killed_mid_verify_leaves_nothing_after_its_restart(docker, plugin, busybox):
    vol = unique("killverify")
    docker("volume", "create", "-d", plugin.driver, vol)
    try:
        docker(*RUN, "-v", f"{vol}:/data", busybox, "sh", "-c", "echo x > /data/f")
        code, _, err = cli(plugin, "snapshot", "create", vol, "--name", "s1")
        assert code == 0, err
        def verify() -> None:
            try:                        # its connection breaks with the plugin: that is the test
                cli(plugin, "verify", vol, "--image", busybox, "--cmd", "sleep 600")
            except Exception:           # noqa: BLE001
                pass

        thread = threading.Thread(target=verify, daemon=True)
        thread.start()
        wait_for("the check container", lambda: _verifying(docker), timeout=30)
        assert leftovers(docker, plugin)[1]                  # the clone exists meanwhile
        # a crash of the whole plugin: the worker (which runs the verification) and the master
        for child in Path(f"/proc/{plugin.pid}/task/{plugin.pid}/children").read_text().split():
            os.kill(int(child), signal.SIGKILL)
        plugin.kill(signal.SIGKILL)
        thread.join(30)
        containers, clones = leftovers(docker, plugin)
        assert containers and clones                         # what the crash left
        plugin.start()
        assert wait_for("the start-up clean-up", lambda: leftovers(docker, plugin) == ([], []),
                        timeout=30)
        assert "removing the clone snapvol.verify." in plugin.log_tail(20000)
    finally:
        remove_volume(plugin, vol)


def test_the_managed_plugin_mounts_the_clone_as_a_volume_of_its_own_driver(docker, managed, busybox):
    vol = unique("mgdverify")
    docker("volume", "create", "-d", managed.driver, "-o", f"verify-image={busybox}",
           "-o", "verify-cmd=builtin:sha256sum", vol)
    try:
        docker(*RUN, "-v", f"{vol}:/data", busybox, "sh", "-c",
               "cd /data && echo payload > f && sha256sum f > SHA256SUMS")
        code, _, err = cli(managed, "snapshot", "create", vol, "--name", "s1")
        assert code == 0, err
        docker(*RUN, "-v", f"{vol}:/data", busybox, "sh", "-c", "echo changed > /data/f")
        code, out, err = cli(managed, "verify", vol)         # the clone of s1, not the volume
        assert code == 0 and "f: OK" not in out, out + err   # (the output shows on failures)
        last = inspect_volume(docker, vol)["Status"]["verify"]["last"]
        assert last["result"] == "passed" and "f: OK" in last["message"]
        code, out, err = cli(managed, "verify", vol, "--cmd", "sh -c 'echo broken >> f && sha256sum -c SHA256SUMS'")
        assert code == 1 and "FAILED" in out, out + err
        assert not _verifying(docker)
        volumes = managed.volume_dir(vol).parent
        assert not [p.name for p in volumes.iterdir() if p.name.startswith("snapvol.verify.")]
        assert not [n for n in docker("volume", "ls", "-q").split() if n.startswith("snapvol.")]
    finally:
        remove_volume(managed, vol)
