"""A real database on snapvol: PostgreSQL (Debian's) under load, snapshot, clone, recovery;
and the README's production Compose example, run as written (with test images swapped in)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from tests.e2e.harness import build_test_image, inspect_volume, unique
from tests.e2e.test_compose import compose_command
from tests.e2e.test_schedules_quiesce import actions
from tests.e2e.test_snapshots import cli

HERE = Path(__file__).resolve().parent
PGDATA = "/var/lib/postgresql/data"


@pytest.fixture(scope="session")
def postgres_image(docker) -> str:
    return build_test_image(docker, "snapvol-test/postgres:15", HERE / "images" / "postgres")


def psql(docker, container: str, sql: str) -> str:
    return docker("exec", container, "psql", "-U", "postgres", "-qAt", "-c", sql).strip()


def wait_ready(docker, container: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if docker.result("exec", container, "psql", "-U", "postgres", "-qAt", "-c",
                         "SELECT 1").returncode == 0:
            return
        time.sleep(0.5)
    raise AssertionError(f"{container} not ready: {docker('logs', container, check=False)[-2000:]}")


def test_snapshot_under_load_clones_into_a_consistent_database(docker, host_plugin, postgres_image):
    vol, copy, db, db2 = unique("pgdata"), unique("pgclone"), unique("pg"), unique("pg2")
    docker("volume", "create", "-d", host_plugin.driver, vol)
    try:
        docker("run", "-d", "--name", db, "--network", "none", "-v", f"{vol}:{PGDATA}", postgres_image)
        wait_ready(docker, db)
        psql(docker, db, "CREATE TABLE commits (id bigint PRIMARY KEY)")
        docker("exec", db, "pgbench", "-U", "postgres", "-i", "-q", "-s", "2", "postgres")
        # one committed row per psql call; /tmp/committed says which ones surely committed
        docker("exec", "-d", db, "sh", "-c", "i=0; while :; do i=$((i+1)); psql -U postgres -qAt "
               "-c \"INSERT INTO commits VALUES ($i)\" >/dev/null && echo $i > /tmp/c.new "
               "&& mv /tmp/c.new /tmp/committed; done")   # replaced whole: never read half-written
        docker("exec", "-d", db, "pgbench", "-U", "postgres", "-c", "2", "-T", "120", "postgres")
        time.sleep(4)
        committed_before = int(docker("exec", db, "cat", "/tmp/committed"))
        code, _, err = cli(host_plugin, "snapshot", "create", vol, "--name", "under-load")
        assert code == 0, err
        committed_after = int(docker("exec", db, "cat", "/tmp/committed"))
        assert committed_after > committed_before > 10     # it really was writing

        docker("volume", "create", "-d", host_plugin.driver, "-o", f"from={vol}@under-load", copy)
        docker("run", "-d", "--name", db2, "--network", "none", "-v", f"{copy}:{PGDATA}", postgres_image)
        wait_ready(docker, db2)
        logs = docker.result("logs", db2)                   # the server logs to stderr
        assert "automatic recovery in progress" in logs.stdout + logs.stderr   # crash-consistent
        top, count = psql(docker, db2, "SELECT max(id), count(*) FROM commits").split("|")
        assert committed_before <= int(top) <= committed_after + 1
        assert int(count) == int(top)                # every commit up to the snapshot, no hole
        # pgbench's invariant: each transaction moves the same delta in all four tables
        sums = psql(docker, db2, "SELECT (SELECT sum(abalance) FROM pgbench_accounts), "
                    "(SELECT sum(bbalance) FROM pgbench_branches), "
                    "(SELECT sum(tbalance) FROM pgbench_tellers), "
                    "(SELECT coalesce(sum(delta), 0) FROM pgbench_history)").split("|")
        assert len(set(sums)) == 1, sums
        assert int(psql(docker, db2, "SELECT count(*) FROM pgbench_history")) > 0
    finally:
        docker("rm", "-f", db, db2, check=False)
    docker("volume", "rm", vol)          # the source goes first: the clone keeps working (ZFS: promote)
    docker("volume", "rm", copy)


def test_the_readme_production_compose_example(docker, host_plugin, postgres_image, busybox,
                                               tmp_path: Path):
    project_dir = tmp_path / "shop"
    shutil.copytree(HERE / "compose" / "production", project_dir)
    # What a CI box without a registry must change: images, the driver name, no network.
    # (Compose replaces a volume's whole definition in an override: its options are the file's.)
    opts = yaml.safe_load((project_dir / "docker-compose.yml").read_text())["volumes"]["pgdata"]
    (project_dir / "docker-compose.override.yml").write_text(f"""\
version: "3.7"
services:
  db: {{image: "{postgres_image}", network_mode: none}}
  app:
    image: "{busybox}"
    network_mode: none
    command: ["sh", "-c", "grep ' /var/cache/myapp ' /proc/mounts; exec sleep 600"]
volumes:
  pgdata: {{driver: "{host_plugin.driver}", driver_opts: {json.dumps(opts["driver_opts"])}}}
""")
    project = unique("shop").replace("-", "")
    compose = [*compose_command(docker), "-p", project]

    def run(*args: str) -> str:
        proc = subprocess.run([*compose, *args], env=docker.env, capture_output=True, text=True,
                              timeout=300, cwd=project_dir)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    run("up", "-d", "--no-color")
    volume, clone, probe = f"{project}_pgdata", unique("shopcopy"), unique("shopprobe")
    try:
        db = run("ps", "-q", "db").strip()
        app = run("ps", "-q", "app").strip()
        wait_ready(docker, db)
        info = inspect_volume(docker, volume)
        assert info["Driver"] == host_plugin.driver
        schedule = info["Status"]["schedule"]
        assert (schedule["every"], schedule["keep"], schedule["quiesce"]) == ("1h", "24h,7d,4w,12m", "pause")
        assert info["Status"]["quota_bytes"] == 20 << 30
        assert psql(docker, db, "SELECT note FROM orders WHERE id = 1") == "made by the init script"
        assert psql(docker, db, "SHOW shared_buffers") == "32MB"          # the read-only config
        assert "tmpfs /var/cache/myapp tmpfs" in docker("logs", app)

        psql(docker, db, "INSERT INTO orders VALUES (2, 'before the snapshot')")
        time.sleep(1.5)                      # keep our own `docker exec psql` out of the window
        since = time.time() - 0.2
        code, _, err = cli(host_plugin, "snapshot", "create", volume, "--name", "nightly",
                           "--quiesce", "pause")
        assert code == 0, err
        assert actions(docker, db, since) == ["exec_start", "pause", "unpause"]   # CHECKPOINT hook
        psql(docker, db, "INSERT INTO orders VALUES (3, 'after the snapshot')")

        docker("volume", "create", "-d", host_plugin.driver, "-o", f"from={volume}@nightly", clone)
        docker("run", "-d", "--name", probe, "--network", "none", "-v", f"{clone}:{PGDATA}",
               postgres_image)
        wait_ready(docker, probe)
        assert psql(docker, probe, "SELECT string_agg(id::text, ',' ORDER BY id) FROM orders") == "1,2"
    finally:
        docker("rm", "-f", probe, check=False)
        run("down", "-v")
    assert volume not in docker("volume", "ls", "-q").split()
    docker("volume", "rm", clone)
