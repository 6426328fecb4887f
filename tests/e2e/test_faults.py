"""Faults through a real dockerd (issue 13): a full pool, a replication target killed
mid-transfer, a refused receive, and mount IDs no container holds. Each leaves every volume
usable and nothing lost; `snapvol check` agrees afterwards."""

from __future__ import annotations

import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import destroy_pool, make_pool
from tests.e2e.conftest import LANE, docker_socket
from tests.e2e.harness import PluginProcess, inspect_volume, mounts_under, remove_volume, unique
from tests.e2e.test_replication import (children_running, cli, digest, every_slot_hanging, fill,
                                        ssh_target)

RUN = ("run", "--rm", "--network", "none")


def run_on(docker, busybox, instance, volume: str, script: str, check: bool = True):
    mount = f"type=volume,source={volume},target=/data,volume-driver={instance.driver}"
    return docker(*RUN, "--mount", mount, busybox, "sh", "-c", script, check=check)


def kill_tree(instance: PluginProcess) -> None:
    """SIGKILL the plugin's whole process group (master, worker, their receivers)."""
    os.killpg(instance.pid, signal.SIGKILL)
    instance.kill(signal.SIGKILL)             # reaps the master


@pytest.fixture(params=LANE.host_backends)
def tight(request, e2e_base: Path, docker) -> Iterator[PluginProcess]:
    """An instance of its own on a small pool (256 MB), so that filling it is quick."""
    label = f"snapvoltight{secrets.token_hex(3)}"
    env = {"SNAPVOL_DOCKER_HOST": f"unix://{docker_socket(e2e_base)}"}
    pool = None
    if request.param == "zfs":
        request.getfixturevalue("zfs_service")
        pool = make_pool(e2e_base, size=256 << 20)
        env |= {"SNAPVOL_BACKEND": "zfs", "SNAPVOL_ZFS_ROOT": f"{pool}/snapvol"}
    else:
        env |= {"SNAPVOL_POOL_SIZE": "256M"}
    instance = PluginProcess(label, e2e_base / f"{label}-state", env)
    instance.start()
    try:
        yield instance
    finally:
        for volume in docker("volume", "ls", "-q", "--filter", f"driver={label}").split():
            docker("volume", "rm", "-f", volume, check=False)
        instance.stop()
        if pool is not None:
            destroy_pool(pool)
        embedded = instance.state_dir / "pool"
        if mounts_under(embedded):
            subprocess.run(["umount", str(embedded)], check=True, timeout=60)


def test_a_full_pool_leaves_every_volume_usable(docker, busybox, tight):
    keep, filler = unique("keep"), unique("filler")
    docker("volume", "create", "-d", tight.driver, keep)
    run_on(docker, busybox, tight, keep, "dd if=/dev/urandom of=/data/a bs=1M count=8 2>/dev/null")
    before = digest(docker, busybox, tight, keep)
    assert cli(tight, "snapshot", "create", keep, "--name", "before")[0] == 0
    docker("volume", "create", "-d", tight.driver, filler)
    # random data (no compression helps), until the pool refuses
    result = run_on(docker, busybox, tight, filler,
                    "dd if=/dev/urandom of=/data/fill bs=1M 2>&1; sync", check=False)
    assert "No space left on device" in result, result

    # full: what was written reads back, Docker's calls answer, nothing breaks half-way
    assert digest(docker, busybox, tight, keep) == before
    assert docker("volume", "inspect", keep)
    extra = unique("extra")
    made = docker("volume", "create", "-d", tight.driver, extra, check=False)
    listed = docker("volume", "ls", "-q", "--filter", f"driver={tight.driver}").split()
    if extra in listed:                        # created after all: then it works
        run_on(docker, busybox, tight, extra, "ls /data")
    else:
        assert "Traceback" not in made and "internal error" not in made, made
    code, out, err = cli(tight, "snapshot", "create", keep, "--name", "during")
    assert code in (0, 1, 4) and "Traceback" not in err + out, err
    assert "internal error" not in tight.log_tail(20000)

    # space back: everything works again, the snapshot taken before is whole
    docker("volume", "rm", filler)
    deadline = time.monotonic() + 90
    while True:                    # Btrfs frees a removed subvolume's blocks in the background
        out = run_on(docker, busybox, tight, keep, "echo changed > /data/a && echo written",
                     check=False)
        if "written" in out or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert "written" in out, out
    code, out, err = cli(tight, "snapshot", "create", keep, "--name", "after")
    assert code == 0, err
    assert cli(tight, "rollback", keep, "before", "--destroy-newer")[0] == 0
    assert digest(docker, busybox, tight, keep) == before
    code, report, err = cli(tight, "check")
    assert code == 0, report + err


