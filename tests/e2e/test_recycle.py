"""The worker replaced to give memory back (plugin.recycle), through a real dockerd: a
container keeps its volume mounted across the hand-over, Docker's calls go on being
answered, and the new worker still counts the container's mount."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

import pytest

from tests.e2e.harness import PluginProcess, unique
from tests.e2e.test_snapshots import RUN
from tests.integration.test_recycle import workers


@pytest.fixture
def recycling(docker, e2e_base: Path):
    """An instance of its own that replaces its worker after 20 volumes fewer, idle 1 s."""
    name = f"snvrecycle{secrets.token_hex(3)}"
    process = PluginProcess(name, e2e_base / f"{name}-state",
                            {"SNAPVOL_TRASH_TTL": "0", "SNAPVOL_RECYCLE_DROP": "20",
                             "SNAPVOL_RECYCLE_QUIET": "1", "SNAPVOL_POOL_SIZE": "1G"})
    process.start()
    try:
        yield process
    finally:
        process.stop()


def test_a_container_keeps_its_volume_across_the_hand_over(docker, recycling, busybox):
    kept, others = unique("kept"), [unique(f"gone{i}") for i in range(24)]
    for name in (kept, *others):
        docker("volume", "create", "-d", recycling.driver, name)
    container = docker("run", "-d", "--network", "none", "-v", f"{kept}:/data", busybox,
                       "sh", "-c", "echo before > /data/f; sleep 600").strip()
    try:
        [first] = workers(recycling.pid)
        time.sleep(2)                               # the recycler sees the most volumes
        docker("volume", "rm", *others)
        deadline = time.monotonic() + 60
        while workers(recycling.pid) in ([first], []) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert workers(recycling.pid) not in ([first], []), recycling.log_tail()

        listed = docker("volume", "ls", "--filter", f"driver={recycling.driver}",
                        "--format", "{{.Name}}").split()
        assert listed == [kept]
        # in use by the running container: the new worker knows the mount the old one counted
        refused = docker.result("volume", "rm", kept)
        assert refused.returncode != 0 and "in use" in refused.stderr, refused.stderr
        docker("exec", container, "sh", "-c", "echo after >> /data/f")
        assert docker(*RUN, "-v", f"{kept}:/data", busybox, "cat", "/data/f").split() == \
            ["before", "after"]
    finally:
        docker("rm", "-f", container)
    docker("volume", "rm", kept)
    assert kept not in docker("volume", "ls", "--format", "{{.Name}}").split()
