"""Standby replicas between two host instances of each backend (own pools and sockets):
syncs that follow, a planned hand-off that loses nothing and reverses, promote after a kill
of the primary, the old primary standing down (its copy set aside, never destroyed), and
what is refused: a second promote, a name clash on the standby, bad options.

One dockerd serves both instances here, and a volume name is one driver's in a dockerd, so
the primary is used through Docker and the standby through its own socket (Docker's calls,
as a second node's dockerd would make them). Two real Docker nodes: ``test_swarm.py``.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest

from plugin.client import PluginClient
from tests.e2e.harness import inspect_volume, remove_volume, unique
from tests.e2e.test_replication import RUN, cli


def role(instance, volume: str) -> dict:
    status, reply = instance.call("Snapvol.Role", {"Volume": volume})
    assert status == 200, (reply, instance.log_tail(20000))
    return reply


def write(docker, busybox, instance, volume: str, script: str) -> None:
    docker(*RUN, "--mount", f"type=volume,source={volume},target=/data,volume-driver={instance.driver}",
           busybox, "sh", "-c", script)


def mount_direct(instance, volume: str, mount_id: str) -> tuple[int, dict]:
    """Mount as dockerd calls it (its deadline for Mount is 2 minutes)."""
    return PluginClient(str(instance.socket), timeout=120).call(
        "VolumeDriver.Mount", {"Name": volume, "ID": mount_id})


def read_rows(path: Path) -> list[str]:
    return sorted(p.name for p in (path / "rows").iterdir())


@pytest.fixture
def standby_pair(pair, docker):
    """(primary, standby) with a volume on the primary whose standby is the other instance."""
    primary, standby = pair
    vol = unique("pgdata")
    docker("volume", "create", "-d", primary.driver, "-o", f"standby=unix://{standby.socket}",
           "-o", "sync=3s", vol)
    yield primary, standby, vol
    # removed for sure: left behind, its sync every 3 s would hold one of the instance's
    # transfer slots now and then during later tests (one needs all four)
    for instance in (primary, standby):
        for name in (vol, *[v["name"] for v in json.loads(cli(instance, "ls", "--json")[1])["Volumes"]
                            if v["name"].startswith(vol + "-diverged")]):
            remove_volume(instance, name)


def test_standby_follows_within_sync_and_is_never_served_stale(docker, busybox, standby_pair):
    primary, standby, vol = standby_pair
    write(docker, busybox, primary, vol, "mkdir /data/rows && touch /data/rows/1")
    deadline = time.monotonic() + 30          # sync=3s: the scheduler brings it over by itself
    while time.monotonic() < deadline:
        if standby.call("VolumeDriver.Get", {"Name": vol})[0] == 200:
            break
        time.sleep(0.5)
    assert role(standby, vol)["Role"] == "standby"
    assert role(standby, vol)["Epoch"] == 1
    assert role(standby, vol)["Primary"] == f"unix://{primary.socket}"
    write(docker, busybox, primary, vol, "touch /data/rows/2")
    time.sleep(7)                              # two sync intervals
    detail = role(primary, vol)["Detail"]
    [row] = detail["standbys"]
    assert row["target"] == f"unix://{standby.socket}" and row["last_error"] is None
    assert row["lag_seconds"] is not None and row["lag_seconds"] <= 8, row
    status = inspect_volume(docker, vol)["Status"]
    assert status["role"]["role"] == "primary" and status["role"]["standbys"][0]["synced"]
    # what the standby holds is what the primary had at its last sync
    path = Path(standby.call("VolumeDriver.Path", {"Name": vol})[1]["Mountpoint"])
    assert read_rows(path) == ["1", "2"]
    # the standby's listing shows it (docker volume ls on that node)
    assert vol in [v["Name"] for v in standby.call("VolumeDriver.List")[1]["Volumes"]]
    # a container on the primary keeps it busy: a Mount on the standby asks for a hand-off,
    # which cannot happen while the primary is in use -> refused with the reason
    holder = unique("holder")
    docker("run", "-d", "--name", holder, "--network", "none", "--mount",
           f"type=volume,source={vol},target=/data,volume-driver={primary.driver}", busybox,
           "sleep", "600")
    try:
        started = time.monotonic()
        status_code, reply = mount_direct(standby, vol, "f" * 64)
        assert status_code >= 400 and "still in use" in reply["Err"], reply
        assert time.monotonic() - started < 90
        assert role(primary, vol)["Role"] == "primary" and not role(primary, vol)["Fenced"]
    finally:
        docker("rm", "-f", holder)


def test_planned_handoff_loses_nothing_and_reverses(docker, busybox, standby_pair):
    primary, standby, vol = standby_pair
    write(docker, busybox, primary, vol, "mkdir /data/rows && for i in $(seq 1 50); do "
          "touch /data/rows/$i; done")
    assert cli(primary, "sync", vol)[0] == 0
    write(docker, busybox, primary, vol, "for i in $(seq 51 80); do touch /data/rows/$i; done")
    code, out, err = cli(primary, "handoff", vol, f"unix://{standby.socket}")
    assert code == 0, err
    assert "primary on" in out
    assert role(standby, vol)["Role"] == "primary" and role(standby, vol)["Epoch"] == 2
    assert role(primary, vol)["Role"] == "standby" and role(primary, vol)["Epoch"] == 2
    # every write made before the hand-off is on the new primary
    status_code, reply = mount_direct(standby, vol, "a" * 64)
    assert status_code == 200, reply
    path = Path(reply["Mountpoint"])
    assert read_rows(path) == sorted(str(i) for i in range(1, 81))
    # the old primary is a standby: Docker there is refused (its primary is in use) ...
    result = docker.result(*RUN, "--mount", f"type=volume,source={vol},target=/data,"
                           f"volume-driver={primary.driver}", busybox, "true")
    assert result.returncode != 0 and "still in use" in result.stderr, result.stderr
    (path / "rows" / "81").touch()                       # written on the new primary
    assert standby.call("VolumeDriver.Unmount", {"Name": vol, "ID": "a" * 64})[0] == 200
    # ... and once it is free, a Mount there takes it back (reversal), with the new writes
    write(docker, busybox, primary, vol, "ls /data/rows | sort -n | tail -1 > /data/last")
    assert role(primary, vol)["Role"] == "primary" and role(primary, vol)["Epoch"] == 3
    assert role(standby, vol)["Role"] == "standby"
    out = docker(*RUN, "--mount", f"type=volume,source={vol},target=/data,"
                 f"volume-driver={primary.driver}", busybox, "cat", "/data/last")
    assert out.strip() == "81"
    # a promote of a primary is refused
    code, _, err = cli(primary, "promote", vol)
    assert code != 0 and "already primary" in err


def test_promote_after_the_primary_is_killed_and_the_old_primary_stands_down(
        docker, busybox, standby_pair):
    primary, standby, vol = standby_pair
    write(docker, busybox, primary, vol, "mkdir /data/rows && touch /data/rows/synced")
    assert cli(primary, "sync", vol)[0] == 0
    write(docker, busybox, primary, vol, "touch /data/rows/after-last-sync")
    os.killpg(primary.pid, signal.SIGKILL)              # kill -9, workers too: the host is lost
    primary.kill()
    try:
        code, out, err = cli(standby, "promote", vol)
        assert code == 0, err
        assert "epoch 2" in out and "are not here" in out, out
        code, _, err = cli(standby, "promote", vol)       # a second promote is refused
        assert code != 0 and "already primary" in err
        status_code, reply = mount_direct(standby, vol, "b" * 64)   # the new primary serves
        assert status_code == 200, reply
        assert read_rows(Path(reply["Mountpoint"])) == ["synced"]   # RPO: the last sync
    finally:
        primary.start()
    # the old primary comes back, finds the higher epoch, and stands down by itself: its
    # copy (with the write the new primary never got) is set aside, never destroyed
    deadline = time.monotonic() + 30
    while role(primary, vol)["Role"] != "standby" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert role(primary, vol)["Role"] == "standby" and role(primary, vol)["Epoch"] == 2
    aside = f"{vol}-diverged-e1"
    out = docker(*RUN, "--mount", f"type=volume,source={aside},target=/data,"
                 f"volume-driver={primary.driver}", busybox, "ls", "/data/rows")
    assert sorted(out.split()) == ["after-last-sync", "synced"]
    # it never serves the volume while the new primary does
    result = docker.result(*RUN, "--mount", f"type=volume,source={vol},target=/data,"
                           f"volume-driver={primary.driver}", busybox, "true")
    assert result.returncode != 0 and "still in use" in result.stderr, result.stderr
    assert role(standby, vol)["Role"] == "primary"
    # the new primary seeds it again: a standby of epoch 2 with the new primary's data
    assert standby.call("VolumeDriver.Unmount", {"Name": vol, "ID": "b" * 64})[0] == 200
    code, out, err = cli(standby, "sync", vol)
    assert code == 0, out + err
    path = Path(primary.call("VolumeDriver.Path", {"Name": vol})[1]["Mountpoint"])
    assert read_rows(path) == ["synced"]


def test_a_standby_never_overwrites_an_unrelated_volume(docker, busybox, pair):
    primary, standby = pair
    vol = unique("clash")
    assert standby.call("VolumeDriver.Create", {"Name": vol})[0] == 200
    mountpoint = Path(standby.call("VolumeDriver.Path", {"Name": vol})[1]["Mountpoint"])
    (mountpoint / "theirs").write_text("keep me")
    docker("volume", "create", "-d", primary.driver, "-o", f"standby=unix://{standby.socket}", vol)
    try:
        code, out, err = cli(primary, "sync", vol)
        assert code != 0 and "name clash" in out, out + err
        assert (mountpoint / "theirs").read_text() == "keep me"
        [row] = role(primary, vol)["Detail"]["standbys"]
        assert "name clash" in row["last_error"]
    finally:
        docker("volume", "rm", vol)
        remove_volume(standby, vol)


@pytest.mark.parametrize("opts, message", [
    ({"standby": "ssh://-oProxyCommand=x"}, "bad host"),
    ({"standby": "ssh://a,ssh://a"}, "given twice"),
    ({"standby": ""}, "give 1 to 4 targets"),
    ({"sync": "1m"}, "give standby= too"),
    ({"standby": "ssh://a", "sync": "0s"}, "must be from 1s"),
])
def test_bad_standby_options_are_refused_and_change_nothing(host_plugin, opts, message):
    vol = unique("badstandby")
    status, reply = host_plugin.call("VolumeDriver.Create", {"Name": vol, "Opts": opts})
    assert status >= 400 and message in reply["Err"], reply
    assert host_plugin.call("VolumeDriver.Get", {"Name": vol})[0] == 404


def test_a_standby_host_never_creates_the_volume_empty(pair):
    """The same options reach every node (a Swarm service's volume-opt): on the host that
    standby= names, Create is refused, so Docker there never gets an empty volume."""
    primary, standby = pair
    vol = unique("selfstandby")
    opts = {"standby": f"unix://{standby.socket}", "sync": "1m"}
    status, reply = standby.call("VolumeDriver.Create", {"Name": vol, "Opts": opts})
    assert status >= 400 and "names this host" in reply["Err"], reply
    assert standby.call("VolumeDriver.Get", {"Name": vol})[0] == 404
    assert vol not in [v["Name"] for v in standby.call("VolumeDriver.List")[1]["Volumes"]]
    status, reply = primary.call("VolumeDriver.Create", {"Name": vol, "Opts": opts})
    try:
        assert status == 200, reply                      # on the primary host: made
        assert role(primary, vol)["Role"] == "primary"
    finally:
        remove_volume(primary, vol)