def test_a_killed_replication_target_leaves_both_sides_usable(docker, busybox, pair, sshd):
    source, replica = pair
    vol, copy = unique("tgtkill"), unique("tgtkillcopy")
    target = ssh_target(sshd, replica)
    docker("volume", "create", "-d", source.driver, vol)
    fill(docker, busybox, source, vol, "dd if=/dev/urandom of=/data/a bs=1M count=2 2>/dev/null")
    assert cli(source, "replicate", vol, target, "--as", copy)[0] == 0
    replicated = digest(docker, busybox, replica, copy)
    fill(docker, busybox, source, vol, "dd if=/dev/urandom of=/data/b bs=1M count=150 2>/dev/null")

    results: list[tuple[int, str, str]] = []
    thread = threading.Thread(target=lambda: results.append(
        cli(source, "replicate", vol, target, "--as", copy)))
    thread.start()
    deadline = time.monotonic() + 60
    while not children_running(replica.pid, " receive ") and time.monotonic() < deadline:
        time.sleep(0.02)
    assert children_running(replica.pid, " receive "), "the receive was never seen running"
    kill_tree(replica)                      # the whole target instance, mid-stream
    digest(docker, busybox, source, vol)    # the source is usable meanwhile
    thread.join(180)
    assert results and results[0][0] != 0, results       # retried against a dead target
    replica.start()

    # the target kept exactly what it had, and holds no leftover of the killed receive
    assert digest(docker, busybox, replica, copy) == replicated
    code, report, err = cli(replica, "check")
    assert code == 0, report + err + replica.log_tail()
    code, out, err = cli(source, "replicate", vol, target, "--as", copy)
    assert code == 0, err + source.log_tail()
    assert digest(docker, busybox, replica, copy) == digest(docker, busybox, source, vol)
    assert cli(source, "check")[0] == 0
    for name in (copy, vol):
        docker("volume", "rm", name)


def test_a_refused_receive_leaves_the_replica_usable(docker, busybox, host_plugin, tmp_path):
    """All transfer slots busy: the receive is refused, and afterwards the replica mounts and
    takes the same stream (it used to answer 'being received' until a restart)."""
    plugin = host_plugin
    vol, copy = unique("refused"), unique("refusedcopy")
    docker("volume", "create", "-d", plugin.driver, vol)
    fill(docker, busybox, plugin, vol, "echo one > /data/f")
    assert cli(plugin, "snapshot", "create", vol, "--name", "s1")[0] == 0
    full, inc = tmp_path / "full.stream", tmp_path / "inc.stream"
    assert cli(plugin, "send", f"{vol}@s1", "-o", str(full))[0] == 0
    assert cli(plugin, "receive", copy, "-i", str(full))[0] == 0
    fill(docker, busybox, plugin, vol, "echo two > /data/f")
    assert cli(plugin, "snapshot", "create", vol, "--name", "s2")[0] == 0
    assert cli(plugin, "send", f"{vol}@s2", "--since", "s1", "-o", str(inc))[0] == 0

    with every_slot_hanging(plugin, vol):
        code, _, err = cli(plugin, "receive", copy, "-i", str(inc))
        assert code == 4 and "transfers are running already" in err, err
        assert run_on(docker, busybox, plugin, copy, "cat /data/f").strip() == "one"
    code, out, err = cli(plugin, "receive", copy, "-i", str(inc))
    if code != 0 and "I/O error" in err and not os.path.exists("/dev/zfs"):
        # zfs-fuse's own flake (seen once in CI, never on kernel ZFS; see
        # zfs_receive.Receiver._drop_unaccepted): an answer, not the wedge this test is about, which
        # answers "being received". The same stream again must be taken.
        code, out, err = cli(plugin, "receive", copy, "-i", str(inc))
    assert code == 0 and "(incremental from s1)" in out, err
    assert run_on(docker, busybox, plugin, copy, "cat /data/f").strip() == "two"
    for name in (copy, vol):
        docker("volume", "rm", name)


