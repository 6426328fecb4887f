"""The trash through a real dockerd: `docker volume rm` and `docker compose down -v` are
undone with `snapvol trash restore`, data and snapshots intact; expiry and space pressure
purge, on an instance of their own with a short TTL and a small pool."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.harness import PluginProcess, inspect_volume, unique
from tests.e2e.test_compose import compose_command
from tests.e2e.test_snapshots import RUN, cli


def trashed(driver) -> list[dict]:
    code, out, err = cli(driver, "trash", "ls", "--json")
    assert code == 0, err
    return json.loads(out)["Trash"]


def names_in_docker(docker) -> list[str]:
    return docker("volume", "ls", "--format", "{{.Name}}").split()


def test_rm_then_restore_brings_the_data_and_snapshots_back(docker, driver, busybox):
    vol, old = unique("trash"), unique("trashold")
    docker("volume", "create", "-d", driver.driver, "-o", "mode=750", vol)
    docker(*RUN, "-v", f"{vol}:/data", busybox, "sh", "-c", "echo precious > /data/f")
    code, _, err = cli(driver, "snapshot", "create", vol, "--name", "s1")
    assert code == 0, err
    docker("volume", "rm", vol)
    assert vol not in names_in_docker(docker)
    assert docker.result("volume", "inspect", vol).returncode != 0
    [entry] = [e for e in trashed(driver) if e["Name"] == vol]
    assert entry["Snapshots"] == 1 and entry["State"] == "trashed" and entry["ExpiresAt"]
    try:
        # the name is free: a new volume of that name is empty and has no snapshots
        docker("volume", "create", "-d", driver.driver, vol)
        assert docker(*RUN, "-v", f"{vol}:/data", busybox, "ls", "-A", "/data").strip() == ""
        code, out, _ = cli(driver, "snapshot", "ls", vol, "--json")
        assert json.loads(out)["Snapshots"] == []
        code, _, err = cli(driver, "trash", "restore", vol)
        assert code == 4 and f"volume {vol} exists" in err and "--as NEW" in err, err

        code, out, err = cli(driver, "trash", "restore", vol, "--as", old)
        assert code == 0 and f"restored volume {old}" in out, err
        info = inspect_volume(docker, old)            # dockerd asks the drivers: ours has it
        assert info["Driver"] == driver.driver
        assert info["Status"]["options"] == {"mode": "750"}
        assert docker(*RUN, "-v", f"{old}:/data", busybox, "cat", "/data/f").strip() == "precious"
        code, out, _ = cli(driver, "snapshot", "ls", old, "--json")
        assert [s["name"] for s in json.loads(out)["Snapshots"]] == ["s1"]
        assert entry["Id"] not in [e["Id"] for e in trashed(driver)]
    finally:
        for name in (vol, old):
            docker("volume", "rm", name, check=False)
    for name in (vol, old):
        code, out, err = cli(driver, "trash", "purge", name)
        assert code == 0 and f"purged {name}" in out, err
    assert not {vol, old} & {e["Name"] for e in trashed(driver)}


def test_compose_down_v_is_undone_by_a_restore(docker, host_plugin, busybox, tmp_path: Path):
    (tmp_path / "docker-compose.yml").write_text(
        "services:\n"
        "  app:\n"
        f"    image: {busybox}\n"
        "    network_mode: none\n"
        "    command: [\"sh\", \"-c\", \"test -e /data/made || echo from-compose > /data/made\"]\n"
        "    volumes: [\"data:/data\"]\n"
        "volumes:\n"
        "  data:\n"
        f"    driver: {host_plugin.driver}\n")
    project = unique("trproj").replace("-", "")
    compose = [*compose_command(docker), "-p", project, "-f", str(tmp_path / "docker-compose.yml")]

    def run(*args: str) -> str:
        proc = subprocess.run([*compose, *args], env=docker.env, capture_output=True, text=True,
                              timeout=180, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    volume = f"{project}_data"
    run("up", "--no-color")
    docker(*RUN, "-v", f"{volume}:/data", busybox, "sh", "-c", "echo written-later >> /data/made")
    run("down", "-v")
    assert volume not in names_in_docker(docker)
    code, out, err = cli(host_plugin, "trash", "restore", volume)
    assert code == 0, err
    run("up", "--no-color")              # the restored volume, not a new one
    made = docker(*RUN, "-v", f"{volume}:/data", busybox, "cat", "/data/made")
    assert made.splitlines() == ["from-compose", "written-later"]
    run("down", "-v")
    code, _, err = cli(host_plugin, "trash", "purge", volume)
    assert code == 0, err


@pytest.fixture
def short_trash(docker, e2e_base: Path):
    """An instance of its own: TTL 1 minute, purge from 50 % of a 300M pool."""
    name = f"snvtrash{secrets.token_hex(3)}"
    process = PluginProcess(name, e2e_base / f"{name}-state",
                            {"SNAPVOL_TRASH_TTL": "1m", "SNAPVOL_TRASH_FULL": "50",
                             "SNAPVOL_POOL_SIZE": "300M"})
    process.start()
    try:
        yield process
    finally:
        process.stop()


def wait_until(what: str, check, timeout: float, instance: PluginProcess) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s\n{instance.log_tail()}"
        time.sleep(1)


def test_space_pressure_purges_the_oldest_then_the_ttl_the_rest(docker, short_trash, busybox):
    big, filler = unique("big"), unique("filler")
    docker("volume", "create", "-d", short_trash.driver, big)
    # a new 300M Btrfs reads 27 % full (its metadata and reserve): 30M more keeps it below
    # the mark, the filler's 80M takes it past
    docker(*RUN, "-v", f"{big}:/data", busybox, "dd", "if=/dev/urandom", "of=/data/blob",
           "bs=1M", "count=30", "conv=fsync")
    docker("volume", "rm", big)
    assert [e["Name"] for e in trashed(short_trash)] == [big]

    # past half of the pool: the scheduler purges the trashed volume, oldest first
    docker("volume", "create", "-d", short_trash.driver, filler)
    docker(*RUN, "-v", f"{filler}:/data", busybox, "dd", "if=/dev/urandom", "of=/data/blob",
           "bs=1M", "count=80", "conv=fsync")
    wait_until("purge under space pressure", lambda: trashed(short_trash) == [], 45, short_trash)
    assert "pool" in short_trash.log_tail() and "purging the oldest" in short_trash.log_tail()

    # below the mark again (Btrfs frees deleted data in the background): kept, until the
    # TTL (1 minute) purges it
    docker(*RUN, "-v", f"{filler}:/data", busybox, "rm", "/data/blob")
    pool = short_trash.state_dir / "pool"

    def below_the_mark() -> bool:
        subprocess.run(["btrfs", "filesystem", "sync", str(pool)], capture_output=True, timeout=60)
        fs = os.statvfs(pool)
        return 1 - fs.f_bavail / fs.f_blocks < 0.45
    wait_until("the pool below the mark again", below_the_mark, 60, short_trash)
    docker("volume", "rm", filler)
    time.sleep(12)                                # a scheduler pass or more: still kept
    assert [e["Name"] for e in trashed(short_trash)] == [filler]
    wait_until("expiry after SNAPVOL_TRASH_TTL=1m", lambda: trashed(short_trash) == [], 90,
               short_trash)