def test_check_forgets_mount_ids_no_container_holds(docker, busybox, host_plugin):
    """A Mount whose container Docker no longer knows (dockerd killed after it) keeps the
    volume 'in use' for ever: check names it and --repair lets it go; a volume a running
    container holds is left alone."""
    plugin = host_plugin
    orphan, held, holder = unique("orphan"), unique("held"), unique("holder")
    for name in (orphan, held):
        docker("volume", "create", "-d", plugin.driver, name)
    docker("run", "-d", "--name", holder, "--network", "none", "-v", f"{held}:/data", busybox,
           "sleep", "600")
    try:
        assert plugin.call("VolumeDriver.Mount", {"Name": orphan, "ID": "f" * 64})[0] == 200
        refused = docker("volume", "rm", orphan, check=False)
        assert "in use" in refused, refused
        code, report, err = cli(plugin, "check")
        assert code == 1 and f"mount no container holds: volume {orphan} counts 1" in report, \
            report + err
        assert held not in report
        code, report, err = cli(plugin, "check", "--repair")
        assert code == 0 and f"volume {orphan}" in report, report + err
        docker("volume", "rm", orphan)
        assert inspect_volume(docker, held)["Status"]["mounts"] == 1
    finally:
        docker("rm", "-f", holder)
        docker("volume", "rm", held)


@pytest.mark.parametrize("tight", LANE.host_backends, indirect=True)
def test_standbys_that_cannot_take_syncs_never_stop_their_primary(request, docker, busybox,
                                                                   tight, sshd):
    """Issue 16's faults on the standby side: one standby whose snapvol is gone (no socket),
    one behind an ssh host key we do not know, one whose pool is full. The primary keeps
    serving Docker; each standby's error is in its status, and the lag of the one that
    synced before its pool filled grows."""
    backend = tight.env.get("SNAPVOL_BACKEND", "btrfs")
    primary = request.getfixturevalue("plugin" if backend == "btrfs" else "zfs_plugin")
    gone = f"unix:///run/docker/plugins/snapvolgone{secrets.token_hex(4)}.sock"
    stranger = f"ssh://root@localhost:{sshd.port}{tight.socket}"   # known_hosts has 127.0.0.1
    full = f"unix://{tight.socket}"
    vol = unique("sbfault")
    docker("volume", "create", "-d", primary.driver, "-o", f"standby={full},{gone},{stranger}",
           "-o", "sync=1h", vol)
    try:
        run_on(docker, busybox, primary, vol, "echo one > /data/one")
        code, out, err = cli(primary, "sync", vol)
        assert code != 0, out + err                      # two of three failed
        rows = {r["target"]: r for r in inspect_volume(docker, vol)["Status"]["role"]["standbys"]}
        assert rows[full]["last_error"] is None and rows[full]["synced"], rows[full]
        assert "No such file" in rows[gone]["last_error"] or \
            "cannot" in rows[gone]["last_error"], rows[gone]
        assert "Host key verification failed" in rows[stranger]["last_error"], rows[stranger]
        assert rows[gone]["lag_seconds"] is None and rows[stranger]["lag_seconds"] is None
        # the standby's pool fills up
        filler = unique("filler")
        docker("volume", "create", "-d", tight.driver, filler)
        result = run_on(docker, busybox, tight, filler,
                        "dd if=/dev/urandom of=/data/fill bs=1M 2>&1; sync", check=False)
        assert "No space left on device" in result, result
        try:
            # the primary still serves Docker, and takes writes bigger than the standby's room
            run_on(docker, busybox, primary, vol,
                   "dd if=/dev/urandom of=/data/two bs=1M count=64 2>/dev/null && cat /data/one")
            first_lag = None
            for attempt in range(2):
                time.sleep(1.5)
                code, out, err = cli(primary, "sync", vol)
                assert code != 0, out + err
                row = {r["target"]: r for r in
                       inspect_volume(docker, vol)["Status"]["role"]["standbys"]}[full]
                assert row["last_error"], row                        # the full pool, said
                assert "Traceback" not in row["last_error"]
                if first_lag is None:
                    first_lag = row["lag_seconds"]
            assert row["lag_seconds"] > first_lag, (first_lag, row)   # the lag grows
            # a standby whose receive failed keeps what it had: its role and the first sync
            assert tight.call("Snapvol.Role", {"Volume": vol})[1]["Role"] == "standby"
            assert run_on(docker, busybox, primary, vol, "cat /data/one").strip() == "one"
        finally:
            docker("volume", "rm", filler)
    finally:
        docker("volume", "rm", vol)
        remove_volume(tight, vol)
